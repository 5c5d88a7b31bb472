"""The shared server bootstrap: error mapping, request ids, health, reflection, metrics, shutdown."""

import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cbir import errors
from cbir.server import ServerOptions, start_server
from cbir.v1 import indexer_pb2

SERVICE = "test.Echo"


def _identity(x):
    return x


def _echo(request: bytes, context):
    text = request.decode()
    if text == "invalid":
        raise errors.InvalidInput("k must be between 1 and 1000, got 0")
    if text == "missing":
        raise errors.NotFound("item 'x' not found")
    if text == "dependency":
        raise _FakeRpcError(grpc.StatusCode.UNAVAILABLE, "indexer down")
    if text == "dependency-bug":
        raise _FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "internal mismatch")
    if text == "bug":
        raise ZeroDivisionError("secret detail")
    return request


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.fixture(scope="module")
def server():
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {"Echo": grpc.unary_unary_rpc_method_handler(_echo, _identity, _identity)},
    )
    running = start_server(
        ServerOptions("test", host="127.0.0.1", port=0, metrics_port=0),
        [(lambda _servicer, srv: srv.add_generic_rpc_handlers((handler,)), None)],
        [SERVICE],
    )
    yield running
    running.stop(0)


@pytest.fixture()
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def call(channel, payload: bytes, metadata=()):
    method = channel.unary_unary(f"/{SERVICE}/Echo", _identity, _identity)
    return method.with_call(payload, timeout=5, metadata=metadata)


def test_success_echoes_and_returns_request_id(channel):
    answer, call_info = call(channel, b"hello", metadata=(("x-request-id", "req-42"),))
    assert answer == b"hello"
    assert ("x-request-id", "req-42") in tuple(call_info.trailing_metadata())


@pytest.mark.parametrize(
    "payload, code, fragment",
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, "k must be between"),
        (b"missing", grpc.StatusCode.NOT_FOUND, "item 'x' not found"),
        (b"dependency", grpc.StatusCode.UNAVAILABLE, "indexer down"),
        (b"dependency-bug", grpc.StatusCode.INTERNAL, "internal error"),
        (b"bug", grpc.StatusCode.INTERNAL, "internal error"),
    ],
)
def test_errors_map_to_status(channel, payload, code, fragment):
    with pytest.raises(grpc.RpcError) as exc:
        call(channel, payload)
    assert exc.value.code() == code
    assert fragment in exc.value.details()
    assert "secret detail" not in exc.value.details()


def test_health_and_reflection(channel, server):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == 1
    server.set_serving(False)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status == 2
    server.set_serving(True)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_metrics_count_requests_by_code(channel, server):
    call(channel, b"counted")
    with pytest.raises(grpc.RpcError):
        call(channel, b"missing")
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    )
    assert 'cbir_grpc_requests_total{code="OK",method="Echo",service="test"}' in text
    assert 'cbir_grpc_requests_total{code="NOT_FOUND",method="Echo",service="test"}' in text
    assert "cbir_grpc_request_seconds_bucket" in text


# ------------------------------------------------------------------ undecodable request messages

TYPED = "test.Typed"


def _typed_get(request: indexer_pb2.GetRequest, context) -> indexer_pb2.GetRequest:
    return request


def _typed_upsert(requests, context) -> indexer_pb2.UpsertResponse:
    return indexer_pb2.UpsertResponse(upserted=sum(len(r.records) for r in requests))


def _typed_watch(request: indexer_pb2.GetRequest, context):
    yield from (indexer_pb2.GetRequest(ids=[i]) for i in request.ids)


@pytest.fixture(scope="module")
def typed_server():
    get, upsert = indexer_pb2.GetRequest, indexer_pb2.UpsertRequest
    handler = grpc.method_handlers_generic_handler(
        TYPED,
        {
            "Get": grpc.unary_unary_rpc_method_handler(_typed_get, get.FromString, get.SerializeToString),
            "Upsert": grpc.stream_unary_rpc_method_handler(
                _typed_upsert, upsert.FromString, indexer_pb2.UpsertResponse.SerializeToString
            ),
            "Watch": grpc.unary_stream_rpc_method_handler(
                _typed_watch, get.FromString, get.SerializeToString
            ),
        },
    )
    running = start_server(
        ServerOptions("typed", host="127.0.0.1", port=0, metrics_port=0),
        [(lambda _servicer, srv: srv.add_generic_rpc_handlers((handler,)), None)],
        [TYPED],
    )
    yield running
    running.stop(0)


@pytest.fixture()
def typed_channel(typed_server):
    with grpc.insecure_channel(f"127.0.0.1:{typed_server.port}") as ch:
        yield ch


def _bad_utf8(message) -> bytes:
    """``message`` serialized with its placeholder string "@@" replaced by bytes that are not UTF-8."""
    data = message.SerializeToString()
    assert data.count(b"@@") == 1
    return data.replace(b"@@", b"\xff\xfe")


UNDECODABLE = {
    "bad_utf8_in_repeated_string": _bad_utf8(indexer_pb2.GetRequest(ids=["ok", "@@"])),
    "truncated": indexer_pb2.GetRequest(ids=["a-long-enough-item-id"]).SerializeToString()[:9],
    "garbage": b"\xff\xff\xff\xff\xff\xff",
}


def _raw_unary(channel, method: str):
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_undecodable_unary_request_is_invalid_argument_naming_the_type(typed_channel, name, caplog):
    with pytest.raises(grpc.RpcError) as exc:
        _raw_unary(typed_channel, f"/{TYPED}/Get")(UNDECODABLE[name], timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request is not a valid cbir.v1.GetRequest" in exc.value.details()
    assert not [r for r in caplog.records if r.exc_info], "a client mistake must not log a traceback"


def test_undecodable_message_in_a_request_stream_is_invalid_argument(typed_channel):
    upsert = typed_channel.stream_unary(
        f"/{TYPED}/Upsert", request_serializer=None, response_deserializer=None
    )
    good = indexer_pb2.UpsertRequest(records=[indexer_pb2.Record(vector=[1.0])]).SerializeToString()
    answer = indexer_pb2.UpsertResponse.FromString(upsert(iter([good, good]), timeout=5))
    assert answer.upserted == 2
    bad = _bad_utf8(indexer_pb2.UpsertRequest(generation="@@"))
    with pytest.raises(grpc.RpcError) as exc:
        upsert(iter([good, bad, good]), timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request is not a valid cbir.v1.UpsertRequest" in exc.value.details()


def test_undecodable_request_of_a_response_stream_is_invalid_argument(typed_channel):
    watch = typed_channel.unary_stream(f"/{TYPED}/Watch", request_serializer=None, response_deserializer=None)
    assert len(list(watch(indexer_pb2.GetRequest(ids=["a", "b"]).SerializeToString(), timeout=5))) == 2
    with pytest.raises(grpc.RpcError) as exc:
        list(watch(UNDECODABLE["garbage"], timeout=5))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_undecodable_requests_are_counted_as_invalid_argument(typed_channel, typed_server):
    with pytest.raises(grpc.RpcError):
        _raw_unary(typed_channel, f"/{TYPED}/Get")(UNDECODABLE["garbage"], timeout=5)
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{typed_server.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    assert 'cbir_grpc_requests_total{code="INVALID_ARGUMENT",method="Get",service="typed"}' in text


def test_undecodable_health_and_reflection_requests_are_invalid_argument(typed_channel):
    with pytest.raises(grpc.RpcError) as exc:
        _raw_unary(typed_channel, "/grpc.health.v1.Health/Check")(b"\x0a\x02\xff\xfe", timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grpc.health.v1.HealthCheckRequest" in exc.value.details()
    reflect = typed_channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=None,
        response_deserializer=None,
    )
    with pytest.raises(grpc.RpcError) as exc:
        list(reflect(iter([UNDECODABLE["garbage"]]), timeout=5))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grpc.reflection.v1alpha.ServerReflectionRequest" in exc.value.details()
    # Decodable requests still work on both.
    health = health_pb2_grpc.HealthStub(typed_channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=TYPED), timeout=5).status == 1


def _series(server, name: str) -> float:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    )
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_every_call_gets_its_own_request_id_and_counts_although_the_wrapping_is_reused(channel, server):
    ok = 'cbir_grpc_requests_total{code="OK",method="Echo",service="test"}'
    before = _series(server, ok)
    ids = {dict(call(channel, b"again")[1].trailing_metadata())["x-request-id"] for _ in range(20)}
    assert len(ids) == 20 and all(len(i) == 16 for i in ids)
    assert _series(server, ok) == before + 20
    assert _series(server, 'cbir_grpc_requests_in_flight{service="test"}') == 0
    # A caller's id is kept; an over-long one is replaced.
    assert (
        dict(call(channel, b"x", metadata=(("x-request-id", "r" * 129),))[1].trailing_metadata())[
            "x-request-id"
        ]
        != "r" * 129
    )
