"""SavedModel export: the contract's signatures, the same embeddings after reloading, metadata, warmup."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from cbir.errors import AlreadyExists, InvalidInput
from trainer.config import load_config
from trainer.embedding import build_model
from trainer.export import METADATA_FILE, WARMUP_FILE, export_model
from trainer.preprocessing import preprocess_image_bytes
from trainer.synthetic import TINY_OVERRIDES, make_image

CONFIG = "bags_resnet_v1_50_normalize_adam_triplet_semihard_loss_m_0.2"


@pytest.fixture(scope="module")
def config():
    # An un-normalised head: the export itself must L2-normalise.
    return load_config(CONFIG, [*TINY_OVERRIDES, "model.head=direct"])


@pytest.fixture(scope="module")
def exported(config, tmp_path_factory):
    keras_model = build_model(config, weights=None)
    repo = tmp_path_factory.mktemp("models")
    path = export_model(keras_model, config, repo, model_name="bags", evaluation={"recall@1": 0.5})
    return keras_model, repo, path


def _images(count: int) -> list[bytes]:
    formats = ["PNG", "JPEG", "GIF", "BMP"]
    return [make_image(i, size=30 + 7 * i, fmt=formats[i % 4], label=i % 3) for i in range(count)]


def _in_process(keras_model, config, images):
    pixels = tf.stack(
        [preprocess_image_bytes(tf.constant(b), config.model.input, config.model.resize) for b in images]
    )
    return tf.math.l2_normalize(keras_model(pixels, training=False), axis=1).numpy(), pixels


def test_reloaded_model_gives_the_in_process_embeddings(config, exported):
    keras_model, _, path = exported
    assert path.name == "1" and (path / "saved_model.pb").is_file()
    loaded = tf.saved_model.load(str(path))
    images = _images(6)
    expected, pixels = _in_process(keras_model, config, images)
    got = loaded.signatures["serving_default"](image_bytes=tf.constant(images))["embedding"].numpy()
    assert got.shape == (6, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    by_pixels = loaded.signatures["serving_pixels"](pixels=pixels)["embedding"].numpy()
    np.testing.assert_allclose(by_pixels, expected, atol=1e-5)


def test_signature_names_and_metadata(config, exported):
    _, _, path = exported
    loaded = tf.saved_model.load(str(path))
    default = loaded.signatures["serving_default"]
    assert list(default.structured_input_signature[1]) == ["image_bytes"]
    assert list(default.structured_outputs) == ["embedding"]
    pixels_spec = loaded.signatures["serving_pixels"].structured_input_signature[1]["pixels"]
    assert pixels_spec.shape.as_list() == [None, 32, 32, 3]
    meta = json.loads((path / "assets.extra" / METADATA_FILE).read_text())
    assert meta["format"] == "cbir.model.v1" and meta["model_name"] == "bags" and meta["version"] == 1
    assert meta["backbone"] == "small_cnn" and meta["head"] == "direct" and meta["embedding_dim"] == 16
    assert meta["metric"] == "cosine"
    assert meta["input"] == {"height": 32, "width": 32} and meta["resize"] == {"height": 40, "width": 40}
    assert "center crop" in meta["preprocessing"]
    assert meta["config"] == config.to_json() and meta["evaluation"] == {"recall@1": 0.5}


def test_warmup_requests_parse_and_run(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    _, _, path = exported
    loaded = tf.saved_model.load(str(path))
    records = list(tf.data.TFRecordDataset(str(path / "assets.extra" / WARMUP_FILE)).as_numpy_iterator())
    assert records
    for record in records:
        log = prediction_log_pb2.PredictionLog.FromString(record)
        request = log.predict_log.request
        assert request.model_spec.name == "bags"
        assert request.model_spec.signature_name == "serving_default"
        images = tf.make_ndarray(request.inputs["image_bytes"])
        out = loaded.signatures["serving_default"](image_bytes=tf.constant(images))["embedding"]
        assert out.shape == (len(images), 16)


@pytest.mark.parametrize(
    "bad, expected",
    [(b"", "image_bytes\\[2\\] is empty"), (b"not an image at all", "image_bytes\\[2\\] is not a JPEG")],
)
def test_a_corrupt_image_in_a_batch_is_named_by_its_index(exported, bad, expected):
    _, _, path = exported
    loaded = tf.saved_model.load(str(path))
    batch = _images(2) + [bad] + _images(1)
    with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
        loaded.signatures["serving_default"](image_bytes=tf.constant(batch))


def test_versions_grow_and_publishing_is_atomic(config, exported):
    keras_model, repo, _ = exported
    second = export_model(keras_model, config, repo, model_name="bags")
    assert second.name == "2"
    with pytest.raises(AlreadyExists, match="versions only grow"):
        export_model(keras_model, config, repo, model_name="bags", version=2)
    assert export_model(keras_model, config, repo, model_name="bags", version=7).name == "7"
    with pytest.raises(InvalidInput, match="model name"):
        export_model(keras_model, config, repo, model_name="../escape")
    # No staging folder is left behind, and only complete versions are visible.
    assert sorted(p.name for p in (repo / "bags").iterdir()) == ["1", "2", "7"]
