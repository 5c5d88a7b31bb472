"""A training run's folder: resolved config, checkpoints (latest and best), and model restoring.

``<data_dir>/checkpoints/<run name>/`` holds ``config.json`` (the resolved config), ``tf_ckpts/`` (the
latest checkpoints, as the original) and ``best/`` (the checkpoint with the best test Recall@1 so far,
with ``best/metrics.json``). Every inference command restores the model from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from cbir.errors import FailedPrecondition, NotFound
from trainer.config import DataDirs, TrainingConfig

# Fields that may change when a run is resumed; anything else would silently mix two experiments.
RESUMABLE_FIELDS = frozenset(
    {"model.fit.epochs", "checkpoint_frequency", "eval_frequency", "loading_threads", "model.weights"}
)


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def latest_dir(self) -> Path:
        return self.path / "tf_ckpts"

    @property
    def best_dir(self) -> Path:
        return self.path / "best"

    @property
    def best_metrics_file(self) -> Path:
        return self.best_dir / "metrics.json"

    def exists(self) -> bool:
        return self.config_file.exists() or self.latest_dir.exists()

    def best_metrics(self) -> dict | None:
        if self.best_metrics_file.is_file():
            return json.loads(self.best_metrics_file.read_text())
        return None


def run_dir_for(config: TrainingConfig, dirs: DataDirs, run_name: str | None = None) -> RunDir:
    return RunDir(dirs.run_dir(run_name or config.run_name))


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted fields whose values differ between two resolved configs, ignoring resumable ones."""
    a, b = _flatten(saved), _flatten(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_FIELDS)


def checkpoint_path(run: RunDir, which: str = "best") -> str:
    """The checkpoint prefix of ``which`` ("best", "latest", or a checkpoint path); best falls back to latest."""
    if which not in ("best", "latest"):
        if Path(which + ".index").exists():
            return which
        raise NotFound(f"checkpoint {which} does not exist")
    if which == "best":
        best = tf.train.latest_checkpoint(str(run.best_dir))
        if best:
            return best
    latest = tf.train.latest_checkpoint(str(run.latest_dir))
    if latest:
        return latest
    raise FailedPrecondition(
        f"run {run.path.name} has no checkpoint in {run.path}: train it first "
        "(python -m trainer train -c CONFIG), or pass --untrained to use the initial weights"
    )


def restore_model(model: keras.Model, path: str) -> int:
    """Loads the model weights of a training checkpoint into ``model``; returns the checkpoint's step."""
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(model=model, step=step)
    try:
        checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as exc:
        raise FailedPrecondition(
            f"checkpoint {path} does not fit the model of this config (was model.name, head, "
            f"embedding_dim or input changed with --set?): {str(exc).splitlines()[0][:300]}"
        ) from exc
    return int(step.numpy())
