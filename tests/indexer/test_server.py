"""The servicer in-process on a real gRPC server: NOT_SERVING (and UNAVAILABLE) until the index is loaded."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbir.processes import wait_for_health
from cbir.server import ServerOptions
from cbir.v1 import indexer_pb2, indexer_pb2_grpc
from indexer.core import IndexerConfig, IndexerCore
from indexer.server import SERVICE_NAME, serve


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


@pytest.fixture
def served(tmp_path):
    core = IndexerCore(IndexerConfig(tmp_path))
    running = serve(
        ServerOptions(service_name="indexer-test", host="127.0.0.1", port=0, metrics_port=-1), core
    )
    target = f"127.0.0.1:{running.port}"
    wait_for_health(target, SERVICE_NAME, timeout=30)
    try:
        yield target
    finally:
        running.stop(0)


def _fill(target: str, count: int = 300, dim: int = 8):
    import numpy as np

    from cbir.v1 import types_pb2
    from indexer.client import IndexerClient

    vectors = np.random.default_rng(3).normal(size=(count, dim)).astype(np.float32)
    with IndexerClient([target]) as client:
        client.create_generation("g", types_pb2.EmbeddingSpace(model_name="m", model_version=1), 1, dim)
        records = (
            indexer_pb2.Record(item=types_pb2.Item(id=f"i{j}", attributes={"a": str(j % 3)}), vector=v)
            for j, v in enumerate(vectors)
        )
        client.upsert(records, generation="g")
        client.activate_generation("g")
    return vectors


def test_packed_and_per_vector_queries_get_the_same_answers(served):
    vectors = _fill(served)
    queries = vectors[:5] + 0.01
    with grpc.insecure_channel(served) as channel:
        stub = indexer_pb2_grpc.IndexerServiceStub(channel)
        packed = stub.Knn(
            indexer_pb2.KnnRequest(packed_queries=queries.astype("<f4").tobytes(), k=7), timeout=10
        )
        listed = stub.Knn(
            indexer_pb2.KnnRequest(queries=[indexer_pb2.Vector(values=q) for q in queries.tolist()], k=7),
            timeout=10,
        )
        assert packed == listed and len(packed.results) == 5 and packed.generation.name == "g"
        assert [h.id for h in packed.results[0].hits][0] == "i0" and dict(
            packed.results[0].hits[0].attributes
        )
        for request, fragment in [
            (indexer_pb2.KnnRequest(packed_queries=b"\0" * 12, k=1), "not a whole number of 8-value"),
            (
                indexer_pb2.KnnRequest(
                    packed_queries=queries[:1].tobytes(), queries=[indexer_pb2.Vector(values=[0.0] * 8)], k=1
                ),
                "not both",
            ),
            (indexer_pb2.KnnRequest(packed_queries=(queries[:1] * float("nan")).tobytes(), k=1), "NaN"),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                stub.Knn(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()


def test_client_falls_back_to_per_vector_queries_for_an_older_indexer(served):
    """An indexer from before packed_queries sees no query vector at all; the client notices once."""
    from indexer.client import IndexerClient

    vectors = _fill(served)
    seen = []

    class OlderIndexer(indexer_pb2_grpc.IndexerServiceServicer):
        def __init__(self, channel):
            self.real = indexer_pb2_grpc.IndexerServiceStub(channel)

        def Knn(self, request, context):
            seen.append(bool(request.packed_queries))
            if not request.queries:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "at least one query vector is required")
            return self.real.Knn(request)

    from concurrent import futures

    with grpc.insecure_channel(served) as channel:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        indexer_pb2_grpc.add_IndexerServiceServicer_to_server(OlderIndexer(channel), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            with IndexerClient([f"127.0.0.1:{port}"]) as client:
                first = client.knn(vectors[:2], 3, generation="g")
                second = client.knn(vectors[:2], 3, generation="g")
        finally:
            server.stop(0)
    assert [h.id for h in first.results[1].hits][0] == "i1" and first == second
    assert seen == [True, False, False]
