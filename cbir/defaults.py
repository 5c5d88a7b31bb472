"""Default ports of every component, read by the services, the deploy tests and the docs."""

# TensorFlow Serving's own defaults; the local model server keeps them.
SERVING_GRPC_PORT = 8500
SERVING_REST_PORT = 8501
GATEWAY_PORT = 50051
# The gateway's HTTP/JSON API and search page.
GATEWAY_HTTP_PORT = 8080
INDEXER_PORT = 50052
GATEWAY_METRICS_PORT = 9091
INDEXER_METRICS_PORT = 9092
# The rollout controller (`python -m indexer follow`): health only, and its metrics.
ROLLOUT_PORT = 50053
ROLLOUT_METRICS_PORT = 9093
# Largest gRPC message any service accepts or sends by default (a batch of encoded images).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
