"""Shared fixtures of the embedder tests: a model repository of tiny SavedModels."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tiny_model import export_tiny_model


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """``<repo>/tiny/1`` (seed 0) and ``<repo>/tiny/2`` (seed 1): two embedding spaces of dim 8."""
    repo = tmp_path_factory.mktemp("models")
    export_tiny_model(repo, "tiny", version=1, seed=0)
    export_tiny_model(repo, "tiny", version=2, seed=1)
    return repo
