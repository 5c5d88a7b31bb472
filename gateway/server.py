"""The SearchService servicer (a thin proto <-> core adapter) and the one function that wires the gateway."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2

from cbir import defaults
from cbir.logs import request_id_var
from cbir.server import RunningServer, ServerOptions, start_server
from cbir.tls import ClientTLS
from cbir.v1 import search_pb2, search_pb2_grpc, types_pb2
from gateway.auth import ApiKeyInterceptor, ApiKeys
from gateway.health import DependencyProber
from gateway.search import Query, SearchCore, SearchLimits, SearchResult, ServingInfo

if TYPE_CHECKING:
    from embedder.client import EmbedderClient
    from gateway.http_server import HttpServer
    from indexer.client import IndexerClient

log = logging.getLogger(__name__)

SERVICE_NAME = "cbir.v1.SearchService"


def to_query(request: search_pb2.SearchRequest) -> Query:
    which = request.WhichOneof("query")
    return Query(
        image=request.image if which == "image" else None,
        item_id=request.item_id if which == "item_id" else None,
        k=request.k,
        filter=request.filter if request.HasField("filter") else None,
        min_score=request.min_score if request.HasField("min_score") else None,
        ef=request.ef,
    )


def to_response(result: SearchResult, request_id: str) -> search_pb2.SearchResponse:
    return search_pb2.SearchResponse(hits=result.hits, generation=result.generation, request_id=request_id)


def to_batch_response(
    results: list[SearchResult], generation: types_pb2.GenerationRef, request_id: str
) -> search_pb2.BatchSearchResponse:
    return search_pb2.BatchSearchResponse(
        responses=[to_response(r, request_id) for r in results], generation=generation, request_id=request_id
    )


def to_serving_info(info: ServingInfo) -> search_pb2.ServingInfo:
    return search_pb2.ServingInfo(
        generation=info.generation,
        item_count=info.item_count,
        dimension=info.dimension,
        shard_count=info.shard_count,
        available_model_versions=info.available_model_versions,
    )


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    """Converts requests for :class:`SearchCore`; errors are mapped by the shared interceptor.

    The HTTP/JSON API (gateway/http_api.py) uses the same conversions over the same core.
    """

    def __init__(self, core: SearchCore) -> None:
        self.core = core

    def Search(
        self, request: search_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> search_pb2.SearchResponse:
        result = self.core.search(to_query(request), self.core.deadline(context.time_remaining()))
        return to_response(result, request_id_var.get())

    def BatchSearch(
        self, request: search_pb2.BatchSearchRequest, context: grpc.ServicerContext
    ) -> search_pb2.BatchSearchResponse:
        queries = [to_query(q) for q in request.queries]
        results, generation = self.core.batch_search(queries, self.core.deadline(context.time_remaining()))
        return to_batch_response(results, generation, request_id_var.get())

    def GetServingInfo(
        self, request: search_pb2.GetServingInfoRequest, context: grpc.ServicerContext
    ) -> search_pb2.ServingInfo:
        return to_serving_info(self.core.serving_info(self.core.deadline(context.time_remaining())))


@dataclass(frozen=True)
class HttpOptions:
    """The HTTP port (gateway/http_api.py): ``port`` 0 picks a free port, -1 turns HTTP off."""

    port: int = defaults.GATEWAY_HTTP_PORT
    port_file: str | None = None
    # Folder whose files the item image route may serve (None: only http(s) uris, as redirects).
    catalogue_root: str | None = None

    @property
    def enabled(self) -> bool:
        return self.port >= 0


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs besides the common server options (from the flags)."""

    serving: str
    indexers: tuple[str, ...]
    model_name: str | None = None
    limits: SearchLimits = SearchLimits()
    serving_tls: ClientTLS | None = None
    indexer_tls: ClientTLS | None = None
    api_keys_file: str | None = None
    api_keys_env: str | None = None
    probe_period: float = 2.0
    probe_timeout: float = 2.0
    max_message_bytes: int = defaults.MAX_MESSAGE_BYTES
    http: HttpOptions = HttpOptions(port=-1)


def _embedder_factory(
    config: GatewayConfig,
) -> tuple[Callable[[str], EmbedderClient], Callable[[], None]]:
    """One EmbedderClient per model name (normally one), created on first use; and a closer."""
    from embedder.client import EmbedderClient

    clients: dict[str, EmbedderClient] = {}
    lock = threading.Lock()

    def embedder_for(model_name: str) -> EmbedderClient:
        with lock:
            if model_name not in clients:
                clients[model_name] = EmbedderClient(
                    config.serving,
                    model_name,
                    tls=config.serving_tls,
                    timeout=config.limits.dependency_timeout,
                    max_message_bytes=config.max_message_bytes,
                )
            return clients[model_name]

    def close() -> None:
        with lock:
            for client in clients.values():
                client.close()
            clients.clear()

    return embedder_for, close


def build_gateway(options: ServerOptions, config: GatewayConfig) -> RunningServer:
    """Wires clients, core, auth, servicer, health prober and starts the server (health NOT_SERVING)."""
    from indexer.client import IndexerClient

    keys = ApiKeys.load(config.api_keys_file, config.api_keys_env)
    for tls in (config.serving_tls, config.indexer_tls):
        if tls is not None:
            # Read the PEM files now: a wrong path is a startup error, not a failure of the first search.
            tls.credentials()
    indexer = IndexerClient(
        list(config.indexers),
        tls=config.indexer_tls,
        timeout=config.limits.dependency_timeout,
        max_message_bytes=config.max_message_bytes,
    )
    embedder_for, close_embedders = _embedder_factory(config)
    core = SearchCore(embedder_for, indexer, config.limits, model_name=config.model_name)
    running = start_server(
        options,
        [(search_pb2_grpc.add_SearchServiceServicer_to_server, SearchServicer(core))],
        [SERVICE_NAME],
        serving=False,
        extra_interceptors=[ApiKeyInterceptor(keys)] if keys else [],
    )
    if config.http.enabled:
        try:
            http = _start_http(options, config, core, indexer, keys, running)
        except BaseException:
            running.stop(0)
            raise
        running.on_stop.append(http.stop)
    prober = DependencyProber(
        core,
        embedder_for,
        indexer,
        running.set_serving,
        period=config.probe_period,
        timeout=config.probe_timeout,
    )
    # Cleanups run in reverse: the prober and the HTTP server stop before the clients close.
    running.on_stop[:0] = [indexer.close, close_embedders]
    running.on_stop.append(prober.stop)
    prober.start()
    log.info(
        "gateway configured",
        extra={
            "serving": config.serving,
            "indexers": list(config.indexers),
            "model_name": config.model_name,
            "api_keys": len(keys) if keys else 0,
            "pid": os.getpid(),
        },
    )
    return running


def _grpc_serving(running: RunningServer) -> bool:
    """The gRPC health state of the whole server (what Kubernetes' gRPC probe sees)."""
    # HealthServicer.Check never reads its context.
    answer = running.health.Check(health_pb2.HealthCheckRequest(service=""), None)  # type: ignore[arg-type]
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def _start_http(
    options: ServerOptions,
    config: GatewayConfig,
    core: SearchCore,
    indexer: IndexerClient,
    keys: ApiKeys | None,
    running: RunningServer,
) -> HttpServer:
    """The HTTP/JSON API and search page over the same core, keys, TLS and limits as the gRPC port."""
    from concurrent.futures import ThreadPoolExecutor

    from cbir.server import write_port_file
    from gateway.http_api import HttpApi
    from gateway.http_server import HttpServer, listen, server_ssl_context
    from gateway.items import CatalogueItems

    ssl_context = server_ssl_context(options.tls) if options.tls is not None else None
    sock = listen(options.host, config.http.port)
    executor = ThreadPoolExecutor(options.max_workers, thread_name_prefix="gateway-http")
    api = HttpApi(
        core,
        CatalogueItems(indexer, config.http.catalogue_root),
        keys=keys,
        ready=lambda: _grpc_serving(running),
        executor=executor,
        max_body_bytes=config.max_message_bytes,
        service_name=options.service_name,
    )
    server = HttpServer(
        api.application(), sock, executor, ssl_context=ssl_context, shutdown_seconds=options.grace_seconds
    )
    server.start()
    if config.http.port_file:
        write_port_file(config.http.port_file, server.port)
    log.info(
        "http server started",
        extra={
            "http_port": server.port,
            "tls": ssl_context is not None,
            "catalogue_root": config.http.catalogue_root,
        },
    )
    return server
