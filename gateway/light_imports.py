"""Lets the gateway use TF Serving's API protos without loading the TensorFlow runtime.

embedder.client speaks TF Serving's protocol through ``tensorflow_serving.apis``, whose generated
modules import ``tensorflow.core.framework.*_pb2`` — plain protobuf modules that happen to live inside
the ``tensorflow`` package, whose ``__init__`` loads the whole runtime (measured: 17 s and 608 MB RSS
to import the gateway on the 2-core test machine, against 1.3 s and 60 MB with this shim). The gateway
never runs TensorFlow, so its process registers a bare ``tensorflow`` package object pointing at the
installed package directory: submodules such as ``tensorflow.core.framework.tensor_pb2`` then load
from their files as usual, and ``tensorflow/__init__.py`` never runs.

Only ``python -m gateway serve`` calls this, before anything imports tensorflow; in a process where
TensorFlow is already loaded (tests, notebooks) it does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def use_tensorflow_protos_only() -> bool:
    """Installs the shim; returns False (and does nothing) if TensorFlow is loaded or not installed."""
    if "tensorflow" in sys.modules:
        return False
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        return False
    package = types.ModuleType(
        "tensorflow", "TensorFlow's generated protos only (see gateway/light_imports.py)"
    )
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["tensorflow"] = package
    return True
