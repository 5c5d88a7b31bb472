"""EmbedderClient against a scripted TF Serving fake speaking the official protos."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from cbir import errors
from embedder.client import EmbedderClient, ModelVersionUnavailable
from tests.embedder.fakes import FakeServing, start_fake


@pytest.fixture
def fake():
    serving = FakeServing()
    server, port = start_fake(serving)
    serving.target = f"127.0.0.1:{port}"
    yield serving
    server.stop(0)


def client_for(fake, **kwargs) -> EmbedderClient:
    return EmbedderClient(fake.target, "m", **kwargs)


def expected(images, version=1):
    return np.array([[len(i), i[0], version, 1.0] for i in images], dtype=np.float32)


def test_embeds_in_order_and_reports_the_version(fake):
    images = [bytes([i + 1]) * (10 + i) for i in range(5)]
    with client_for(fake) as client:
        result = client.embed(images)
    assert result.model_name == "m" and result.model_version == 1
    assert result.vectors.dtype == np.float32
    np.testing.assert_array_equal(result.vectors, expected(images))
    predict = [r for name, r in fake.calls if name == "Predict"][0]
    # Names come from GetModelMetadata; bytes travel in string_val.
    assert list(predict.inputs) == ["image_bytes"]
    assert list(predict.inputs["image_bytes"].string_val) == images
    assert list(predict.output_filter) == ["embedding"]
    assert predict.model_spec.signature_name == "serving_default"


def test_tensor_names_are_discovered_not_hard_coded(fake):
    fake.versions = {4: ("jpeg_in", "vec_out")}
    with client_for(fake) as client:
        assert client.signature().input_name == "jpeg_in"
        result = client.embed([b"abc"])
    assert result.model_version == 4
    np.testing.assert_array_equal(result.vectors, expected([b"abc"], 4))


def test_metadata_is_cached_per_version(fake):
    with client_for(fake) as client:
        for _ in range(3):
            client.embed([b"x"])
        client.embed([b"x"], version=1)
        assert fake.count("GetModelMetadata") == 1
        info = client.signature(1)
        assert (info.input_name, info.output_name, info.dim, info.model_version) == (
            "image_bytes",
            "embedding",
            4,
            1,
        )
        assert fake.count("GetModelMetadata") == 1


def test_a_new_latest_version_with_other_names_is_followed(fake):
    with client_for(fake) as client:
        assert client.embed([b"x"]).model_version == 1
        # Version 2 becomes latest and renames its tensors: the cached names are now wrong for an
        # unpinned call, which the server rejects; the client refreshes the metadata and follows.
        fake.versions = {1: ("image_bytes", "embedding"), 2: ("img", "emb")}
        result = client.embed([b"xy"])
    assert result.model_version == 2
    np.testing.assert_array_equal(result.vectors, expected([b"xy"], 2))


def test_version_switch_between_metadata_and_predict_repins(fake):
    fake.versions = {1: ("image_bytes", "embedding"), 2: ("image_bytes", "other_out")}
    with client_for(fake) as client:
        client._alias_versions[None] = 1  # as if version 1 was latest last time
        client._signatures[1] = client.signature(1)
        result = client.embed([b"abc"])
    # The server answered with version 2, whose output alias differs: the client asked again, pinned.
    assert result.model_version == 2
    np.testing.assert_array_equal(result.vectors, expected([b"abc"], 2))
    predicts = [r for name, r in fake.calls if name == "Predict"]
    assert predicts[-1].model_spec.version.value == 2
    assert list(predicts[-1].output_filter) == ["other_out"]


def test_pinned_version_and_label_go_into_the_model_spec(fake):
    fake.versions = {1: ("image_bytes", "embedding"), 2: ("image_bytes", "embedding")}
    with client_for(fake) as client:
        assert client.embed([b"a"], version=1).model_version == 1
        with pytest.raises(ModelVersionUnavailable, match="version label 'canary'"):
            client.embed([b"a"], version_label="canary")
        with pytest.raises(errors.InvalidInput, match="not both"):
            client.embed([b"a"], version=1, version_label="x")
    predict = [r for name, r in fake.calls if name == "Predict"][0]
    assert predict.model_spec.version.value == 1


def test_retries_unavailable_then_succeeds(fake):
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, "restarting")] * 2
    with client_for(fake, max_retries=3) as client:
        result = client.embed([b"abc"])
    np.testing.assert_array_equal(result.vectors, expected([b"abc"]))
    assert fake.count("Predict") == 3


def test_gives_up_after_max_retries_with_not_ready(fake):
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, "down")] * 10
    with client_for(fake, max_retries=2) as client:
        with pytest.raises(errors.NotReady, match="after 3 attempt"):
            client.embed([b"abc"])
    assert fake.count("Predict") == 3


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.INTERNAL, errors.CbirError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.ABORTED, errors.Aborted),
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidInput),
    ],
)
def test_other_errors_are_not_retried(fake, code, error):
    fake.failures = [(code, "nope")] * 5
    with client_for(fake, max_retries=3) as client:
        with pytest.raises(error, match="nope"):
            client.embed([b"abc"])
    assert fake.count("Predict") == 1


def test_not_found_is_model_version_unavailable_naming_what_is_available(fake):
    with client_for(fake) as client:
        with pytest.raises(ModelVersionUnavailable, match=r"version 9 .*available versions: \[1\]") as caught:
            client.embed([b"a"], version=9)
    assert isinstance(caught.value, errors.NotReady)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    with EmbedderClient(fake.target, "unknown") as other:
        with pytest.raises(ModelVersionUnavailable, match="not served"):
            other.embed([b"a"])


def test_deadline_exceeded(fake):
    fake.delay = 0.5
    with client_for(fake) as client:
        client.signature()
        with pytest.raises(errors.DeadlineExceeded):
            client.embed([b"a"], timeout=0.2)


def test_unreachable_server_is_not_ready():
    with EmbedderClient("127.0.0.1:1", "m", timeout=3, max_retries=1) as client:
        with pytest.raises(errors.NotReady, match="unavailable"):
            client.embed([b"a"])


def test_large_batches_are_split_under_the_message_limit(fake):
    limit = 200_000
    images = [bytes([i % 250 + 1]) * 30_000 for i in range(20)]
    with client_for(fake, max_message_bytes=limit) as client:
        result = client.embed(images)
    np.testing.assert_array_equal(result.vectors, expected(images))
    predicts = [r for name, r in fake.calls if name == "Predict"]
    assert len(predicts) > 1
    assert all(r.ByteSize() < limit for r in predicts)
    assert sum(len(r.inputs["image_bytes"].string_val) for r in predicts) == 20


def test_batches_are_split_by_image_count_too(fake):
    images = [bytes([i + 1]) for i in range(10)]
    with client_for(fake, max_batch_images=3) as client:
        result = client.embed(images)
    np.testing.assert_array_equal(result.vectors, expected(images))
    assert [len(r.inputs["image_bytes"].string_val) for n, r in fake.calls if n == "Predict"] == [3, 3, 3, 1]


def test_an_image_larger_than_a_message_is_rejected_up_front(fake):
    with client_for(fake, max_message_bytes=100_000) as client:
        with pytest.raises(errors.ResourceExhausted, match="image 1 "):
            client.embed([b"a", b"b" * 200_000])
    assert fake.count("Predict") == 0


def test_a_bad_image_is_named_by_its_index_in_the_whole_call(fake):
    images = [bytes([i + 1]) * 3 for i in range(8)]
    images[5] = b"bad"
    with client_for(fake, max_batch_images=3) as client:
        with pytest.raises(errors.InvalidInput, match=r"^image 5 is invalid: Unknown image file format"):
            client.embed(images)


def test_empty_input_and_empty_image(fake):
    with client_for(fake) as client:
        result = client.embed([])
        assert result.vectors.shape == (0, 4)
        with pytest.raises(errors.InvalidInput, match="image 1 is empty"):
            client.embed([b"a", b""])


def test_model_versions(fake):
    fake.versions = {1: ("a", "b"), 3: ("a", "b")}
    with client_for(fake) as client:
        assert client.model_versions() == {1: "AVAILABLE", 3: "AVAILABLE"}


def test_round_robin_over_replicas():
    fakes, servers, ports = [], [], []
    for _ in range(2):
        serving = FakeServing()
        server, port = start_fake(serving)
        fakes.append(serving)
        servers.append(server)
        ports.append(port)
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
        with EmbedderClient(target, "m") as client:
            for _ in range(10):
                client.embed([b"a"])
        assert all(f.count("Predict") >= 3 for f in fakes), [f.count("Predict") for f in fakes]
    finally:
        for server in servers:
            server.stop(0)


def test_dns_target(fake):
    port = fake.target.rsplit(":", 1)[1]
    with EmbedderClient(f"dns:///127.0.0.1:{port}", "m") as client:
        assert client.embed([b"a"]).model_version == 1
