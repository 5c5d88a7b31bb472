"""The servicer in-process over gRPC (fakes behind it): proto conversion, status codes, API keys, health."""

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbir.errors import InvalidInput
from cbir.server import ServerOptions, start_server
from cbir.v1 import search_pb2, search_pb2_grpc, types_pb2
from gateway.auth import ApiKeyInterceptor, ApiKeys, presented_key
from gateway.health import DependencyProber
from gateway.search import SearchCore
from gateway.server import SERVICE_NAME, SearchServicer
from tests.gateway.fakes import FakeEmbedder, FakeIndexer, fake_embedding
from trainer.synthetic import make_image

FULL_KEY = "full-access-key-123"
INFO_KEY = "info-only-key-456"


@pytest.fixture(scope="module")
def stack():
    embedder = FakeEmbedder()
    indexer = FakeIndexer()
    indexer.add_generation("gen1", version=1)
    images = [make_image(i, label=i % 4) for i in range(12)]
    for i, image in enumerate(images):
        indexer.put("gen1", types_pb2.Item(id=f"id{i}", label=f"l{i % 4}"), fake_embedding(image, 1))
    core = SearchCore(lambda name: embedder, indexer)
    keys = ApiKeys([FULL_KEY, f"{INFO_KEY}:info"])
    running = start_server(
        ServerOptions("gateway-test", host="127.0.0.1", port=0, metrics_port=-1),
        [(search_pb2_grpc.add_SearchServiceServicer_to_server, SearchServicer(core))],
        [SERVICE_NAME],
        serving=False,
        extra_interceptors=[ApiKeyInterceptor(keys)],
    )
    prober = DependencyProber(
        core, lambda name: embedder, indexer, running.set_serving, period=0.05, timeout=1
    )
    prober.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield search_pb2_grpc.SearchServiceStub(channel), channel, images, embedder, indexer, prober
    prober.stop()
    channel.close()
    running.stop(0)


AUTH = (("authorization", f"Bearer {FULL_KEY}"),)


def test_search_over_grpc_returns_hits_generation_and_request_id(stack):
    stub, _, images, *_ = stack
    response, call = stub.Search.with_call(
        search_pb2.SearchRequest(image=images[5], k=3), metadata=(*AUTH, ("x-request-id", "abc-1")), timeout=5
    )
    assert [h.id for h in response.hits][0] == "id5" and len(response.hits) == 3
    assert response.generation.name == "gen1" and response.generation.space.model_version == 1
    assert response.request_id == "abc-1"


def test_min_score_presence_is_kept(stack):
    stub, _, images, *_ = stack
    request = search_pb2.SearchRequest(image=images[5], k=12, min_score=0.0)
    hits = stub.Search(request, metadata=AUTH, timeout=5).hits
    assert all(h.score >= 0 for h in hits)


def test_batch_search_over_grpc(stack):
    stub, _, images, *_ = stack
    request = search_pb2.BatchSearchRequest(
        queries=[search_pb2.SearchRequest(image=images[1], k=2), search_pb2.SearchRequest(item_id="id2", k=2)]
    )
    response = stub.BatchSearch(request, metadata=AUTH, timeout=5)
    assert response.responses[0].hits[0].id == "id1"
    assert "id2" not in [h.id for h in response.responses[1].hits]
    assert response.generation.name == "gen1" and response.request_id


@pytest.mark.parametrize(
    "request_, code",
    [
        (search_pb2.SearchRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (search_pb2.SearchRequest(image=b"junk"), grpc.StatusCode.INVALID_ARGUMENT),
        (search_pb2.SearchRequest(item_id="missing"), grpc.StatusCode.NOT_FOUND),
        (search_pb2.SearchRequest(item_id="id1", k=100000), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_statuses(stack, request_, code):
    stub, *_ = stack
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(request_, metadata=AUTH, timeout=5)
    assert info.value.code() == code


@pytest.mark.parametrize(
    "metadata, code",
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong-key-000"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Basic {FULL_KEY}"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("x-api-key", INFO_KEY),), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_api_keys_are_required(stack, metadata, code):
    stub, _, images, *_ = stack
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(search_pb2.SearchRequest(image=images[0]), metadata=metadata, timeout=5)
    assert info.value.code() == code
    assert FULL_KEY not in info.value.details() and "wrong-key" not in info.value.details()


def test_info_scope_and_x_api_key(stack):
    stub, *_ = stack
    info = stub.GetServingInfo(
        search_pb2.GetServingInfoRequest(), metadata=(("x-api-key", INFO_KEY),), timeout=5
    )
    assert info.generation.name == "gen1" and info.item_count == 12 and info.available_model_versions == [1]


def test_health_and_reflection_need_no_key_and_health_follows_dependencies(stack):
    _, channel, _, embedder, indexer, prober = stack
    health = health_pb2_grpc.HealthStub(channel)

    def status():
        return health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status

    def wait_for(expected):
        # Generous: only a failing run waits this long, and a busy machine delays the prober.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and status() != expected:
            time.sleep(0.02)
        return status()

    assert wait_for(health_pb2.HealthCheckResponse.SERVING) == health_pb2.HealthCheckResponse.SERVING
    indexer.down = True
    assert wait_for(health_pb2.HealthCheckResponse.NOT_SERVING) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "indexer" in prober.problem
    indexer.down = False
    assert wait_for(health_pb2.HealthCheckResponse.SERVING) == health_pb2.HealthCheckResponse.SERVING
    embedder.versions = {7}
    assert wait_for(health_pb2.HealthCheckResponse.NOT_SERVING) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "version 1" in prober.problem
    embedder.versions = {1}
    assert wait_for(health_pb2.HealthCheckResponse.SERVING) == health_pb2.HealthCheckResponse.SERVING


def test_key_parsing():
    keys = ApiKeys(["# comment", "", "abcdefgh12", "zyxwvuts99:search"])
    assert len(keys) == 2
    assert keys.scopes_of("abcdefgh12") == {"search", "info"}
    assert keys.scopes_of("zyxwvuts99") == {"search"}
    assert keys.scopes_of("nope") is None
    with pytest.raises(InvalidInput, match="entry 1 is shorter") as info:
        ApiKeys(["short"])
    assert "short" not in info.value.message.replace("shorter", "")
    with pytest.raises(InvalidInput, match="unknown scope"):
        ApiKeys(["abcdefgh12:admin"])


def test_key_sources(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text("from-file-key-1\n")
    keys = ApiKeys.load(str(path), "from-env-key-22,other-env-key:info")
    assert len(keys) == 3 and keys.scopes_of("other-env-key") == {"info"}
    assert ApiKeys.load(None, None) is None and ApiKeys.load(None, "") is None
    with pytest.raises(InvalidInput, match="cannot read"):
        ApiKeys.load(str(tmp_path / "missing"), None)


def test_presented_key():
    assert presented_key([("authorization", "Bearer  abc ")]) == "abc"
    assert presented_key([("authorization", "bearer abc")]) == "abc"
    assert presented_key([("x-api-key", "k1")]) == "k1"
    assert presented_key([("authorization", "Bearer ")]) is None
    assert presented_key([]) is None
