"""The shared server bootstrap: error mapping, request ids, health, reflection, metrics, shutdown."""

import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cbir import errors
from cbir.server import ServerOptions, start_server

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
