"""Undecodable request messages (raw bytes on the wire) get INVALID_ARGUMENT from every real service.

The model server, the indexer and the gateway of the shared end-to-end stack each receive messages
that no protobuf parser accepts: invalid UTF-8 in a string field, truncated and garbage bytes, on
unary RPCs, on the indexer's Upsert request stream, and on health and reflection. Each answer names
the message type, no service logs a traceback, and every service keeps serving.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_pb2, predict_pb2

from cbir.v1 import indexer_pb2, search_pb2, types_pb2
from tests.gateway.stack import AUTH

pytestmark = pytest.mark.slow

INDEXER = "/cbir.v1.IndexerService/"
SEARCH = "/cbir.v1.SearchService/"
PREDICT = "/tensorflow.serving.PredictionService/Predict"
HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def bad_utf8(message) -> bytes:
    """``message`` serialized with its placeholder string "@@" replaced by bytes that are not UTF-8."""
    data = message.SerializeToString()
    assert data.count(b"@@") == 1
    return data.replace(b"@@", b"\xff\xfe")


def truncated(message) -> bytes:
    data = message.SerializeToString()
    return data[: len(data) // 2]


GARBAGE = b"\xff\xff\xff\xff\xff\xff\xff\xff"
FILTER = types_pb2.Filter(labels=["@@"])

# (service, method, message type, raw request)
UNARY_CASES = {
    "indexer_get_item_id_utf8": (
        "indexer",
        INDEXER + "Get",
        "cbir.v1.GetRequest",
        bad_utf8(indexer_pb2.GetRequest(ids=["x", "@@"])),
    ),
    "indexer_knn_filter_label_utf8": (
        "indexer",
        INDEXER + "Knn",
        "cbir.v1.KnnRequest",
        bad_utf8(indexer_pb2.KnnRequest(k=1, filter=FILTER)),
    ),
    "indexer_delete_truncated": (
        "indexer",
        INDEXER + "Delete",
        "cbir.v1.DeleteRequest",
        truncated(indexer_pb2.DeleteRequest(ids=["an-item-id-long-enough-to-cut"])),
    ),
    "indexer_stats_garbage": ("indexer", INDEXER + "Stats", "cbir.v1.StatsRequest", GARBAGE),
    "gateway_search_item_id_utf8": (
        "gateway",
        SEARCH + "Search",
        "cbir.v1.SearchRequest",
        bad_utf8(search_pb2.SearchRequest(item_id="@@")),
    ),
    "gateway_search_filter_label_utf8": (
        "gateway",
        SEARCH + "Search",
        "cbir.v1.SearchRequest",
        bad_utf8(search_pb2.SearchRequest(item_id="item-0", filter=FILTER)),
    ),
    "gateway_search_truncated_image": (
        "gateway",
        SEARCH + "Search",
        "cbir.v1.SearchRequest",
        truncated(search_pb2.SearchRequest(image=b"\x89PNG" + b"\0" * 100)),
    ),
    "gateway_batch_garbage": ("gateway", SEARCH + "BatchSearch", "cbir.v1.BatchSearchRequest", GARBAGE),
    "serving_predict_model_name_utf8": (
        "serving",
        PREDICT,
        "tensorflow.serving.PredictRequest",
        bad_utf8(predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="@@"))),
    ),
    "serving_predict_garbage": ("serving", PREDICT, "tensorflow.serving.PredictRequest", GARBAGE),
}


@pytest.fixture(autouse=True)
def no_traceback_logged(e2e):
    """Each test's requests leave no traceback (nor grpcio's deserializing error) in any service's log."""
    procs = (e2e.serving_proc, e2e.indexer_proc, e2e.gateway.proc)
    marks = [len(p.log_text()) for p in procs]
    yield
    for proc, mark in zip(procs, marks, strict=True):
        new = proc.log_text()[mark:]
        assert "Traceback" not in new and "Exception deserializing" not in new, new[-3000:]


def targets(e2e) -> dict[str, str]:
    return {"serving": e2e.serving, "indexer": e2e.indexer, "gateway": e2e.gateway.target}


def expect_invalid(call, type_name: str) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
    assert f"request is not a valid {type_name}" in exc.value.details()


@pytest.mark.parametrize("case", sorted(UNARY_CASES))
def test_undecodable_unary_request(e2e, case):
    service, method, type_name, raw = UNARY_CASES[case]
    with grpc.insecure_channel(targets(e2e)[service]) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        expect_invalid(lambda: call(raw, timeout=10, metadata=AUTH), type_name)


def test_undecodable_message_in_the_upsert_stream(e2e):
    # An empty first message names the generation and writes nothing, so the shared index is unchanged.
    empty = indexer_pb2.UpsertRequest(generation="tiny-v1").SerializeToString()
    with grpc.insecure_channel(e2e.indexer) as channel:
        upsert = channel.stream_unary(INDEXER + "Upsert", request_serializer=None, response_deserializer=None)
        for raw in (
            bad_utf8(indexer_pb2.UpsertRequest(generation="@@")),
            bad_utf8(
                indexer_pb2.UpsertRequest(
                    records=[indexer_pb2.Record(item=types_pb2.Item(id="@@"), vector=[0.0])]
                )
            ),
            GARBAGE,
        ):
            expect_invalid(lambda r=raw: upsert(iter([empty, r]), timeout=10), "cbir.v1.UpsertRequest")
        assert indexer_pb2.UpsertResponse.FromString(upsert(iter([empty]), timeout=10)).upserted == 0


@pytest.mark.parametrize("service", ["serving", "indexer", "gateway"])
def test_undecodable_health_and_reflection_requests(e2e, service):
    with grpc.insecure_channel(targets(e2e)[service]) as channel:
        check = channel.unary_unary(HEALTH, request_serializer=None, response_deserializer=None)
        expect_invalid(
            lambda: check(bad_utf8(health_pb2.HealthCheckRequest(service="@@")), timeout=10),
            "grpc.health.v1.HealthCheckRequest",
        )
        reflect = channel.stream_stream(REFLECTION, request_serializer=None, response_deserializer=None)
        expect_invalid(
            lambda: list(reflect(iter([GARBAGE]), timeout=10)),
            "grpc.reflection.v1alpha.ServerReflectionRequest",
        )
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
