"""A tiny SavedModel that follows the model contract (docs/architecture.md, Model), for tests.

It lets the serving, indexer and gateway tests run without training: a fixed random projection of a
small centre-cropped thumbnail, L2-normalised. Different seeds give different embedding spaces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from trainer.export import publish_version

INPUT_SIZE = 16
RESIZE_SIZE = 20


def _preprocess(image_bytes: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image = tf.image.resize(tf.cast(image, tf.float32), (RESIZE_SIZE, RESIZE_SIZE))
    offset = (RESIZE_SIZE - INPUT_SIZE) // 2
    image = image[offset : offset + INPUT_SIZE, offset : offset + INPUT_SIZE, :]
    image.set_shape((INPUT_SIZE, INPUT_SIZE, 3))
    return image


class TinyEmbedder(tf.Module):
    def __init__(self, dim: int, seed: int, broken: bool = False):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.projection = tf.Variable(
            rng.standard_normal((INPUT_SIZE * INPUT_SIZE * 3, dim)).astype(np.float32), trainable=False
        )
        self.broken = broken

    def _embed_pixels(self, pixels: tf.Tensor) -> tf.Tensor:
        pixels = pixels / 255.0 - 0.5
        if self.broken:
            # Each image's own mean colour removed: only its noise is left, which says nothing of
            # its class (trainer/synthetic.py gives a class its colour).
            pixels = pixels - tf.reduce_mean(pixels, axis=(1, 2), keepdims=True)
        flat = tf.reshape(pixels, (-1, INPUT_SIZE * INPUT_SIZE * 3))
        return tf.math.l2_normalize(tf.matmul(flat, self.projection), axis=1)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        pixels = tf.map_fn(_preprocess, image_bytes, fn_output_signature=tf.float32)
        return {"embedding": self._embed_pixels(pixels)}

    @tf.function(
        input_signature=[tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.float32, name="pixels")]
    )
    def serve_pixels(self, pixels):
        return {"embedding": self._embed_pixels(pixels)}


def export_tiny_model(
    model_repo: Path, name: str = "tiny", version: int = 1, dim: int = 8, seed: int = 0, broken: bool = False
) -> Path:
    """Publishes ``<model_repo>/<name>/<version>/`` with trainer/export.py's writer and returns it.

    ``broken``: a model that follows the contract but ranks images of a class no better than chance
    (what an export of a failed training run looks like to the rollout's quality gate).
    """
    module = TinyEmbedder(dim, seed, broken)
    return publish_version(
        module,
        model_repo,
        name,
        version,
        signatures={"serving_default": module.serve_bytes, "serving_pixels": module.serve_pixels},
        metadata={
            "backbone": "tiny_projection",
            "embedding_dim": dim,
            "metric": "cosine",
            "input": {"height": INPUT_SIZE, "width": INPUT_SIZE},
            "resize": {"height": RESIZE_SIZE, "width": RESIZE_SIZE},
            "preprocessing": f"decode, resize to {RESIZE_SIZE}x{RESIZE_SIZE}, center crop "
            f"{INPUT_SIZE}x{INPUT_SIZE}, /255 - 0.5",
            "seed": seed,
            "broken": broken,
        },
    )


def reference_embedding(model_dir: Path, images: list[bytes]) -> np.ndarray:
    """Embeddings computed in-process from the SavedModel, to compare a server's answers with."""
    loaded = tf.saved_model.load(str(model_dir))
    out = loaded.signatures["serving_default"](image_bytes=tf.constant(images))
    return out["embedding"].numpy()
