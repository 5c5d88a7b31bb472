"""Prometheus metrics of the local model server (served on /metrics and /monitoring/prometheus/metrics)."""

from __future__ import annotations

import prometheus_client

from cbir.metrics import LATENCY_BUCKETS

PREDICT_REQUESTS = prometheus_client.Counter(
    "cbir_embedder_predict_requests_total",
    "Predict requests by model, version and outcome (status code name).",
    ["model_name", "version", "status"],
)
PREDICT_LATENCY = prometheus_client.Histogram(
    "cbir_embedder_predict_seconds",
    "Time from request to answer of a Predict, including batching delay.",
    ["model_name"],
    buckets=LATENCY_BUCKETS,
)
PREDICT_ITEMS = prometheus_client.Counter(
    "cbir_embedder_predict_items_total",
    "Items (images) embedded, by model.",
    ["model_name"],
)
BATCH_SIZE = prometheus_client.Histogram(
    "cbir_embedder_batch_size",
    "Items per model run formed by the dynamic batcher (after padding).",
    ["batcher"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BATCHES_CLOSED = prometheus_client.Counter(
    "cbir_embedder_batches_closed_total",
    "Batches formed by the dynamic batcher, by why they closed: full (max batch size), demand (as many "
    "items as were outstanding), timeout (batch_timeout_micros passed first), or immediate (timeout 0).",
    ["batcher", "reason"],
)
BATCH_WAIT = prometheus_client.Histogram(
    "cbir_embedder_batch_wait_seconds",
    "Time a request waited in the batching queue.",
    ["batcher"],
    buckets=LATENCY_BUCKETS,
)
MODEL_LOADS = prometheus_client.Counter(
    "cbir_embedder_model_loads_total",
    "Model version loads by model and outcome (ok/error).",
    ["model_name", "outcome"],
)
MODEL_LOAD_SECONDS = prometheus_client.Histogram(
    "cbir_embedder_model_load_seconds",
    "Time to load and warm up a model version.",
    ["model_name"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
AVAILABLE_VERSIONS = prometheus_client.Gauge(
    "cbir_embedder_available_versions",
    "Model versions currently AVAILABLE, by model.",
    ["model_name"],
)
