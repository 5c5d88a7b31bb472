"""SavedModel export for TF Serving (docs/architecture.md, Model; docs/architecture.md, Repository).

``<repo>/<name>/<version>/`` with the next integer version, written into a hidden staging folder beside
it and renamed into place, because TF Serving polls the repository and would load a half-written one.
Signatures: ``serving_default`` (encoded ``image_bytes`` -> L2-normalised ``embedding``, decoding and the
inference preprocessing inside the graph) and ``serving_pixels`` (preprocessed float ``pixels``).
``assets.extra/`` holds ``cbir_model.json`` (metadata) and ``tf_serving_warmup_requests``.

:func:`publish_version` is the one writer of that layout: :func:`export_model` publishes a trained
Keras model through it, and so do the tests' tiny model and the benchmarks' models.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cbir.errors import AlreadyExists, InvalidInput
from trainer.backbones import backbone_spec
from trainer.config import Size, TrainingConfig
from trainer.preprocessing import describe, preprocess_image_bytes

FORMAT = "cbir.model.v1"
INPUT_BYTES = "image_bytes"
INPUT_PIXELS = "pixels"
OUTPUT = "embedding"
WARMUP_FILE = "tf_serving_warmup_requests"
METADATA_FILE = "cbir_model.json"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_image(image_bytes: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """Asserts the bytes look like an image TF can decode; the error message names the batch index."""
    # Padding makes every prefix slice valid, even of an empty string (substr past the end is an error).
    padded = tf.strings.join([image_bytes, tf.constant(b"\0" * 12)])
    head4 = tf.strings.substr(padded, 0, 4)
    known = tf.reduce_any(
        tf.stack(
            [
                tf.equal(tf.strings.substr(padded, 0, 3), b"\xff\xd8\xff"),  # JPEG
                tf.equal(head4, b"\x89PNG"),
                tf.equal(head4, b"GIF8"),
                tf.equal(tf.strings.substr(padded, 0, 2), b"BM"),
                tf.logical_and(tf.equal(head4, b"RIFF"), tf.equal(tf.strings.substr(padded, 8, 4), b"WEBP")),
            ]
        )
    )
    size = tf.strings.length(image_bytes)
    # One assertion with one message, so the error says the right thing whatever order ops run in.
    message = tf.where(
        size > 0,
        tf.strings.format(
            "image_bytes[{}] is not a JPEG, PNG, GIF, BMP or WebP image ({} bytes)", (index, size)
        ),
        tf.strings.format("image_bytes[{}] is empty", index),
    )
    check = tf.debugging.Assert(tf.logical_and(size > 0, known), [message], name="image_is_decodable")
    with tf.control_dependencies([check]):
        return tf.identity(image_bytes)


class EmbeddingExport(tf.Module):
    """The serving graph: a Keras embedding model behind the two signatures of the contract."""

    def __init__(self, model: keras.Model, input_size: Size, resize: Size):
        super().__init__()
        self.model = model
        self._input_size, self._resize = input_size, resize
        h, w = input_size.height, input_size.width
        self.serve_bytes = tf.function(
            self._serve_bytes, input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_BYTES)]
        )
        self.serve_pixels = tf.function(
            self._serve_pixels,
            input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32, name=INPUT_PIXELS)],
        )

    def _embed(self, pixels: tf.Tensor) -> tf.Tensor:
        return tf.math.l2_normalize(tf.cast(self.model(pixels, training=False), tf.float32), axis=1)

    def _serve_bytes(self, image_bytes):
        count = tf.shape(image_bytes)[0]

        def one(args):
            data, index = args
            return preprocess_image_bytes(_check_image(data, index), self._input_size, self._resize)

        pixels = tf.map_fn(
            one,
            (image_bytes, tf.range(count)),
            fn_output_signature=tf.TensorSpec(
                [self._input_size.height, self._input_size.width, 3], tf.float32
            ),
        )
        return {OUTPUT: self._embed(pixels)}

    def _serve_pixels(self, pixels):
        return {OUTPUT: self._embed(pixels)}


def next_version(model_dir: Path) -> int:
    versions = (
        [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        if model_dir.is_dir()
        else []
    )
    return max(versions, default=0) + 1


def _warmup_records(path: Path, model_name: str, resize: Size) -> int:
    """Writes warmup PredictionLogs (batches of 1 and 4 generated JPEGs); returns how many."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (resize.height, resize.width, 3), dtype=np.uint8)
    jpeg = tf.io.encode_jpeg(tf.constant(pixels)).numpy()
    count = 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in (1, 4):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default")
            )
            request.inputs[INPUT_BYTES].CopyFrom(tf.make_tensor_proto([jpeg] * batch, dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
            count += 1
    return count


def publish_version(
    module: tf.Module,
    model_repo: Path,
    model_name: str,
    version: int,
    *,
    signatures: Mapping[str, Callable[..., Any]],
    metadata: Mapping[str, Any],
    warmup: Callable[[Path], object] | None = None,
) -> Path:
    """Publishes ``module`` as ``<model_repo>/<model_name>/<version>/`` atomically and returns its path.

    ``assets.extra/cbir_model.json`` holds ``metadata`` after the format, name and version;
    ``warmup(path)``, when given, writes TF Serving's warmup requests to ``path``. Which version
    numbers are allowed is the caller's rule (the trainer's: they only grow), except that an existing
    version is never replaced.
    """
    model_dir = _model_dir(model_repo, model_name)
    if version < 1:
        raise InvalidInput(f"--version must be a positive integer, got {version}")
    final = model_dir / str(version)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-staging-", dir=model_dir))
    try:
        tf.saved_model.save(module, str(staging), signatures=dict(signatures))
        extra = staging / "assets.extra"
        extra.mkdir(exist_ok=True)
        if warmup is not None:
            warmup(extra / WARMUP_FILE)
        described = {"format": FORMAT, "model_name": model_name, "version": version, **metadata}
        (extra / METADATA_FILE).write_text(json.dumps(described, indent=2) + "\n")
        if final.exists():
            raise AlreadyExists(f"{final} appeared while exporting (another export?); nothing was changed")
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _model_dir(model_repo: Path, model_name: str) -> Path:
    if not _MODEL_NAME.match(model_name):
        raise InvalidInput(f"model name {model_name!r}: use letters, digits, '_', '-' and '.'")
    model_dir = Path(model_repo) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    return model_dir


def export_model(
    model: keras.Model,
    config: TrainingConfig,
    model_repo: Path,
    *,
    model_name: str,
    version: int | None = None,
    evaluation: dict | None = None,
    extra_metadata: dict | None = None,
) -> Path:
    """Publishes ``<model_repo>/<model_name>/<version>/`` atomically and returns its path; versions
    only grow (``version`` None is the next one)."""
    newest = next_version(_model_dir(model_repo, model_name)) - 1
    if version is None:
        version = newest + 1
    elif 1 <= version <= newest:  # below 1 is publish_version's error
        raise AlreadyExists(
            f"{Path(model_repo) / model_name} already has version {newest}; versions only grow "
            f"(omit --version for {newest + 1})"
        )
    m = config.model
    module = EmbeddingExport(model, m.input, m.resize)
    metadata = {
        "backbone": m.name,
        "head": m.head,
        "embedding_dim": int(model.output_shape[-1]),
        "metric": "cosine",
        "input": {"height": m.input.height, "width": m.input.width},
        "resize": {"height": m.resize.height, "width": m.resize.width},
        "preprocessing": describe(m.input, m.resize),
        "backbone_preprocessing": backbone_spec(m.name).preprocessing,
        "signatures": {
            "serving_default": {
                "inputs": {INPUT_BYTES: "string [batch]"},
                "outputs": {OUTPUT: "float32 [batch, D]"},
            },
            "serving_pixels": {
                "inputs": {INPUT_PIXELS: f"float32 [batch, {m.input.height}, {m.input.width}, 3]"},
                "outputs": {OUTPUT: "float32 [batch, D]"},
            },
        },
        "config": config.to_json(),
        "evaluation": evaluation or {},
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra_metadata or {}),
    }
    return publish_version(
        module,
        model_repo,
        model_name,
        version,
        signatures={"serving_default": module.serve_bytes, "serving_pixels": module.serve_pixels},
        metadata=metadata,
        warmup=lambda path: _warmup_records(path, model_name, m.resize),
    )
