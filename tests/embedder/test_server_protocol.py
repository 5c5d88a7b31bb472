"""The local model server through TF Serving's official stubs: metadata, predict, status, reload,
labels, error codes and messages, REST, health and reflection (a real server process)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from cbir.processes import free_port, running_service
from embedder.client import EmbedderClient
from embedder.model_config import ModelEntry, VersionPolicy, format_model_server_config
from tests.support.tiny_model import reference_embedding
from trainer.synthetic import make_image

pytestmark = pytest.mark.slow

IMAGES = [make_image(i) for i in range(5)]


def config_text(repo, labels=None, policy=VersionPolicy("latest", 2)) -> str:
    return format_model_server_config([ModelEntry("tiny", str(repo / "tiny"), policy, labels or {})])


@pytest.fixture(scope="module")
def server(tiny_repo, tmp_path_factory):
    work = tmp_path_factory.mktemp("protocol")
    config = work / "models.config"
    config.write_text(config_text(tiny_repo, {"stable": 1, "canary": 2}))
    monitoring = work / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: true }")
    rest_port = free_port()
    with running_service(
        "embedder",
        "serve",
        "--model_config_file",
        str(config),
        "--rest_api_port",
        str(rest_port),
        "--monitoring_config_file",
        str(monitoring),
        "--log-format",
        "text",
        log_dir=work,
    ) as (proc, target):
        channel = grpc.insecure_channel(target)
        yield {
            "proc": proc,
            "target": target,
            "rest": f"http://127.0.0.1:{rest_port}",
            "repo": tiny_repo,
            "predict": prediction_service_pb2_grpc.PredictionServiceStub(channel),
            "models": model_service_pb2_grpc.ModelServiceStub(channel),
        }
        channel.close()
        assert proc.alive(), "the server died during the tests"


def predict_request(images, *, version=None, label=None, signature="", input_name="image_bytes"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    request.model_spec.signature_name = signature
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    return request


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=20)
    return caught.value


def test_health_and_reflection(server):
    channel = grpc.insecure_channel(server["target"])
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "grpc.health.v1.Health",
    } <= names
    channel.close()


def test_metadata_lists_the_signatures_of_the_latest_version(server):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "tiny"
    response = server["predict"].GetModelMetadata(request, timeout=20)
    assert response.model_spec.name == "tiny" and response.model_spec.version.value == 2
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    default = signatures.signature_def["serving_default"]
    assert (
        list(default.inputs) == ["image_bytes"]
        and default.inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    )
    assert [d.size for d in default.outputs["embedding"].tensor_shape.dim] == [-1, 8]
    assert "serving_pixels" in signatures.signature_def
    request.model_spec.version.value = 1
    assert server["predict"].GetModelMetadata(request, timeout=20).model_spec.version.value == 1


def test_metadata_errors(server):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "tiny"
    error = rpc_error(server["predict"].GetModelMetadata, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "metadata_field" in error.details()
    request.metadata_field.append("tags")
    error = rpc_error(server["predict"].GetModelMetadata, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "tags is not supported" in error.details()


@pytest.mark.parametrize(
    ("spec", "version"), [({}, 2), ({"version": 1}, 1), ({"label": "stable"}, 1), ({"label": "canary"}, 2)]
)
def test_predict_matches_the_saved_model(server, spec, version):
    response = server["predict"].Predict(predict_request(IMAGES, **spec), timeout=20)
    assert response.model_spec.name == "tiny" and response.model_spec.version.value == version
    assert response.model_spec.signature_name == "serving_default"
    got = tf.make_ndarray(response.outputs["embedding"])
    want = reference_embedding(server["repo"] / "tiny" / str(version), IMAGES)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_predict_pixels_signature(server):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    request.model_spec.signature_name = "serving_pixels"
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
    response = server["predict"].Predict(request, timeout=20)
    loaded = tf.saved_model.load(str(server["repo"] / "tiny" / "2"))
    want = loaded.signatures["serving_pixels"](pixels=tf.constant(pixels))["embedding"].numpy()
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["embedding"]), want, atol=1e-5)


def test_predict_errors_have_tf_serving_codes_and_messages(server):
    stub = server["predict"]
    cases = []
    request = predict_request(IMAGES)
    request.model_spec.name = "nope"
    cases.append((request, grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(nope)"))
    cases.append(
        (
            predict_request(IMAGES, version=9),
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Specific(tiny, 9)",
        )
    )
    cases.append(
        (
            predict_request(IMAGES, label="gold"),
            grpc.StatusCode.NOT_FOUND,
            "Unrecognized servable version label: gold",
        )
    )
    cases.append(
        (
            predict_request(IMAGES, input_name="images"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Missing but required: {image_bytes}",
        )
    )
    cases.append(
        (
            predict_request(IMAGES, signature="serving_nope"),
            grpc.StatusCode.FAILED_PRECONDITION,
            'Serving signature key "serving_nope" not found.',
        )
    )
    wrong_type = predict_request(IMAGES)
    wrong_type.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(np.zeros(2, np.float32)))
    cases.append((wrong_type, grpc.StatusCode.INVALID_ARGUMENT, "to be string but float is provided"))
    wrong_shape = predict_request(IMAGES)
    wrong_shape.inputs["image_bytes"].CopyFrom(
        tf.make_tensor_proto([IMAGES[:2], IMAGES[2:4]], dtype=tf.string)
    )
    cases.append((wrong_shape, grpc.StatusCode.INVALID_ARGUMENT, "has shape [2, 2]"))
    bad_filter = predict_request(IMAGES)
    bad_filter.output_filter.append("logits")
    cases.append(
        (bad_filter, grpc.StatusCode.INVALID_ARGUMENT, "output tensor alias not found in signature: logits")
    )
    corrupt = IMAGES[:2] + [b"not an image"] + IMAGES[2:]
    cases.append(
        (
            predict_request(corrupt),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image index 2 of the batch is invalid: Unknown image file format",
        )
    )
    for request, code, message in cases:
        error = rpc_error(stub.Predict, request)
        assert (error.code(), message in error.details()) == (code, True), (code, message, error.details())
    # A bad-input message names the signature's expected inputs.
    error = rpc_error(stub.Predict, predict_request(IMAGES, input_name="images"))
    assert "expects inputs: image_bytes (string [None])" in error.details()


@pytest.mark.parametrize("method", ["Classify", "Regress", "MultiInference"])
def test_unimplemented_methods(server, method):
    request = {"Classify": classification_pb2.ClassificationRequest}.get(method)
    from tensorflow_serving.apis import inference_pb2, regression_pb2

    request = {
        "Classify": classification_pb2.ClassificationRequest(),
        "Regress": regression_pb2.RegressionRequest(),
        "MultiInference": inference_pb2.MultiInferenceRequest(),
    }[method]
    error = rpc_error(getattr(server["predict"], method), request)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


def test_model_status(server):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "tiny"
    response = server["models"].GetModelStatus(request, timeout=20)
    states = {s.version: (s.state, s.status.error_code) for s in response.model_version_status}
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert states == {1: (available, 0), 2: (available, 0)}
    request.model_spec.version.value = 9
    error = rpc_error(server["models"].GetModelStatus, request)
    assert (
        error.code() == grpc.StatusCode.NOT_FOUND
        and "Could not find version 9 of model tiny" in error.details()
    )
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "nope"
    error = rpc_error(server["models"].GetModelStatus, request)
    assert error.code() == grpc.StatusCode.NOT_FOUND and "nope" in error.details()


def test_rest_api(server):
    body = json.dumps({"instances": [{"b64": base64.b64encode(i).decode()} for i in IMAGES[:2]]}).encode()
    answer = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(server["rest"] + "/v1/models/tiny/versions/1:predict", data=body),
            timeout=20,
        ).read()
    )
    want = reference_embedding(server["repo"] / "tiny" / "1", IMAGES[:2])
    np.testing.assert_allclose(np.array(answer["predictions"]), want, atol=1e-5)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 16, 16, 3)).round(2)
    body = json.dumps({"signature_name": "serving_pixels", "inputs": {"pixels": pixels.tolist()}}).encode()
    answer = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(server["rest"] + "/v1/models/tiny/labels/canary:predict", data=body),
            timeout=20,
        ).read()
    )
    loaded = tf.saved_model.load(str(server["repo"] / "tiny" / "2"))
    want = loaded.signatures["serving_pixels"](pixels=tf.constant(pixels, tf.float32))["embedding"].numpy()
    np.testing.assert_allclose(np.array(answer["outputs"]), want, atol=1e-5)
    status = json.loads(urllib.request.urlopen(server["rest"] + "/v1/models/tiny", timeout=20).read())
    assert {s["version"]: s["state"] for s in status["model_version_status"]} == {
        "1": "AVAILABLE",
        "2": "AVAILABLE",
    }
    metadata = json.loads(
        urllib.request.urlopen(server["rest"] + "/v1/models/tiny/metadata", timeout=20).read()
    )
    assert "serving_default" in metadata["metadata"]["signature_def"]["signature_def"]
    metrics = (
        urllib.request.urlopen(server["rest"] + "/monitoring/prometheus/metrics", timeout=20).read().decode()
    )
    assert "cbir_embedder_predict_requests_total" in metrics
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(
            urllib.request.Request(server["rest"] + "/v1/models/nope:predict", data=body), timeout=20
        )
    assert caught.value.code == 404 and "Latest(nope)" in json.loads(caught.value.read())["error"]
    bad = json.dumps({"instances": [{"b64": base64.b64encode(b"junk").decode()}]}).encode()
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(
            urllib.request.Request(server["rest"] + "/v1/models/tiny:predict", data=bad), timeout=20
        )
    assert caught.value.code == 400


def test_client_against_the_server(server):
    with EmbedderClient(server["target"], "tiny") as client:
        result = client.embed(IMAGES, version_label="stable")
        assert result.model_version == 1
        np.testing.assert_allclose(
            result.vectors, reference_embedding(server["repo"] / "tiny" / "1", IMAGES), atol=1e-5
        )
        assert client.model_versions() == {1: "AVAILABLE", 2: "AVAILABLE"}
        from cbir.errors import InvalidInput

        with pytest.raises(InvalidInput, match=r"^image 3 is invalid: Unknown image file format"):
            client.embed(IMAGES[:3] + [b"junk"] + IMAGES[3:])


def reload(server, text):
    request = model_management_pb2.ReloadConfigRequest()
    from google.protobuf import text_format

    request.config.CopyFrom(text_format.Parse(text, model_server_config_pb2.ModelServerConfig()))
    return server["models"].HandleReloadConfigRequest(request, timeout=60)


def test_reload_config_moves_labels_and_versions(server):
    repo = server["repo"]
    response = reload(server, config_text(repo, {"stable": 2}))
    assert response.status.error_code == 0
    answer = server["predict"].Predict(predict_request(IMAGES, label="stable"), timeout=20)
    assert answer.model_spec.version.value == 2
    # A label pointing to a version that is not loaded is refused, as TF Serving does.
    error = rpc_error(lambda r, timeout: reload(server, config_text(repo, {"stable": 7})), None)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "version 7 of model tiny, which is not currently available" in error.details()
    assert (
        server["predict"]
        .Predict(predict_request(IMAGES, label="stable"), timeout=20)
        .model_spec.version.value
        == 2
    )
    # Only version 1: version 2 is unloaded (END) and the latest answer comes from 1.
    reload(server, config_text(repo, policy=VersionPolicy("specific", versions=(1,))))
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "tiny"
    states = {
        s.version: s.state
        for s in server["models"].GetModelStatus(status_request, timeout=20).model_version_status
    }
    assert states == {
        1: get_model_status_pb2.ModelVersionStatus.AVAILABLE,
        2: get_model_status_pb2.ModelVersionStatus.END,
    }
    assert server["predict"].Predict(predict_request(IMAGES), timeout=20).model_spec.version.value == 1
    bad = model_management_pb2.ReloadConfigRequest()
    bad.config.model_config_list.config.add(name="x")
    error = rpc_error(server["models"].HandleReloadConfigRequest, bad)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "base_path" in error.details()


@pytest.mark.parametrize(
    "headers, body",
    [
        ("Content-Length: abc\r\n", b""),
        ("Content-Length: -5\r\n", b""),
        ("Content-Length: 4\r\n", b"\xff\xfe{["),  # not UTF-8
        ("Content-Length: 8\r\n", b'{"inst":'),  # truncated JSON
        ("Content-Length: 3000\r\n", b"[" * 1500 + b"]" * 1500),  # nested too deeply
    ],
    ids=["not-a-number", "negative", "bad-utf8", "truncated-json", "deep-nesting"],
)
def test_rest_rejects_malformed_requests_with_400_and_no_traceback(server, headers, body):
    import socket

    host, port = server["rest"].removeprefix("http://").split(":")
    before = len(server["proc"].log_text())
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(
            f"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode()
            + body
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"400", answer[:300]
    assert b'"error"' in rest
    assert "Traceback" not in server["proc"].log_text()[before:]
