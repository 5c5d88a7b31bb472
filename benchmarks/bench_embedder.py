"""Model server benchmark: the local model server (``python -m embedder serve`` with dynamic batching)
against in-process batched TensorFlow on the same SavedModel.

1, 8 and 32 concurrent clients each send single-image Predicts (through EmbedderClient) for a fixed
time; the baseline runs the SavedModel in this process with batches of the same size (the best a
server could do with perfect batching and no RPCs). A single-image in-process call is the latency
baseline. The model is a small CNN (JPEG decode, resize, 4 convolutions, L2 normalise) exported with
the model contract, heavy enough that the figures say something about serving, not about a no-op.
Goals (issue 4): at 32 clients throughput >= 0.8 of in-process; at 1 client <= 3 ms added latency.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from embedder.client import EmbedderClient
from tests.support.processes import running_service

CONCURRENCY = (1, 8, 32)
IMAGE_SIZE = 112
INPUT_SIZE = 96
DIM = 128
# Batching as recommended for CPU in TF Serving's batching guide: no artificial wait (the queue fills
# while the model runs), one batch thread per core pair; padding to a few sizes avoids retracing.
BATCHING = """\
max_batch_size { value: 32 }
batch_timeout_micros { value: 0 }
max_enqueued_batches { value: 1000 }
num_batch_threads { value: 1 }
"""


class BenchEmbedder(tf.Module):
    """JPEG bytes -> decode, resize, centre crop -> 4 strided convs -> pooled, projected, L2-normalised."""

    def __init__(self, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        shapes = [(3, 3, 3, 16), (3, 3, 16, 32), (3, 3, 32, 64), (3, 3, 64, 128)]
        self.kernels = [
            tf.Variable(rng.normal(0, (2.0 / np.prod(s[:3])) ** 0.5, s).astype(np.float32)) for s in shapes
        ]
        self.projection = tf.Variable(rng.normal(0, 0.05, (128, DIM)).astype(np.float32))

    def _pixels_to_embedding(self, pixels):
        x = pixels / 127.5 - 1.0
        for kernel in self.kernels:
            x = tf.nn.relu(tf.nn.conv2d(x, kernel, strides=2, padding="SAME"))
        return tf.math.l2_normalize(tf.matmul(tf.reduce_mean(x, axis=(1, 2)), self.projection), axis=1)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        def preprocess(data):
            image = tf.io.decode_jpeg(data, channels=3)
            image = tf.image.resize(tf.cast(image, tf.float32), (IMAGE_SIZE, IMAGE_SIZE))
            offset = (IMAGE_SIZE - INPUT_SIZE) // 2
            return image[offset:offset + INPUT_SIZE, offset:offset + INPUT_SIZE, :]

        pixels = tf.map_fn(preprocess, image_bytes, fn_output_signature=tf.TensorSpec(
            (INPUT_SIZE, INPUT_SIZE, 3), tf.float32))
        return {"embedding": self._pixels_to_embedding(pixels)}


def export_bench_model(repo: Path, name: str = "bench", version: int = 1) -> Path:
    final = repo / name / str(version)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=final.parent))
    module = BenchEmbedder()
    tf.saved_model.save(module, str(staging), signatures={"serving_default": module.serve_bytes})
    os.replace(staging, final)
    return final


def make_jpegs(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def measure_in_process(model_dir: Path, images: list[bytes], batch: int, seconds: float) -> dict:
    embed = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    inputs = tf.constant([images[i % len(images)] for i in range(batch)])
    for _ in range(3):
        embed(image_bytes=inputs)
    latencies = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        embed(image_bytes=inputs)["embedding"].numpy()
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    return {"throughput": batch * len(latencies) / elapsed, "p50": _percentile(latencies, 50) * 1e3,
            "p99": _percentile(latencies, 99) * 1e3}


def measure_server(target: str, images: list[bytes], clients: int, seconds: float) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    stop = threading.Event()
    barrier = threading.Barrier(clients + 1)

    def client_loop(index: int) -> None:
        with EmbedderClient(target, "bench", max_retries=0, timeout=30) as client:
            client.embed([images[index % len(images)]])  # connect + metadata, not timed
            barrier.wait()
            i = index
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    client.embed([images[i % len(images)]])
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    failures.append(str(exc))
                    continue
                latencies[index].append(time.perf_counter() - t0)
                i += clients

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - started
    for thread in threads:
        thread.join(30)
    flat = [x for per_client in latencies for x in per_client]
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return {"throughput": len(flat) / elapsed, "p50": _percentile(flat, 50) * 1e3, "p99": _percentile(flat, 99) * 1e3}


def run(quick: bool, workdir: Path) -> list[dict]:
    seconds = 1.5 if quick else 8.0
    rounds = 1 if quick else 2
    work = Path(workdir) / "embedder-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = export_bench_model(work / "models")
    (work / "batching.config").write_text(BATCHING)
    images = make_jpegs(64)

    baseline: dict[int, dict] = {}
    served: dict[int, dict] = {}
    with running_service(
        "embedder", "serve", "--model_name", "bench", "--model_base_path", str(work / "models" / "bench"),
        "--enable_batching", "--batching_parameters_file", str(work / "batching.config"),
        "--max-workers", "48", "--log-level", "warning", log_dir=work,
    ) as (_proc, target):
        # Baseline and server runs alternate per concurrency so that load from other processes on
        # the machine hits both alike; the better of two rounds is kept for each.
        for c in CONCURRENCY:
            for _ in range(rounds):
                base = measure_in_process(model_dir, images, c, seconds)
                got = measure_server(target, images, c, seconds)
                if c not in baseline or base["throughput"] > baseline[c]["throughput"]:
                    baseline[c] = base
                if c not in served or got["throughput"] > served[c]["throughput"]:
                    served[c] = got
    figures: list[dict] = []
    for c in CONCURRENCY:
        base, got = baseline[c], served[c]
        in_process = f"in-process TF, batch of {c}"
        figures.append({
            "name": f"embedder throughput, {c} client{'s' if c > 1 else ''}", "value": round(got["throughput"], 1),
            "unit": "images/s", "baseline_name": in_process, "baseline": round(base["throughput"], 1),
            "ratio": round(got["throughput"] / base["throughput"], 3),
            "goal": "ratio >= 0.8" if c == 32 else "report", "higher_is_better": True,
        })
        for q in ("p50", "p99"):
            figures.append({
                "name": f"embedder {q} latency, {c} client{'s' if c > 1 else ''}", "value": round(got[q], 2),
                "unit": "ms", "baseline_name": f"{in_process} ({q} per call)", "baseline": round(base[q], 2),
                "ratio": round(got[q] / base[q], 3), "goal": "report", "higher_is_better": False,
            })
    overhead = served[1]["p50"] - baseline[1]["p50"]
    figures.append({
        "name": "embedder added latency, 1 client (p50 server - p50 in-process call)",
        "value": round(overhead, 2), "unit": "ms", "baseline_name": "in-process single-image call p50",
        "baseline": round(baseline[1]["p50"], 2), "ratio": round(served[1]["p50"] / baseline[1]["p50"], 3),
        "goal": "value <= 3", "higher_is_better": False,
    })
    return figures


if __name__ == "__main__":
    import json
    import sys

    quick = "--full" not in sys.argv
    out = Path(tempfile.mkdtemp(prefix="bench-embedder-"))
    for figure in run(quick, out):
        print(json.dumps(figure))
