"""One loaded version in-process: input checks, bad-image index, warmup replay, version scanning."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from cbir.errors import FailedPrecondition, InvalidInput
from embedder.model_manager import scan_versions
from embedder.servable import WARMUP_FILE, Servable
from tests.support.tiny_model import export_tiny_model, reference_embedding
from trainer.synthetic import make_image

IMAGES = [make_image(i) for i in range(4)]


@pytest.fixture(scope="module")
def servable(tiny_repo):
    return Servable("tiny", 1, tiny_repo / "tiny" / "1")


def test_runs_like_the_saved_model(servable, tiny_repo):
    signature = servable.signature("")
    inputs = servable.check_inputs(signature, {"image_bytes": np.array(IMAGES, dtype=object)})
    out = servable.run(signature, inputs)
    np.testing.assert_allclose(
        out["embedding"], reference_embedding(tiny_repo / "tiny" / "1", IMAGES), atol=1e-6
    )
    assert set(servable.signature_defs) >= {"serving_default", "serving_pixels"}


def test_input_checks(servable):
    signature = servable.signature("serving_default")
    with pytest.raises(
        InvalidInput, match=r"Missing but required: \{image_bytes\}.*expects inputs: image_bytes"
    ):
        servable.check_inputs(signature, {"images": np.array(IMAGES, dtype=object)})
    with pytest.raises(InvalidInput, match="to be string but float is provided"):
        servable.check_inputs(signature, {"image_bytes": np.zeros(2, np.float32)})
    pixels = servable.signature("serving_pixels")
    with pytest.raises(InvalidInput, match=r"has shape \[1, 8, 8, 3\]"):
        servable.check_inputs(pixels, {"pixels": np.zeros((1, 8, 8, 3), np.float32)})
    # Integer pixels are a different dtype: refused, not silently cast.
    with pytest.raises(InvalidInput, match="to be float but int64 is provided"):
        servable.check_inputs(pixels, {"pixels": np.zeros((1, 16, 16, 3), np.int64)})
    with pytest.raises(FailedPrecondition, match='Serving signature key "nope" not found.'):
        servable.signature("nope")


def test_the_bad_image_of_a_batch_is_named(servable):
    signature = servable.signature("")
    batch = np.array(IMAGES[:3] + [b"\x89PNG broken"] + IMAGES[3:], dtype=object)
    with pytest.raises(InvalidInput, match="^image index 3 of the batch is invalid: "):
        servable.run(signature, {"image_bytes": batch})


def _warmup_record(inputs: dict, signature: str = "serving_default") -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    request.model_spec.signature_name = signature
    for alias, value in inputs.items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    ).SerializeToString()


def test_warmup_replays_the_recorded_requests(tmp_path):
    path = export_tiny_model(tmp_path, "tiny", version=3)
    (path / WARMUP_FILE).parent.mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(path / WARMUP_FILE)) as writer:
        writer.write(_warmup_record({"image_bytes": tf.constant(IMAGES[:2])}))
        writer.write(_warmup_record({"pixels": np.zeros((2, 16, 16, 3), np.float32)}, "serving_pixels"))
    seen = []
    servable = Servable("tiny", 3, path)
    assert servable.warm_up(lambda sig, inputs: seen.append(sig.name) or servable.run(sig, inputs)) == 2
    assert seen == ["serving_default", "serving_pixels"]


def test_a_broken_warmup_request_fails_the_load(tmp_path):
    path = export_tiny_model(tmp_path, "tiny", version=3)
    (path / WARMUP_FILE).parent.mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(path / WARMUP_FILE)) as writer:
        writer.write(_warmup_record({"wrong": tf.constant(IMAGES[:1])}))
    with pytest.raises(InvalidInput, match="Missing but required"):
        Servable("tiny", 3, path).warm_up()


def test_without_warmup_file_one_generated_image_runs(servable):
    assert servable.warm_up() == 1


def test_scan_versions_ignores_what_tf_serving_ignores(tmp_path):
    base = tmp_path / "m"
    for name in ("1", "12", "abc", ".3-staging", "4", "-5", "6"):
        (base / name).mkdir(parents=True)
    for name in ("1", "12", "abc", ".3-staging", "-5"):
        (base / name / "saved_model.pb").write_bytes(b"x")
    (base / "6" / "saved_model.pbtxt").write_text("")
    (base / "7").write_text("a file, not a directory")
    assert sorted(scan_versions(base)) == [1, 6, 12]
    assert scan_versions(tmp_path / "missing") == {}


@pytest.mark.parametrize(
    "value",
    [
        np.random.default_rng(0).random((3, 8), dtype=np.float32),
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.array([True, False]),
        np.zeros((0, 4), np.float32),
        np.array([b"a", b"bc"], dtype=object),
    ],
)
def test_answers_convert_to_tensor_protos_exactly(value):
    from embedder.server import array_to_tensor

    back = tf.make_ndarray(array_to_tensor(value))
    assert back.shape == value.shape
    np.testing.assert_array_equal(back, value)


@pytest.mark.parametrize(
    "value",
    [
        np.array([b"\xff\xd8jpeg", b"", b"a\x00b"], dtype=object),
        np.array([], dtype=object),
        np.array([[b"a", b"b"]], dtype=object),  # 2-D: the general path
    ],
)
def test_string_tensors_convert_exactly_like_make_ndarray(value):
    from embedder.server import tensor_to_array

    proto = tf.make_tensor_proto(value)
    got, want = tensor_to_array("image_bytes", proto), tf.make_ndarray(proto)
    assert got.dtype == want.dtype and got.shape == want.shape and got.tolist() == want.tolist()
