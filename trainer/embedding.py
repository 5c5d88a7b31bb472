"""Building the model of a config, embedding image files, and the gallery (embedding database) file.

The gallery file is HDF5 like the original ``emb/<run>.h5``: ``ids``, ``labels`` (int), ``label_names``,
``paths`` and ``vectors``, plus the original dataset names ``emb``/``pids``/``fids`` as hard links to
the same data, so the original scripts' readers still work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras
import numpy as np
import tensorflow as tf

from cbir.errors import CbirError, FailedPrecondition, InvalidInput
from trainer import models
from trainer.config import TrainingConfig
from trainer.preprocessing import inference_dataset


def build_model(config: TrainingConfig, *, weights: str | None = None) -> keras.Model:
    """The embedding model of ``config`` (backbone + head); ``weights`` as models.build_embedding_model."""
    m = config.model
    try:
        return models.build_embedding_model(
            m.name, m.head, m.embedding_dim, input_size=(m.input.height, m.input.width), weights=weights
        )
    except CbirError:
        raise
    except Exception as exc:
        if weights is None:
            raise
        # Typically Keras failing to download ImageNet weights on a machine without internet.
        raise FailedPrecondition(
            f"cannot load {weights!r} weights for {m.name}: {str(exc).splitlines()[0][:300]}; offline, pass a "
            "local weights file with --set model.weights=PATH, or --set model.weights=null for random weights"
        ) from exc


def make_embed_fn(model: keras.Model):
    @tf.function(reduce_retracing=True)
    def embed(pixels):
        return model(pixels, training=False)

    return embed


def embed_paths(
    model: keras.Model,
    paths: Sequence[str],
    config: TrainingConfig,
    *,
    batch_size: int = 32,
    progress=None,
    embed_fn=None,
) -> np.ndarray:
    """float32 [len(paths), D] embeddings of image files, with the deterministic inference preprocessing."""
    embed_fn = embed_fn or make_embed_fn(model)
    dataset = inference_dataset(paths, config.model, batch_size=batch_size, threads=config.loading_threads)
    chunks = []
    done = 0
    try:
        for pixels in dataset:
            chunks.append(embed_fn(pixels).numpy())
            done += int(pixels.shape[0])
            if progress is not None:
                progress.update(int(pixels.shape[0]))
    except tf.errors.InvalidArgumentError as exc:
        # The pipeline keeps order, so the failing file is the first one not embedded yet.
        bad = paths[done] if done < len(paths) else "?"
        raise InvalidInput(
            f"cannot decode image {bad} (near index {done}): {exc.message.splitlines()[0]}"
        ) from exc
    if not chunks:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(chunks).astype(np.float32)


@dataclass(frozen=True)
class Gallery:
    ids: list[str]
    labels: np.ndarray
    label_names: list[str]
    paths: list[str]
    vectors: np.ndarray
    run_name: str
    step: int

    def __len__(self) -> int:
        return len(self.ids)


def write_gallery(path: Path, gallery: Gallery) -> None:
    """Writes the gallery atomically (a temporary file in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    strings = h5py.string_dtype("utf-8")
    with h5py.File(tmp, "w") as db:
        db["ids"] = np.array(gallery.ids, dtype=object).astype(strings)
        db["labels"] = gallery.labels.astype(np.int64)
        db["label_names"] = np.array(gallery.label_names, dtype=object).astype(strings)
        db["paths"] = np.array(gallery.paths, dtype=object).astype(strings)
        db["vectors"] = gallery.vectors.astype(np.float32)
        # The original embed.py's names for the same arrays.
        db["emb"] = db["vectors"]
        db["pids"] = db["labels"]
        db["fids"] = db["ids"]
        db.attrs["run_name"] = gallery.run_name
        db.attrs["step"] = gallery.step
    tmp.replace(path)


def read_gallery(path: Path) -> Gallery:
    if not path.is_file():
        raise FailedPrecondition(
            f"no embedding database {path}: run `python -m trainer embed -c CONFIG` first"
        )
    with h5py.File(path, "r") as db:
        return Gallery(
            ids=[s.decode() if isinstance(s, bytes) else s for s in db["ids"][()]],
            labels=db["labels"][()],
            label_names=[s.decode() if isinstance(s, bytes) else s for s in db["label_names"][()]],
            paths=[s.decode() if isinstance(s, bytes) else s for s in db["paths"][()]],
            vectors=db["vectors"][()],
            run_name=str(db.attrs.get("run_name", "")),
            step=int(db.attrs.get("step", 0)),
        )
