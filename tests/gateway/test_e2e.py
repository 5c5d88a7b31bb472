"""End to end with real processes: model server + indexer + gateway; answers, filters, metrics, logs."""

from __future__ import annotations

import math
import urllib.request

import grpc
import pytest

from cbir.v1 import search_pb2, types_pb2
from tests.gateway.stack import AUTH, INFO_KEY, SEARCH_KEY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stub(e2e):
    with e2e.gateway.channel() as channel:
        yield e2e.gateway.stub(channel)


def test_catalogue_image_used_as_query_comes_back_first(e2e, stub):
    for item_id in ("item-000", "item-013", "item-027"):
        response = stub.Search(
            search_pb2.SearchRequest(image=e2e.catalogue.images[item_id], k=5), metadata=AUTH, timeout=30
        )
        top = response.hits[0]
        assert top.id == item_id and math.isclose(top.score, 1.0, abs_tol=1e-4)
        assert top.uri == e2e.catalogue.items[item_id].uri and top.label == e2e.catalogue.items[item_id].label
        assert dict(top.attributes) == dict(e2e.catalogue.items[item_id].attributes)
        assert len(response.hits) == 5 and response.request_id
        assert response.generation.space.model_name == "tiny" and response.generation.space.model_version >= 1


def test_search_by_id_excludes_the_item_and_matches_search_by_image(e2e, stub):
    item_id = "item-010"
    by_id = stub.Search(search_pb2.SearchRequest(item_id=item_id, k=6), metadata=AUTH, timeout=30)
    by_image = stub.Search(
        search_pb2.SearchRequest(image=e2e.catalogue.images[item_id], k=7), metadata=AUTH, timeout=30
    )
    assert item_id not in [h.id for h in by_id.hits] and len(by_id.hits) == 6
    assert [h.id for h in by_id.hits] == [h.id for h in by_image.hits][1:]


def test_unknown_id_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(search_pb2.SearchRequest(item_id="no-such-item"), metadata=AUTH, timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-item" in info.value.details()


def test_filters_and_min_score(e2e, stub):
    query = e2e.catalogue.images["item-001"]
    flt = types_pb2.Filter(
        labels=["class2", "class3"],
        attributes=[types_pb2.AttributeFilter(key="colour", values=["red", "blue"])],
    )
    hits = stub.Search(
        search_pb2.SearchRequest(image=query, k=100, filter=flt), metadata=AUTH, timeout=30
    ).hits
    expected = {
        i
        for i, item in e2e.catalogue.items.items()
        if item.label in ("class2", "class3") and item.attributes["colour"] in ("red", "blue")
    }
    assert {h.id for h in hits} == expected
    high = stub.Search(
        search_pb2.SearchRequest(image=query, k=100, min_score=0.5), metadata=AUTH, timeout=30
    ).hits
    assert high and all(h.score >= 0.5 for h in high) and len(high) < len(e2e.catalogue.items)


def test_batch_search_one_generation_in_order(e2e, stub):
    ids = ["item-003", "item-004", "item-005"]
    request = search_pb2.BatchSearchRequest(
        queries=[search_pb2.SearchRequest(image=e2e.catalogue.images[i], k=3) for i in ids]
        + [search_pb2.SearchRequest(item_id="item-006", k=3)]
    )
    response = stub.BatchSearch(request, metadata=AUTH, timeout=30)
    assert [r.hits[0].id for r in response.responses[:3]] == ids
    assert "item-006" not in [h.id for h in response.responses[3].hits]
    assert all(r.generation == response.generation for r in response.responses)


def test_serving_info(e2e, stub):
    info = stub.GetServingInfo(
        search_pb2.GetServingInfoRequest(), metadata=(("x-api-key", INFO_KEY),), timeout=30
    )
    assert info.item_count == len(e2e.catalogue.items) and info.dimension == 8 and info.shard_count == 1
    assert info.generation.space.model_version in info.available_model_versions


def test_api_key_rules_on_the_real_server(e2e, stub):
    image = e2e.catalogue.images["item-000"]
    for metadata, code in [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer not-a-valid-key"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("x-api-key", INFO_KEY),), grpc.StatusCode.PERMISSION_DENIED),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(search_pb2.SearchRequest(image=image), metadata=metadata, timeout=30)
        assert info.value.code() == code
    assert stub.Search(
        search_pb2.SearchRequest(image=image), metadata=(("x-api-key", SEARCH_KEY),), timeout=30
    ).hits


def test_deadline_is_honoured(e2e, stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(
            search_pb2.SearchRequest(image=e2e.catalogue.images["item-000"]), metadata=AUTH, timeout=0.001
        )
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_metrics_split_by_stage_and_logs_carry_request_ids_but_never_keys(e2e, stub):
    stub.Search(
        search_pb2.SearchRequest(image=e2e.catalogue.images["item-002"]),
        metadata=(*AUTH, ("x-request-id", "e2e-trace-42")),
        timeout=30,
    )
    with pytest.raises(grpc.RpcError):
        stub.Search(
            search_pb2.SearchRequest(image=b"garbage", k=1),
            metadata=(*AUTH, ("x-request-id", "e2e-trace-43")),
            timeout=30,
        )
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{e2e.gateway.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    for stage in ("decode", "embed", "knn", "generation"):
        assert f'cbir_gateway_stage_seconds_count{{stage="{stage}"}}' in text
    assert 'cbir_grpc_requests_total{code="OK",method="Search",service="gateway"}' in text
    assert 'cbir_grpc_requests_total{code="INVALID_ARGUMENT",method="Search",service="gateway"}' in text
    assert 'cbir_gateway_dependency_up{dependency="serving"} 1.0' in text
    log = e2e.gateway.proc.log_text()
    assert '"request_id": "e2e-trace-43"' in log
    assert SEARCH_KEY not in log and INFO_KEY not in log
