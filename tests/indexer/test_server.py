"""The servicer in-process on a real gRPC server: NOT_SERVING (and UNAVAILABLE) until the index is loaded."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbir.server import ServerOptions
from cbir.v1 import indexer_pb2, indexer_pb2_grpc
from indexer.core import IndexerConfig, IndexerCore
from indexer.server import SERVICE_NAME, serve
from tests.support.processes import wait_for_health


def test_not_serving_until_loaded_then_serving(tmp_path):
    core = IndexerCore(IndexerConfig(tmp_path))
    gate = threading.Event()
    load = core.load

    def slow_load():  # a big index takes a while to load; hold it here
        assert gate.wait(30)
        load()

    core.load = slow_load
    running = serve(
        ServerOptions(service_name="indexer-test", host="127.0.0.1", port=0, metrics_port=-1), core
    )
    target = f"127.0.0.1:{running.port}"
    try:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = indexer_pb2_grpc.IndexerServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Stats(indexer_pb2.StatsRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.details()
            gate.set()
            wait_for_health(target, SERVICE_NAME, timeout=30)
            assert stub.Stats(indexer_pb2.StatsRequest(), timeout=5).item_count == 0
    finally:
        gate.set()
        running.stop(0)
