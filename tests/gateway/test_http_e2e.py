"""The HTTP/JSON API of a real gateway process over real HTTP: answers equal to gRPC's, every route,
errors with their statuses and gRPC's messages, API keys, uploads, TLS, metrics, health."""

from __future__ import annotations

import base64
import signal
import threading
import time
import urllib.request

import grpc
import pytest
import requests
from google.protobuf import json_format
from openapi_spec_validator import validate

from cbir.v1 import search_pb2, types_pb2
from tests.gateway import stack as s
from tests.gateway.stack import AUTH, INFO_KEY, SEARCH_KEY
from trainer.synthetic import make_image

pytestmark = pytest.mark.slow

BEARER = {"Authorization": f"Bearer {SEARCH_KEY}"}


@pytest.fixture(scope="module")
def stub(e2e):
    with e2e.gateway.channel() as channel:
        yield e2e.gateway.stub(channel)


@pytest.fixture(scope="module")
def http(e2e):
    with requests.Session() as session:
        session.headers.update(BEARER)
        yield session


def url(e2e, path: str) -> str:
    return e2e.gateway.http_url + path


def without_request_id(message):
    message.ClearField("request_id")
    for response in getattr(message, "responses", ()):
        response.ClearField("request_id")
    return message


def grpc_error(stub, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(request, metadata=AUTH, timeout=30)
    return info.value


def assert_status(
    answer: requests.Response, http_status: int, code: grpc.StatusCode, message: str | None = None
):
    body = answer.json()
    assert answer.status_code == http_status, body
    assert body["code"] == code.value[0] and body["status"] == code.name and body["details"] == []
    if message is not None:
        assert body["message"] == message
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.headers["x-request-id"]


# ------------------------------------------------------------------ answers equal to gRPC's


def queries(e2e) -> list[search_pb2.SearchRequest]:
    images = e2e.catalogue.images
    return [
        search_pb2.SearchRequest(image=images["item-003"], k=5),
        search_pb2.SearchRequest(item_id="item-011", k=7),
        search_pb2.SearchRequest(
            image=images["item-020"],
            k=40,
            filter=types_pb2.Filter(
                labels=["class0", "class2"],
                attributes=[types_pb2.AttributeFilter(key="colour", values=["red"])],
            ),
        ),
        search_pb2.SearchRequest(image=images["item-007"], k=20, min_score=0.5, ef=50),
        search_pb2.SearchRequest(item_id="item-039"),  # k = 0: the default
    ]


def test_search_json_round_trip_equals_the_grpc_answer(e2e, stub, http):
    for request in queries(e2e):
        expected = stub.Search(request, metadata=AUTH, timeout=30)
        answer = http.post(
            url(e2e, "/v1/search"),
            data=json_format.MessageToJson(request),
            headers={"Content-Type": "application/json", "x-request-id": "http-test-1"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["requestId"] == "http-test-1" and answer.headers["x-request-id"] == "http-test-1"
        got = json_format.Parse(answer.content, search_pb2.SearchResponse())
        assert without_request_id(got) == without_request_id(expected)
        assert {"id", "score", "uri", "label", "attributes"} <= set(body["hits"][0])


def test_issue_example_body_is_accepted(e2e, http):
    item = e2e.catalogue.items["item-006"]
    body = {
        "image": base64.b64encode(e2e.catalogue.images["item-006"]).decode(),
        "k": 5,
        "filter": {"labels": [item.label]},
        "minScore": 0.3,
    }
    answer = http.post(url(e2e, "/v1/search"), json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    hits = answer.json()["hits"]
    assert hits[0]["id"] == "item-006" and all(h["label"] == item.label and h["score"] >= 0.3 for h in hits)


def test_batch_and_serving_info_equal_the_grpc_answers(e2e, stub, http):
    batch = search_pb2.BatchSearchRequest(queries=queries(e2e)[:4])
    expected = stub.BatchSearch(batch, metadata=AUTH, timeout=30)
    answer = http.post(
        url(e2e, "/v1/search:batch"),
        data=json_format.MessageToJson(batch),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    got = json_format.Parse(answer.content, search_pb2.BatchSearchResponse())
    assert without_request_id(got) == without_request_id(expected)

    info = stub.GetServingInfo(search_pb2.GetServingInfoRequest(), metadata=AUTH, timeout=30)
    answer = http.get(url(e2e, "/v1/serving-info"), timeout=30)
    assert answer.status_code == 200, answer.text
    assert json_format.Parse(answer.content, search_pb2.ServingInfo()) == info
    assert answer.json()["itemCount"] == str(s.N_ITEMS)  # int64 is a string in the JSON mapping


def test_upload_form_query_parameters_and_raw_body(e2e, stub, http):
    item = e2e.catalogue.items["item-009"]
    image = e2e.catalogue.images["item-009"]
    expected = stub.Search(
        search_pb2.SearchRequest(
            image=image, k=4, filter=types_pb2.Filter(labels=[item.label]), min_score=0.1
        ),
        metadata=AUTH,
        timeout=30,
    )
    form = http.post(
        url(e2e, "/v1/search:upload"),
        files={"image": ("photo.png", image, "image/png")},
        data={"k": "4", "label": item.label, "min_score": "0.1"},
        timeout=30,
    )
    by_query = http.post(
        url(e2e, f"/v1/search:upload?k=4&label={item.label}&min_score=0.1"),
        files={"image": ("photo.png", image)},
        timeout=30,
    )
    raw = http.post(
        url(e2e, f"/v1/search:upload?k=4&label={item.label}&min_score=0.1"),
        data=image,
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    for answer in (form, by_query, raw):
        assert answer.status_code == 200, answer.text
        got = json_format.Parse(answer.content, search_pb2.SearchResponse())
        assert without_request_id(got) == without_request_id(expected)
    # Two labels: both are kept (OR), as in a Filter.
    answer = http.post(
        url(e2e, "/v1/search:upload"),
        files={"image": ("photo.png", image)},
        data=[("label", "class0"), ("label", "class1"), ("k", "40")],
        timeout=30,
    )
    assert {h["label"] for h in answer.json()["hits"]} == {"class0", "class1"}


@pytest.mark.parametrize(
    "parts, message",
    [
        ([("k", (None, "3"))], "the form has no file field 'image'"),
        ([("image", (None, "not a file"))], "the field 'image' must be a file"),
        ([("photo", ("a.png", b"x"))], "unexpected file field 'photo'"),
        ([("image", ("a.png", b"x")), ("image", ("b.png", b"y"))], "more than one 'image' file"),
        ([("image", ("a.png", b"x")), ("k", (None, "three"))], "k must be an integer, got 'three'"),
        ([("image", ("a.png", b"x")), ("min-score", (None, "0.2"))], "unknown field(s) ['min-score']"),
        (
            [("image", ("a.png", b"x")), ("min_score", (None, "high"))],
            "min_score must be a number, got 'high'",
        ),
        ([("image", ("a.png", b"x")), ("k", (None, "3")), ("k", (None, "4"))], "k is given 2 times"),
        ([("image", ("a.txt", b"hello, not a photo"))], "is not a JPEG, PNG, GIF, BMP or WebP image"),
        (
            [("image", ("a.png", b"x")), ("label", (None, b"\xff\xfe", "application/octet-stream"))],
            "form field 'label' is not UTF-8 text",
        ),
    ],
)
def test_upload_form_mistakes_are_400(e2e, http, parts, message):
    answer = http.post(url(e2e, "/v1/search:upload"), files=parts, timeout=30)
    assert_status(answer, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert message in answer.json()["message"]


def test_malformed_multipart_is_400(e2e, http):
    answer = http.post(
        url(e2e, "/v1/search:upload"),
        data=b"--xyz\r\nContent-Disposition: form-data; name=image\r\n\r\nunterminated",
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text


# ------------------------------------------------------------------ errors: HTTP status, gRPC's message


def test_core_errors_have_googles_status_and_the_grpc_message(e2e, stub, http):
    big = make_image(seed=1, size=900, label=0, fmt="BMP")  # over the stack's 2 MB --max-image-bytes
    assert 2_000_000 < len(big) < 8 * 1024 * 1024
    cases = [
        (search_pb2.SearchRequest(image=b""), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (search_pb2.SearchRequest(image=b"not an image at all"), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (search_pb2.SearchRequest(item_id="item-001", k=5000), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (search_pb2.SearchRequest(k=3), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (search_pb2.SearchRequest(item_id="no-such-item"), 404, grpc.StatusCode.NOT_FOUND),
        (search_pb2.SearchRequest(image=big), 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ]
    for request, http_status, code in cases:
        expected = grpc_error(stub, request)
        assert expected.code() == code
        answer = http.post(
            url(e2e, "/v1/search"),
            data=json_format.MessageToJson(request),
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        assert_status(answer, http_status, code, expected.details())


def test_batch_errors_name_the_query(e2e, http):
    body = {"queries": [{"itemId": "item-001"}, {"image": ""}]}
    answer = http.post(url(e2e, "/v1/search:batch"), json=body, timeout=30)
    assert_status(answer, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert answer.json()["message"].startswith("queries[1]: image is empty")


def test_deadline_header(e2e, http):
    answer = http.post(
        url(e2e, "/v1/search"),
        json={"itemId": "item-001"},
        headers={"X-Server-Timeout": "0.000001"},
        timeout=30,
    )
    assert_status(answer, 504, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert "deadline expired" in answer.json()["message"]
    answer = http.post(
        url(e2e, "/v1/search"), json={"itemId": "item-001"}, headers={"X-Server-Timeout": "soon"}
    )
    assert_status(
        answer,
        400,
        grpc.StatusCode.INVALID_ARGUMENT,
        "x-server-timeout must be a positive number of seconds, got 'soon'",
    )
    answer = http.post(url(e2e, "/v1/search"), json={"itemId": "item-001"}, headers={"X-Server-Timeout": "5"})
    assert answer.status_code == 200


def test_transport_mistakes_get_a_clear_4xx(e2e, http):
    post = lambda path, **kw: http.post(url(e2e, path), timeout=30, **kw)  # noqa: E731
    json_type = {"Content-Type": "application/json"}
    answer = post("/v1/search", data="{not json", headers=json_type)
    assert_status(answer, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert answer.json()["message"].startswith(
        "the request body is not a valid cbir.v1.SearchRequest in JSON"
    )
    answer = post("/v1/search", data='{"picture": "abc"}', headers=json_type)
    assert_status(answer, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert 'no field named "picture"' in answer.json()["message"]
    answer = post("/v1/search", data='{"k": "many"}', headers=json_type)
    assert_status(answer, 400, grpc.StatusCode.INVALID_ARGUMENT)
    answer = post("/v1/search", data="[" * 100_000, headers=json_type)
    assert_status(answer, 400, grpc.StatusCode.INVALID_ARGUMENT)
    answer = post("/v1/search", data=b"\xff\xfe", headers=json_type)
    assert_status(answer, 400, grpc.StatusCode.INVALID_ARGUMENT)
    answer = post("/v1/search", data="", headers=json_type)
    assert_status(
        answer,
        400,
        grpc.StatusCode.INVALID_ARGUMENT,
        "the request body is empty; send a cbir.v1.SearchRequest as JSON",
    )
    answer = post("/v1/search", data="k=5")  # a form, not JSON
    assert_status(answer, 415, grpc.StatusCode.INVALID_ARGUMENT)
    assert "Content-Type: application/json" in answer.json()["message"]
    answer = post("/v1/search:upload", data='{"k": 1}', headers=json_type)
    assert_status(answer, 415, grpc.StatusCode.INVALID_ARGUMENT)
    answer = post("/v1/search", data=b"x" * (8 * 1024 * 1024 + 1), headers=json_type)
    assert_status(answer, 413, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "limit of 8388608 bytes" in answer.json()["message"]
    answer = post("/v1/search:upload", files={"image": ("big.png", b"x" * (8 * 1024 * 1024 + 1))})
    assert_status(answer, 413, grpc.StatusCode.RESOURCE_EXHAUSTED)
    answer = http.get(url(e2e, "/v1/search"), timeout=30)
    assert_status(answer, 405, grpc.StatusCode.UNIMPLEMENTED, "GET is not allowed on /v1/search; use POST")
    answer = http.get(url(e2e, "/v2/nothing"), timeout=30)
    assert_status(
        answer, 404, grpc.StatusCode.NOT_FOUND, "no route /v2/nothing; the API is described at /openapi.json"
    )


def test_api_keys_are_the_grpc_ones(e2e, stub):
    search = url(e2e, "/v1/search")
    body = {"itemId": "item-002", "k": 2}
    answer = requests.post(search, json=body, timeout=30)
    assert_status(answer, 401, grpc.StatusCode.UNAUTHENTICATED)
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(search_pb2.SearchRequest(item_id="item-002"), timeout=30)
    assert answer.json()["message"] == info.value.details()
    assert_status(
        requests.post(search, json=body, headers={"x-api-key": "wrong-key-123"}),
        401,
        grpc.StatusCode.UNAUTHENTICATED,
        "the API key is not valid",
    )
    assert requests.post(search, json=body, headers={"x-api-key": SEARCH_KEY}, timeout=30).status_code == 200
    assert requests.post(search, json=body, headers=BEARER, timeout=30).status_code == 200
    info_only = {"Authorization": f"Bearer {INFO_KEY}"}
    answer = requests.post(search, json=body, headers=info_only, timeout=30)
    assert_status(answer, 403, grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(
            search_pb2.SearchRequest(item_id="item-002"),
            metadata=(("authorization", f"Bearer {INFO_KEY}"),),
            timeout=30,
        )
    assert answer.json()["message"] == info.value.details()
    assert requests.get(url(e2e, "/v1/serving-info"), headers=info_only, timeout=30).status_code == 200
    for path in ("/v1/items:sample", "/v1/items/item-001/image", "/v1/serving-info"):
        assert requests.get(url(e2e, path), timeout=30).status_code == 401, path
    # Health, the document and the page stay open, like gRPC health and reflection.
    for path in ("/healthz", "/readyz", "/openapi.json", "/", "/web/app.js"):
        assert requests.get(url(e2e, path), timeout=30).status_code == 200, path
    assert SEARCH_KEY not in e2e.gateway.proc.log_text()


# ------------------------------------------------------------------ catalogue routes


def test_sample_returns_catalogue_items(e2e, http):
    answer = http.get(url(e2e, "/v1/items:sample?n=5"), timeout=30)
    assert answer.status_code == 200, answer.text
    items = answer.json()["items"]
    assert len(items) == 5 and len({i["id"] for i in items}) == 5
    for item in items:
        assert item == json_format.MessageToDict(e2e.catalogue.items[item["id"]])
    assert len(http.get(url(e2e, "/v1/items:sample"), timeout=30).json()["items"]) == 12
    seen = {
        i["id"]
        for _ in range(6)
        for i in http.get(url(e2e, "/v1/items:sample?n=3"), timeout=30).json()["items"]
    }
    assert len(seen) > 3  # a different region of the catalogue each call
    for bad in ("0", "101", "many"):
        assert_status(
            http.get(url(e2e, f"/v1/items:sample?n={bad}"), timeout=30), 400, grpc.StatusCode.INVALID_ARGUMENT
        )


def test_item_image_serves_the_catalogue_file(e2e, http):
    answer = http.get(url(e2e, "/v1/items/item-004/image"), timeout=30)
    assert answer.status_code == 200
    assert answer.content == e2e.catalogue.images["item-004"]
    assert answer.headers["Content-Type"] == "image/png"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert http.head(url(e2e, "/v1/items/item-004/image"), timeout=30).status_code == 200
    assert_status(
        http.get(url(e2e, "/v1/items/no-such/image"), timeout=30),
        404,
        grpc.StatusCode.NOT_FOUND,
        "no catalogue item has id 'no-such'",
    )


# ------------------------------------------------------------------ health, document, page, metrics


def test_health_routes(e2e):
    assert requests.get(url(e2e, "/healthz"), timeout=30).json() == {"status": "ok"}
    ready = requests.get(url(e2e, "/readyz"), timeout=30)
    assert ready.status_code == 200 and ready.json() == {"status": "SERVING"}


def test_openapi_document_is_valid_and_describes_every_route(e2e):
    from gateway.http_api import ROUTES

    answer = requests.get(url(e2e, "/openapi.json"), timeout=30)
    doc = answer.json()
    validate(doc)
    assert {(m, p) for p, ops in doc["paths"].items() for m in ops} == {
        (r.method.lower(), r.path) for r in ROUTES
    }
    schemas = doc["components"]["schemas"]
    assert set(schemas["cbir.v1.SearchRequest"]["properties"]) == {
        "image",
        "itemId",
        "k",
        "filter",
        "minScore",
        "ef",
    }
    assert "oneof `query`" in schemas["cbir.v1.SearchRequest"]["description"]
    assert schemas["cbir.v1.Hit"]["properties"]["score"]["description"].startswith("Similarity")
    assert doc["paths"]["/v1/search"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]


def test_page_is_served_with_a_strict_policy(e2e):
    page = requests.get(url(e2e, "/"), timeout=30)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "script-src" not in policy  # scripts: same origin only
    assert "http" not in page.text.split("<body", 1)[0].replace("http-equiv", "")
    for name in ("app.js", "style.css", "favicon.svg"):
        asset = requests.get(url(e2e, f"/web/{name}"), timeout=30)
        assert asset.status_code == 200 and asset.headers["ETag"]
        again = requests.get(
            url(e2e, f"/web/{name}"), headers={"If-None-Match": asset.headers["ETag"]}, timeout=30
        )
        assert again.status_code == 304
    assert requests.get(url(e2e, "/web/..%2Fhttp_api.py"), timeout=30).status_code == 404
    assert requests.get(url(e2e, "/web/missing.js"), timeout=30).status_code == 404


def test_metrics_count_http_requests_by_route_and_status(e2e, http):
    http.post(url(e2e, "/v1/search"), json={"itemId": "item-001"}, timeout=30)
    http.post(url(e2e, "/v1/search"), json={"itemId": "no-such-item"}, timeout=30)
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{e2e.gateway.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    assert 'cbir_http_requests_total{method="POST",route="/v1/search",service="gateway",status="200"}' in text
    assert 'cbir_http_requests_total{method="POST",route="/v1/search",service="gateway",status="404"}' in text
    assert 'cbir_http_request_seconds_count{route="/v1/search",service="gateway"}' in text


def test_concurrent_http_and_grpc_clients_get_the_same_answers(e2e, stub):
    ids = sorted(e2e.catalogue.items)[:16]
    expected = {
        i: [
            h.id
            for h in stub.Search(
                search_pb2.SearchRequest(image=e2e.catalogue.images[i], k=5), metadata=AUTH, timeout=30
            ).hits
        ]
        for i in ids
    }
    failures: list[str] = []

    def http_client(offset: int) -> None:
        with requests.Session() as session:
            for n in range(12):
                item_id = ids[(offset + n) % len(ids)]
                body = {"image": base64.b64encode(e2e.catalogue.images[item_id]).decode(), "k": 5}
                answer = session.post(url(e2e, "/v1/search"), json=body, headers=BEARER, timeout=60)
                if answer.status_code != 200 or [h["id"] for h in answer.json()["hits"]] != expected[item_id]:
                    failures.append(f"http {item_id}: {answer.status_code} {answer.text[:200]}")

    def grpc_client(offset: int) -> None:
        for n in range(12):
            item_id = ids[(offset + n) % len(ids)]
            hits = stub.Search(
                search_pb2.SearchRequest(image=e2e.catalogue.images[item_id], k=5), metadata=AUTH, timeout=60
            ).hits
            if [h.id for h in hits] != expected[item_id]:
                failures.append(f"grpc {item_id}")

    threads = [threading.Thread(target=http_client, args=(i,)) for i in range(6)]
    threads += [threading.Thread(target=grpc_client, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures[:3]


# ------------------------------------------------------------------ dependencies down, shutdown


def test_unavailable_dependencies_are_503_and_not_ready(unavailable_gateway):
    base = unavailable_gateway.http_url
    ready = requests.get(base + "/readyz", timeout=30)
    assert ready.status_code == 503 and ready.json() == {"status": "NOT_SERVING"}
    assert requests.get(base + "/healthz", timeout=30).status_code == 200
    answer = requests.post(base + "/v1/search", json={"itemId": "item-001"}, timeout=30)
    assert_status(answer, 503, grpc.StatusCode.UNAVAILABLE)
    with unavailable_gateway.channel() as channel, pytest.raises(grpc.RpcError) as info:
        unavailable_gateway.stub(channel).Search(search_pb2.SearchRequest(item_id="item-001"), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # The same message (up to the connection error's wording, which the channel words per attempt).
    assert answer.json()["message"].split(":")[:2] == info.value.details().split(":")[:2]
    assert_status(requests.get(base + "/v1/items:sample", timeout=30), 503, grpc.StatusCode.UNAVAILABLE)


def test_sigterm_stops_http_and_grpc_promptly(e2e):
    gateway = s.start_gateway(
        e2e.workdir / "logs", "stopping", e2e.serving, [e2e.indexer], "--grace-seconds", "5"
    )
    with requests.Session() as session:
        assert session.get(f"{gateway.http_url}/healthz", timeout=30).status_code == 200  # keep-alive open
        started = time.monotonic()
        gateway.proc.proc.send_signal(signal.SIGTERM)
        assert gateway.proc.proc.wait(20) == 0
        assert time.monotonic() - started < 15
        with pytest.raises(requests.exceptions.ConnectionError):
            session.get(f"{gateway.http_url}/healthz", timeout=5)
    gateway.proc.stop()
