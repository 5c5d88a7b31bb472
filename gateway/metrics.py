"""Gateway-specific Prometheus metrics: per-stage latency, generation retries, dependency health.

gRPC requests by method and status (and total latency) come from the shared interceptor (cbir.metrics);
HTTP requests by route and status from the HTTP API's middleware (gateway/http_api.py).
"""

from __future__ import annotations

import time

import prometheus_client

from cbir.metrics import LATENCY_BUCKETS

STAGE_LATENCY = prometheus_client.Histogram(
    "cbir_gateway_stage_seconds",
    "Time spent in one stage of a search: decode (image checks), embed (Serving), "
    "lookup (stored vector of an item), knn (indexer neighbour query), generation (active generation).",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
GENERATION_RETRIES = prometheus_client.Counter(
    "cbir_gateway_generation_retries_total",
    "Searches redone because the active generation changed between embedding and the neighbour query.",
)
REENCODED_IMAGES = prometheus_client.Counter(
    "cbir_gateway_reencoded_images_total",
    "Query images re-encoded before embedding (animated, or a BMP variant the model cannot decode).",
    ["reason"],
)
COALESCED_BATCH = prometheus_client.Histogram(
    "cbir_gateway_coalesced_batch_size",
    "Concurrent image searches answered together by one Serving call and one Knn fan-out.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
DEPENDENCY_UP = prometheus_client.Gauge(
    "cbir_gateway_dependency_up",
    "1 when the last health probe reached the dependency (serving, indexer shard N), else 0.",
    ["dependency"],
)
DECODE_BYTES_IN_FLIGHT = prometheus_client.Gauge(
    "cbir_gateway_decode_bytes_in_flight",
    "Estimated bytes held by query-image decodes now (bounded by --max-decode-bytes-in-flight).",
)
SERVING = prometheus_client.Gauge(
    "cbir_gateway_serving", "1 when the gateway reports SERVING on its health service."
)
HTTP_REQUESTS = prometheus_client.Counter(
    "cbir_http_requests_total",
    "HTTP requests handled, by route (the path template) and HTTP status.",
    ["service", "route", "method", "status"],
)
HTTP_LATENCY = prometheus_client.Histogram(
    "cbir_http_request_seconds",
    "Time to handle an HTTP request, by route.",
    ["service", "route"],
    buckets=LATENCY_BUCKETS,
)


class _Stage:
    """Times a block into one stage's series (looked up once, not on every search)."""

    __slots__ = ("_series", "_started")

    def __init__(self, series: prometheus_client.Histogram) -> None:
        self._series = series

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._series.observe(time.perf_counter() - self._started)


_stages: dict[str, prometheus_client.Histogram] = {}


def stage(name: str) -> _Stage:
    """Observes the time spent in the block under ``stage=name`` (also when it raises)."""
    series = _stages.get(name)
    if series is None:
        series = _stages[name] = STAGE_LATENCY.labels(name)
    return _Stage(series)
