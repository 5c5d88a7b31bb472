"""Dynamic batching in the real server: many concurrent single-image clients get exactly the
embeddings that unbatched calls give, and their requests are really merged."""

from __future__ import annotations

import re
import threading
import urllib.request

import numpy as np
import pytest
import tensorflow as tf

from cbir.errors import InvalidInput
from cbir.processes import free_port, running_service
from embedder.client import EmbedderClient
from trainer.synthetic import make_image

pytestmark = pytest.mark.slow

CLIENTS = 24


def histogram(metrics: str, name: str) -> tuple[float, float]:
    count = sum(float(v) for v in re.findall(rf"^{name}_count{{[^}}]*}} (\S+)$", metrics, re.M))
    total = sum(float(v) for v in re.findall(rf"^{name}_sum{{[^}}]*}} (\S+)$", metrics, re.M))
    return count, total


def test_concurrent_single_image_requests_are_batched_and_exact(tiny_repo, tmp_path):
    params = tmp_path / "batching.config"
    params.write_text(
        "max_batch_size { value: 8 }\n"
        "batch_timeout_micros { value: 20000 }\n"
        "num_batch_threads { value: 2 }\n"
        "max_enqueued_batches { value: 100 }\n"
        "allowed_batch_sizes: 4\nallowed_batch_sizes: 8\n"
    )
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: true }")
    rest_port = free_port()
    images = [make_image(100 + i) for i in range(CLIENTS)]
    model_dir = tiny_repo / "tiny" / "2"
    # Unbatched reference: every image alone through the SavedModel in this process.
    embed_alone = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    want = np.concatenate(
        [embed_alone(image_bytes=tf.constant([image]))["embedding"].numpy() for image in images]
    )
    with running_service(
        "embedder",
        "serve",
        "--model_name",
        "tiny",
        "--model_base_path",
        str(tiny_repo / "tiny"),
        "--enable_batching",
        "--batching_parameters_file",
        str(params),
        "--rest_api_port",
        str(rest_port),
        "--monitoring_config_file",
        str(monitoring),
        "--max-workers",
        str(CLIENTS + 8),
        "--log-format",
        "text",
        log_dir=tmp_path,
    ) as (proc, target):
        with EmbedderClient(target, "tiny", max_retries=0) as client:
            client.signature()
            results: dict[int, list[np.ndarray]] = {i: [] for i in range(CLIENTS)}
            errors: list[str] = []
            barrier = threading.Barrier(CLIENTS)

            def one(i: int) -> None:
                barrier.wait()
                for _ in range(4):
                    try:
                        answer = client.embed([images[i]])
                        results[i].append(answer.vectors[0])
                    except Exception as exc:  # noqa: BLE001
                        errors.append(f"{i}: {exc}")

            threads = [threading.Thread(target=one, args=(i,)) for i in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert errors == []
            for i in range(CLIENTS):
                assert len(results[i]) == 4
                for vector in results[i]:
                    np.testing.assert_allclose(vector, want[i], atol=1e-5)

            metrics = (
                urllib.request.urlopen(
                    f"http://127.0.0.1:{rest_port}/monitoring/prometheus/metrics", timeout=10
                )
                .read()
                .decode()
            )
            runs, rows = histogram(metrics, "cbir_embedder_batch_size")
            # 96 requests (+1 warmup) in far fewer model runs: requests were merged.
            assert runs < 0.6 * CLIENTS * 4, (runs, rows)
            assert rows >= CLIENTS * 4

            # A corrupt image fails only its own request while neighbours in the same batch succeed.
            outcomes: dict[int, object] = {}
            barrier = threading.Barrier(8)

            def mixed(i: int) -> None:
                barrier.wait()
                try:
                    outcomes[i] = client.embed([b"corrupt" if i == 3 else images[i]]).vectors[0]
                except InvalidInput as exc:
                    outcomes[i] = exc

            threads = [threading.Thread(target=mixed, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert isinstance(outcomes[3], InvalidInput) and "image 0 is invalid" in str(outcomes[3])
            for i in (0, 1, 2, 4, 5, 6, 7):
                np.testing.assert_allclose(outcomes[i], want[i], atol=1e-5)
        assert proc.alive()
