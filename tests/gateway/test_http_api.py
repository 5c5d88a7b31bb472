"""The HTTP API in-process (real aiohttp server on a free port, fakes behind the core): the error ->
status mapping for every domain error, pass-through and unexpected errors, the upload parser, readiness."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests
from multidict import MultiDict

from cbir import errors
from cbir.v1 import types_pb2
from gateway.http_api import HTTP_STATUS, HttpApi, upload_request
from gateway.http_server import HttpServer, listen
from gateway.items import CatalogueItems
from gateway.search import SearchCore
from tests.gateway.fakes import FakeEmbedder, FakeIndexer, fake_embedding
from trainer.synthetic import make_image


class ScriptedCore(SearchCore):
    """A real core whose searches raise ``self.failure`` when one is set."""

    failure: BaseException | None = None

    def search(self, query, deadline):
        if self.failure is not None:
            raise self.failure
        return super().search(query, deadline)


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.fixture(scope="module")
def api():
    embedder, indexer = FakeEmbedder(), FakeIndexer()
    indexer.add_generation("gen1", version=1)
    images = [make_image(i, label=i % 3) for i in range(9)]
    for i, image in enumerate(images):
        indexer.put("gen1", types_pb2.Item(id=f"id{i}", label=f"l{i % 3}"), fake_embedding(image, 1))
    core = ScriptedCore(lambda name: embedder, indexer)
    ready = {"value": False}
    executor = ThreadPoolExecutor(4)
    app = HttpApi(
        core,
        CatalogueItems(indexer, None, seed=0),
        keys=None,
        ready=lambda: ready["value"],
        executor=executor,
        max_body_bytes=1024 * 1024,
    ).application()
    server = HttpServer(app, listen("127.0.0.1", 0), executor, shutdown_seconds=1)
    server.start()
    with requests.Session() as session:
        yield f"http://127.0.0.1:{server.port}", session, core, ready, images
    server.stop()


def test_every_grpc_code_has_googles_http_status():
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    assert HTTP_STATUS[grpc.StatusCode.INVALID_ARGUMENT] == 400
    assert HTTP_STATUS[grpc.StatusCode.FAILED_PRECONDITION] == 400
    assert HTTP_STATUS[grpc.StatusCode.OUT_OF_RANGE] == 400
    assert HTTP_STATUS[grpc.StatusCode.UNAUTHENTICATED] == 401
    assert HTTP_STATUS[grpc.StatusCode.PERMISSION_DENIED] == 403
    assert HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404
    assert HTTP_STATUS[grpc.StatusCode.ABORTED] == HTTP_STATUS[grpc.StatusCode.ALREADY_EXISTS] == 409
    assert HTTP_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED] == 429
    assert HTTP_STATUS[grpc.StatusCode.CANCELLED] == 499
    assert HTTP_STATUS[grpc.StatusCode.UNIMPLEMENTED] == 501
    assert HTTP_STATUS[grpc.StatusCode.UNAVAILABLE] == 503
    assert HTTP_STATUS[grpc.StatusCode.DEADLINE_EXCEEDED] == 504


DOMAIN_ERRORS = [
    cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.CbirError)
]


@pytest.mark.parametrize("error_class", DOMAIN_ERRORS, ids=lambda c: c.__name__)
def test_every_domain_error_answers_with_its_codes_http_status(api, error_class):
    base, session, core, _ready, _images = api
    core.failure = error_class(f"what went wrong ({error_class.__name__})")
    try:
        answer = session.post(f"{base}/v1/search", json={"itemId": "id1"}, timeout=10)
    finally:
        core.failure = None
    code = error_class.code
    assert answer.status_code == HTTP_STATUS[code]
    assert answer.json() == {
        "code": code.value[0],
        "message": f"what went wrong ({error_class.__name__})",
        "status": code.name,
        "details": [],
    }


def test_dependency_codes_pass_through_and_bugs_are_500_without_details(api):
    base, session, core, _ready, _images = api
    core.failure = _RpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    answer = session.post(
        f"{base}/v1/search", json={"itemId": "id1"}, headers={"x-request-id": "rq-7"}, timeout=10
    )
    assert answer.status_code == 503 and answer.json()["message"] == "dependency failed: connection refused"
    core.failure = _RpcError(grpc.StatusCode.DATA_LOSS, "secret internals")
    answer = session.post(
        f"{base}/v1/search", json={"itemId": "id1"}, headers={"x-request-id": "rq-8"}, timeout=10
    )
    assert answer.status_code == 500 and answer.json()["message"] == "internal error (request id rq-8)"
    core.failure = RuntimeError("secret internals")
    answer = session.post(
        f"{base}/v1/search", json={"itemId": "id1"}, headers={"x-request-id": "rq-9"}, timeout=10
    )
    core.failure = None
    assert answer.status_code == 500
    assert answer.json() == {
        "code": 13,
        "message": "internal error (request id rq-9)",
        "status": "INTERNAL",
        "details": [],
    }
    assert session.post(f"{base}/v1/search", json={"itemId": "id1"}, timeout=10).status_code == 200


def test_readiness_follows_the_given_state(api):
    base, session, _core, ready, _images = api
    assert session.get(f"{base}/readyz", timeout=10).status_code == 503
    ready["value"] = True
    assert session.get(f"{base}/readyz", timeout=10).json() == {"status": "SERVING"}
    ready["value"] = False


def test_request_ids_are_echoed_or_made(api):
    base, session, _core, _ready, _images = api
    answer = session.post(
        f"{base}/v1/search", json={"itemId": "id2"}, headers={"X-Request-Id": "mine"}, timeout=10
    )
    assert answer.headers["x-request-id"] == "mine" and answer.json()["requestId"] == "mine"
    answer = session.post(
        f"{base}/v1/search", json={"itemId": "id2"}, headers={"X-Request-Id": "x" * 200}, timeout=10
    )
    made = answer.headers["x-request-id"]
    assert made != "x" * 200 and answer.json()["requestId"] == made and len(made) == 16


def test_upload_request_builds_the_search_request():
    fields = MultiDict(
        [("k", "7"), ("label", "a"), ("label", " "), ("label", "b"), ("min_score", "0.25"), ("ef", "")]
    )
    request = upload_request(b"img", fields)
    assert request.image == b"img" and request.k == 7 and list(request.filter.labels) == ["a", "b"]
    assert request.HasField("min_score") and request.min_score == 0.25 and request.ef == 0
    bare = upload_request(b"img", MultiDict())
    assert bare.k == 0 and not bare.HasField("filter") and not bare.HasField("min_score")


def test_a_taken_port_is_a_usage_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(errors.InvalidInput, match="cannot listen for HTTP on 127.0.0.1:.*--http-port"):
            listen("127.0.0.1", taken.getsockname()[1])


def test_openapi_document_follows_the_key_setting_and_validates():
    from openapi_spec_validator import validate

    from gateway.http_api import ROUTES

    bare = HttpApi.__new__(HttpApi)
    documents = {}
    for keys in (object(), None, object()):
        bare._keys = keys
        documents[keys is None] = bare.openapi()
        validate(documents[keys is None])
    open_doc, keyed = documents[True], documents[False]
    assert "securitySchemes" not in open_doc["components"]
    upload = open_doc["paths"]["/v1/search:upload"]["post"]
    assert "401" not in upload["responses"] and "security" not in upload
    assert "401" in keyed["paths"]["/v1/search:upload"]["post"]["responses"]
    assert {(m.upper(), p) for p, ops in open_doc["paths"].items() for m in ops} == {
        (r.method, r.path) for r in ROUTES
    }
    search = open_doc["components"]["schemas"]["cbir.v1.SearchRequest"]["properties"]
    assert search["image"]["format"] == "byte" and search["filter"]["allOf"] == [
        {"$ref": "#/components/schemas/cbir.v1.Filter"}
    ]
    info = open_doc["components"]["schemas"]["cbir.v1.ServingInfo"]["properties"]
    assert info["itemCount"]["type"] == "string"  # int64 in the proto3 JSON mapping
    metric = open_doc["components"]["schemas"]["cbir.v1.Metric"]
    assert metric["enum"][:2] == ["METRIC_UNSPECIFIED", "METRIC_COSINE"] and "Cosine" in metric["description"]


def test_the_document_lists_exactly_the_served_routes():
    bare = HttpApi.__new__(HttpApi)
    bare._keys, bare._max_body = None, 1024
    served = {
        (route.method, route.resource.canonical.replace("{id:.+}", "{id}"))
        for route in bare.application().router.routes()
        if route.method != "HEAD"
    }
    documented = {(m.upper(), p) for p, ops in bare.openapi()["paths"].items() for m in ops}
    assert served == documented
