"""The SearchService servicer (a thin proto <-> core adapter) and the one function that wires the gateway."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cbir.logs import request_id_var
from cbir.server import RunningServer, ServerOptions, start_server
from cbir.tls import ClientTLS
from cbir.v1 import search_pb2, search_pb2_grpc
from gateway.auth import ApiKeyInterceptor, ApiKeys
from gateway.health import DependencyProber
from gateway.search import Query, SearchCore, SearchLimits, SearchResult

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


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    """Converts requests for :class:`SearchCore`; errors are mapped by the shared interceptor."""

    def __init__(self, core: SearchCore):
        self.core = core

    def Search(self, request, context):
        result = self.core.search(to_query(request), self.core.deadline(context.time_remaining()))
        return to_response(result, request_id_var.get())

    def BatchSearch(self, request, context):
        queries = [to_query(q) for q in request.queries]
        results, generation = self.core.batch_search(queries, self.core.deadline(context.time_remaining()))
        request_id = request_id_var.get()
        return search_pb2.BatchSearchResponse(
            responses=[to_response(r, request_id) for r in results],
            generation=generation,
            request_id=request_id,
        )

    def GetServingInfo(self, request, context):
        info = self.core.serving_info(self.core.deadline(context.time_remaining()))
        return search_pb2.ServingInfo(
            generation=info.generation,
            item_count=info.item_count,
            dimension=info.dimension,
            shard_count=info.shard_count,
            available_model_versions=info.available_model_versions,
        )


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
    max_message_bytes: int = 64 * 1024 * 1024


def _embedder_factory(config: GatewayConfig) -> tuple[Callable[[str], object], Callable[[], None]]:
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
    prober = DependencyProber(
        core,
        embedder_for,
        indexer,
        running.set_serving,
        period=config.probe_period,
        timeout=config.probe_timeout,
    )
    running.on_stop.extend([indexer.close, close_embedders, prober.stop])
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
