"""The gateway process imports TF Serving's protos without the TensorFlow runtime."""

import subprocess
import sys

from cbir.processes import REPO

SCRIPT = """
import sys
from gateway.light_imports import use_tensorflow_protos_only
assert use_tensorflow_protos_only()
import gateway.server, embedder.client, indexer.client
from tensorflow.core.framework import tensor_pb2
assert tensor_pb2.TensorProto(string_val=[b"x"]).SerializeToString()
assert not hasattr(sys.modules["tensorflow"], "constant"), "the runtime was loaded"
# VmRSS, not ru_maxrss: a child forked from a big pytest process inherits the parent's high-water mark.
rss = next(line for line in open("/proc/self/status") if line.startswith("VmRSS:"))
print(int(rss.split()[1]) // 1024)
"""


def test_gateway_imports_without_the_tensorflow_runtime():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) < 250  # MB; with the runtime it is ~600


def test_does_nothing_when_tensorflow_is_already_loaded(monkeypatch):
    from gateway.light_imports import use_tensorflow_protos_only

    monkeypatch.setitem(sys.modules, "tensorflow", object())
    assert use_tensorflow_protos_only() is False
