"""The HTTP/JSON API and the search page: thin aiohttp handlers over SearchCore and CatalogueItems.

Google's HTTP/JSON transcoding conventions, as grpc-gateway and Cloud Endpoints apply them:
- ``POST /v1/search``, ``POST /v1/search:batch`` and ``GET /v1/serving-info`` carry the SearchService
  messages in the proto3 JSON mapping (``google.protobuf.json_format``: the JSON cannot drift from the
  protos), converted to and from the core exactly as the gRPC servicer does (gateway/server.py);
- an error answers with the HTTP status of its gRPC code (:data:`cbir.errors.HTTP_STATUS`, Google's mapping) and a
  ``google.rpc.Status``-shaped body whose message is the gRPC API's; the code comes from the one
  domain-error rule every transport uses (:func:`cbir.errors.status_of`).

Handlers run the blocking core in a thread pool (the event loop only parses HTTP), with the request
id in a context variable as in the gRPC interceptor. Every response gets the request id and security
headers; one middleware maps errors, checks API keys and counts requests.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import importlib.metadata
import json
import logging
import math
import mimetypes
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message
from multidict import MultiDict, MultiDictProxy

from cbir.errors import HTTP_STATUS, InvalidInput, status_of
from cbir.logs import request_id_var
from cbir.server import REQUEST_ID_HEADER, request_id_from
from cbir.v1 import search_pb2, types_pb2
from gateway import metrics, openapi
from gateway.auth import ApiKeys, check
from gateway.items import MAX_SAMPLE, CatalogueItems
from gateway.search import Deadline, SearchCore
from gateway.server import SERVICE_NAME, to_batch_response, to_query, to_response, to_serving_info

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).with_name("web")

# The page loads nothing from elsewhere; images may come from http(s) catalogue uris (the image
# route redirects there) and from the browser itself (the chosen photo's preview).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data: http: https:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# Deadline of a request, in seconds (Cloud Endpoints' header; gRPC callers send a deadline instead).
TIMEOUT_HEADER = "x-server-timeout"
UPLOAD_FIELDS = ("k", "label", "min_score", "ef")
DEFAULT_SAMPLE = 12
_SEARCH = f"/{SERVICE_NAME}/Search"


class HttpProblem(Exception):
    """A request refused by the HTTP layer itself (unknown route, wrong content type, body too large)."""

    def __init__(self, http_status: int, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.http_status, self.code, self.message = http_status, code, message


@dataclass(frozen=True)
class Route:
    """One route: its OpenAPI path, the HttpApi method that serves it, and what API keys must allow.

    ``auth`` is the method name the API-key check is asked about (a transcoded RPC's full gRPC name,
    so scopes and messages are the gRPC API's); None leaves the route open, like gRPC health.
    ``rpc`` names the SearchService method whose messages the route carries; ``doc`` describes the
    other routes for /openapi.json.
    """

    method: str
    path: str
    handler: str
    auth: str | None = None
    rpc: str | None = None
    doc: dict[str, Any] = field(default_factory=dict)


def _query_parameter(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_UPLOAD_PARAMETERS = [
    _query_parameter("k", {"type": "integer", "format": "int32"}, "Number of hits (0 or absent: 10)."),
    _query_parameter(
        "label", {"type": "array", "items": {"type": "string"}}, "Only items with this label (repeatable)."
    ),
    _query_parameter("min_score", {"type": "number"}, "Drop hits scoring below this."),
    _query_parameter("ef", {"type": "integer", "format": "int32"}, "Search effort (HNSW ef); 0: default."),
]
_IMAGE_CONTENT = {"image/*": {"schema": {"type": "string", "format": "binary"}}}

ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/search", "search", auth=_SEARCH, rpc="Search"),
    Route("POST", "/v1/search:batch", "batch_search", auth=f"/{SERVICE_NAME}/BatchSearch", rpc="BatchSearch"),
    Route(
        "GET",
        "/v1/serving-info",
        "serving_info",
        auth=f"/{SERVICE_NAME}/GetServingInfo",
        rpc="GetServingInfo",
    ),
    Route(
        "POST",
        "/v1/search:upload",
        "upload_search",
        auth=_SEARCH,
        doc={
            "summary": "Search with an uploaded photo (multipart form or a raw image body).",
            "description": "Search with a file field `image` of a multipart/form-data body (`curl -F "
            "image=@photo.jpg`), or with the image itself as the body (Content-Type image/*). k, label, "
            "min_score and ef come from form fields or query parameters. Answers like POST /v1/search.",
            "parameters": _UPLOAD_PARAMETERS,
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["image"],
                            "properties": {
                                "image": {"type": "string", "format": "binary"},
                                "k": {"type": "integer", "format": "int32"},
                                "label": {"type": "array", "items": {"type": "string"}},
                                "min_score": {"type": "number"},
                                "ef": {"type": "integer", "format": "int32"},
                            },
                        }
                    },
                    **_IMAGE_CONTENT,
                },
            },
            "responses": {"200": openapi.json_body(openapi.ref("cbir.v1.SearchResponse"), "SearchResponse")},
        },
    ),
    Route(
        "GET",
        "/v1/items:sample",
        "sample_items",
        auth="GET /v1/items:sample",
        doc={
            "summary": "A few catalogue items picked at random (to start a search from).",
            "description": "Items near a random direction of the active generation's embedding space: a "
            "different region of the catalogue each call, not a uniform sample.",
            "parameters": [
                _query_parameter(
                    "n",
                    {"type": "integer", "minimum": 1, "maximum": MAX_SAMPLE, "default": DEFAULT_SAMPLE},
                    "How many items.",
                )
            ],
            "responses": {
                "200": openapi.json_body(
                    {
                        "type": "object",
                        "properties": {"items": {"type": "array", "items": openapi.ref("cbir.v1.Item")}},
                    },
                    "The items.",
                )
            },
        },
    ),
    Route(
        "GET",
        "/v1/items/{id}/image",
        "item_image",
        auth="GET /v1/items/{id}/image",
        doc={
            "summary": "The catalogue image of an item (for thumbnails).",
            "description": "The file named by the item's uri when it lies under the gateway's "
            "--catalogue-root, or a redirect to its http(s) uri. Anything else is 404.",
            "parameters": [
                {
                    "name": "id",
                    "in": "path",
                    "required": True,
                    "description": "Item id, percent-encoded ('/' may be given as %2F or as it is).",
                    "schema": {"type": "string"},
                }
            ],
            "responses": {
                "200": {"description": "The image file.", "content": _IMAGE_CONTENT},
                "302": {"description": "Redirect to the item's http(s) uri."},
            },
        },
    ),
    Route(
        "GET",
        "/healthz",
        "healthz",
        doc={"summary": "Liveness: the process answers.", "responses": {"200": {"description": "Alive."}}},
    ),
    Route(
        "GET",
        "/readyz",
        "readyz",
        doc={
            "summary": "Readiness: the gRPC health state (SERVING once Serving and every shard answer).",
            "responses": {"200": {"description": "SERVING."}, "503": {"description": "NOT_SERVING."}},
        },
    ),
    Route(
        "GET",
        "/openapi.json",
        "openapi_document",
        doc={"summary": "This document.", "responses": {"200": {"description": "OpenAPI 3 JSON."}}},
    ),
    Route(
        "GET",
        "/",
        "page",
        doc={"summary": "The search page.", "responses": {"200": {"description": "HTML."}}},
    ),
    Route(
        "GET",
        "/web/{file}",
        "static",
        doc={"summary": "The page's files.", "responses": {"200": {"description": "A file."}}},
    ),
)


def _aiohttp_path(path: str) -> str:
    # Item ids may contain '/', so the id takes everything up to the last "/image".
    return path.replace("{id}", "{id:.+}")


M = TypeVar("M", bound=Message)
T = TypeVar("T")


def parse_json(body: bytes, message_class: type[M]) -> M:
    """``body`` in the proto3 JSON mapping; InvalidInput naming the problem otherwise."""
    name = message_class.DESCRIPTOR.full_name
    if not body.strip():
        raise InvalidInput(f"the request body is empty; send a {name} as JSON")
    try:
        return json_format.Parse(body, message_class())
    except (json_format.ParseError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise InvalidInput(f"the request body is not a valid {name} in JSON: {exc}") from None


def to_json(message: Message) -> bytes:
    # Zero values are left out, as the proto3 JSON mapping does by default: spelling them out costs a
    # third more of json_format's (pure Python) time, the largest part of what HTTP adds to a search.
    return json_format.MessageToJson(message, indent=None, ensure_ascii=False).encode("utf-8")


def upload_request(image: bytes, fields: MultiDict[str] | MultiDictProxy[str]) -> search_pb2.SearchRequest:
    """The SearchRequest of an upload: the image plus k / label / min_score / ef from form or query."""
    unknown = sorted(set(fields) - set(UPLOAD_FIELDS))
    if unknown:
        raise InvalidInput(
            f"unknown field(s) {unknown}; an upload takes the file 'image' and k, label (repeatable), "
            "min_score and ef"
        )

    def single(name: str) -> str | None:
        values = [v.strip() for v in fields.getall(name, []) if v.strip()]
        if len(values) > 1:
            raise InvalidInput(f"{name} is given {len(values)} times; give it once")
        return values[0] if values else None

    def number(name: str, parse: Callable[[str], T], what: str) -> T | None:
        raw = single(name)
        if raw is None:
            return None
        try:
            return parse(raw)
        except ValueError:
            raise InvalidInput(f"{name} must be {what}, got {raw!r}") from None

    request = search_pb2.SearchRequest(image=image, k=number("k", int, "an integer") or 0)
    request.ef = number("ef", int, "an integer") or 0
    labels = [v.strip() for v in fields.getall("label", []) if v.strip()]
    if labels:
        request.filter.CopyFrom(types_pb2.Filter(labels=labels))
    min_score = number("min_score", float, "a number")
    if min_score is not None:
        request.min_score = min_score
    return request


@dataclass(frozen=True)
class _StaticFile:
    body: bytes
    content_type: str
    etag: str


def _load_static(root: Path) -> dict[str, _StaticFile]:
    """Every file of the page, read once; only these names are ever served (no path handling)."""
    files = {}
    for path in sorted(root.iterdir()):
        if path.is_file():
            body = path.read_bytes()
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if content_type.startswith("text/") or content_type.endswith(("javascript", "json", "svg+xml")):
                content_type += "; charset=utf-8"
            files[path.name] = _StaticFile(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:20]}"')
    return files


class HttpApi:
    """The aiohttp application of the gateway's HTTP port."""

    def __init__(
        self,
        core: SearchCore,
        items: CatalogueItems,
        *,
        keys: ApiKeys | None,
        ready: Callable[[], bool],
        executor: Executor,
        max_body_bytes: int,
        service_name: str = "gateway",
        web_root: Path = WEB_ROOT,
    ):
        self._core = core
        self._items = items
        self._keys = keys
        self._ready = ready
        self._executor = executor
        self._max_body = max_body_bytes
        self._service = service_name
        self._static = _load_static(web_root)
        self._routes = {(r.method, r.path): r for r in ROUTES}
        self._openapi: bytes | None = None

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body, middlewares=[self._middleware])
        for route in ROUTES:
            handler = getattr(self, route.handler)
            if route.method == "GET":
                app.router.add_get(_aiohttp_path(route.path), handler)
            else:
                app.router.add_route(route.method, _aiohttp_path(route.path), handler)
        return app

    def openapi(self) -> dict[str, Any]:
        operations = []
        for route in ROUTES:
            if route.rpc:
                operation = openapi.rpc_operation(route.rpc, body=route.method == "POST")
            else:
                operation = dict(route.doc)
            operation["operationId"] = route.handler
            operation["x-auth"] = route.auth is not None
            operations.append((route.method, route.path, operation))
        try:
            version = importlib.metadata.version("cbir")
        except importlib.metadata.PackageNotFoundError:
            version = "0"
        return openapi.document(
            operations, title="CBIR Search API", version=version, auth=self._keys is not None
        )

    # ----------------------------------------------------------------------------- plumbing

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request_id_from(((REQUEST_ID_HEADER, request.headers.get(REQUEST_ID_HEADER)),))
        token = request_id_var.set(request_id)
        resource = request.match_info.route.resource
        path = resource.canonical.replace("{id:.+}", "{id}") if resource is not None else "unmatched"
        status = 499  # unless a response is made: the client went away
        try:
            try:
                route = self._routes.get(("GET" if request.method == "HEAD" else request.method, path))
                if route is not None and route.auth is not None and self._keys is not None:
                    check(self._keys, route.auth, [(k.lower(), v) for k, v in request.headers.items()])
                response = await handler(request)
            except Exception as exc:  # noqa: BLE001 - the HTTP API's single mapping point
                response = self._error(request, exc, request_id)
            status = response.status
            response.headers[REQUEST_ID_HEADER] = request_id
            response.headers.update(SECURITY_HEADERS)
            response.headers.setdefault("Cache-Control", "no-store")
            return response
        finally:
            request_id_var.reset(token)
            metrics.HTTP_REQUESTS.labels(self._service, path, request.method, str(status)).inc()
            metrics.HTTP_LATENCY.labels(self._service, path).observe(time.perf_counter() - started)

    def _error(self, request: web.Request, exc: Exception, request_id: str) -> web.Response:
        if isinstance(exc, HttpProblem):
            http_status, code, message = exc.http_status, exc.code, exc.message
        elif isinstance(exc, web.HTTPRequestEntityTooLarge):
            http_status, code = 413, grpc.StatusCode.RESOURCE_EXHAUSTED
            message = (
                f"the request body is larger than the gateway's limit of {self._max_body} bytes "
                "(--max-message-bytes); send a smaller image"
            )
        elif isinstance(exc, web.HTTPMethodNotAllowed):
            http_status, code = 405, grpc.StatusCode.UNIMPLEMENTED
            allowed = ", ".join(sorted(exc.allowed_methods))
            message = f"{request.method} is not allowed on {request.path}; use {allowed}"
        elif isinstance(exc, web.HTTPNotFound):
            http_status, code = 404, grpc.StatusCode.NOT_FOUND
            message = f"no route {request.path}; the API is described at /openapi.json"
        elif isinstance(exc, web.HTTPException):
            http_status, code, message = exc.status, grpc.StatusCode.UNKNOWN, exc.reason
        else:
            found = status_of(exc)
            if found is None:
                log.exception("unhandled error", extra={"route": request.path})
                code, message = grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
            else:
                code, message = found
                log.info("request failed", extra={"route": request.path, "code": code.name, "error": message})
            http_status = HTTP_STATUS[code]
        body = {"code": code.value[0], "message": message, "status": code.name, "details": []}
        response = web.json_response(body, status=http_status)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            response.headers["WWW-Authenticate"] = 'Bearer realm="cbir"'
        return response

    async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
        """Runs blocking work on the gateway's HTTP thread pool, with this request's context variables."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, context.run, func, *args)

    def _deadline(self, request: web.Request) -> Deadline:
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return self._core.deadline(None)
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise InvalidInput(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {raw!r}")
        return self._core.deadline(seconds)

    async def _json_body(self, request: web.Request) -> bytes:
        if request.content_type != "application/json":
            raise HttpProblem(
                415,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"send the body as JSON with Content-Type: application/json (got {request.content_type!r})",
            )
        return await request.read()

    @staticmethod
    def _json(body: bytes, status: int = 200) -> web.Response:
        return web.Response(body=body, status=status, content_type="application/json", charset="utf-8")

    # ----------------------------------------------------------------------------- the API

    async def search(self, request: web.Request) -> web.Response:
        body, deadline = await self._json_body(request), self._deadline(request)
        return self._json(
            await self._in_thread(lambda: self._search(parse_json(body, search_pb2.SearchRequest), deadline))
        )

    def _search(self, message: search_pb2.SearchRequest, deadline: Deadline) -> bytes:
        return to_json(to_response(self._core.search(to_query(message), deadline), request_id_var.get()))

    async def batch_search(self, request: web.Request) -> web.Response:
        body, deadline = await self._json_body(request), self._deadline(request)

        def run() -> bytes:
            message = parse_json(body, search_pb2.BatchSearchRequest)
            results, generation = self._core.batch_search([to_query(q) for q in message.queries], deadline)
            return to_json(to_batch_response(results, generation, request_id_var.get()))

        return self._json(await self._in_thread(run))

    async def serving_info(self, request: web.Request) -> web.Response:
        deadline = self._deadline(request)
        return self._json(
            await self._in_thread(lambda: to_json(to_serving_info(self._core.serving_info(deadline))))
        )

    async def upload_search(self, request: web.Request) -> web.Response:
        deadline = self._deadline(request)
        fields = MultiDict(request.query)
        if request.content_type == "multipart/form-data":
            image = await self._form_image(request, fields)
        elif request.content_type.startswith("image/") or request.content_type == "application/octet-stream":
            image = await request.read()
        else:
            raise HttpProblem(
                415,
                grpc.StatusCode.INVALID_ARGUMENT,
                "send a multipart/form-data body with the file field 'image' (curl -F image=@photo.jpg), or "
                f"the image itself with Content-Type image/* (got {request.content_type!r})",
            )
        message = upload_request(image, fields)
        return self._json(await self._in_thread(self._search, message, deadline))

    async def _form_image(self, request: web.Request, fields: MultiDict[str]) -> bytes:
        try:
            form = await request.post()
        except web.HTTPException:
            raise
        except (ValueError, AssertionError, RuntimeError) as exc:
            raise InvalidInput(f"the multipart/form-data body is malformed: {exc}") from None
        image: bytes | None = None
        for name, value in form.items():
            if isinstance(value, web.FileField):
                if name != "image":
                    raise InvalidInput(f"unexpected file field {name!r}; send the photo as the field 'image'")
                if image is not None:
                    raise InvalidInput("more than one 'image' file; search with one photo at a time")
                # A spooled file: in memory up to aiohttp's spool size, and at most the body limit.
                image = value.file.read()
                value.file.close()
            elif name == "image":
                raise InvalidInput("the field 'image' must be a file (curl -F image=@photo.jpg)")
            else:
                if isinstance(value, (bytes, bytearray)):  # a part sent with a non-text Content-Type
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        raise InvalidInput(f"form field {name!r} is not UTF-8 text") from None
                fields.add(name, value)
        if image is None:
            raise InvalidInput(
                "the form has no file field 'image'; send the photo as image=@photo.jpg (curl -F)"
            )
        return image

    async def sample_items(self, request: web.Request) -> web.Response:
        raw = request.query.get("n", str(DEFAULT_SAMPLE))
        try:
            n = int(raw)
        except ValueError:
            raise InvalidInput(f"n must be an integer, got {raw!r}") from None
        deadline = self._deadline(request)

        def run() -> bytes:
            items = self._items.sample(n, deadline)
            return json.dumps(
                {"items": [json_format.MessageToDict(item) for item in items]},
                ensure_ascii=False,
            ).encode("utf-8")

        return self._json(await self._in_thread(run))

    async def item_image(self, request: web.Request) -> web.StreamResponse:
        item_id, deadline = request.match_info["id"], self._deadline(request)
        source = await self._in_thread(self._items.image_source, item_id, deadline)
        if source.url is not None:
            return web.Response(status=302, headers={"Location": source.url})
        # An ImageSource holds exactly one of url and path.
        return web.FileResponse(cast(Path, source.path), headers={"Cache-Control": "private, max-age=300"})

    # ----------------------------------------------------------------------------- health, docs, page

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self._ready()
        return web.json_response(
            {"status": "SERVING" if ready else "NOT_SERVING"}, status=200 if ready else 503
        )

    async def openapi_document(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = json.dumps(self.openapi(), indent=1).encode("utf-8")
        return self._json(self._openapi)

    async def page(self, request: web.Request) -> web.Response:
        return self._static_file(request, "index.html")

    async def static(self, request: web.Request) -> web.Response:
        return self._static_file(request, request.match_info["file"])

    def _static_file(self, request: web.Request, name: str) -> web.Response:
        found = self._static.get(name)
        if found is None:
            raise HttpProblem(404, grpc.StatusCode.NOT_FOUND, f"no file {name!r} in the search page")
        headers = {"ETag": found.etag, "Cache-Control": "no-cache", "Content-Type": found.content_type}
        if request.headers.get("If-None-Match") == found.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=found.body, headers=headers)
