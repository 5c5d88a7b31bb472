"""The local model server's settings, importable without TensorFlow (the `serve` flags read their defaults here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedder.model_config import BatchingParameters, ModelEntry


@dataclass(frozen=True)
class ModelServerSettings:
    """Everything the model server needs besides the common server options."""

    entries: tuple[ModelEntry, ...]
    batching: BatchingParameters | None = None
    file_system_poll_wait_seconds: float = 1.0
    model_config_file: str | None = None
    model_config_file_poll_wait_seconds: float = 0.0
    enable_model_warmup: bool = True
    allow_version_labels_for_unavailable_models: bool = False
