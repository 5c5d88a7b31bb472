"""Prometheus metrics shared by every service, and the HTTP endpoint that exposes them."""

from __future__ import annotations

import logging

import prometheus_client

log = logging.getLogger(__name__)

# Buckets from 0.5 ms to 30 s: loopback RPCs are sub-millisecond, CPU embedding takes seconds.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

GRPC_REQUESTS = prometheus_client.Counter(
    "cbir_grpc_requests_total",
    "gRPC requests handled, by method and final status code.",
    ["service", "method", "code"],
)
GRPC_LATENCY = prometheus_client.Histogram(
    "cbir_grpc_request_seconds",
    "Time to handle a gRPC request, by method.",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)
GRPC_IN_FLIGHT = prometheus_client.Gauge(
    "cbir_grpc_requests_in_flight",
    "gRPC requests being handled now.",
    ["service"],
)


def start_metrics_server(port: int, host: str) -> int:
    """Serves /metrics on ``port`` (0 picks a free one); returns the bound port, or -1 if disabled.

    A negative port disables the endpoint.
    """
    if port < 0:
        return -1
    server, _thread = prometheus_client.start_http_server(port, addr=host)
    bound = server.server_address[1]
    log.info("metrics endpoint listening", extra={"metrics_port": bound})
    return bound
