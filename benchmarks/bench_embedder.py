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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from embedder.client import EmbedderClient
from tests.support.processes import running_service

CONCURRENCY = (1, 8, 32)
IMAGE_SIZE = 144
INPUT_SIZE = 128
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
            return image[offset : offset + INPUT_SIZE, offset : offset + INPUT_SIZE, :]

        pixels = tf.map_fn(
            preprocess,
            image_bytes,
            fn_output_signature=tf.TensorSpec((INPUT_SIZE, INPUT_SIZE, 3), tf.float32),
        )
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


@dataclass
class Sample:
    """Requests answered, time spent and per-call latencies, accumulated over time slices."""

    items: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Sample) -> None:
        self.items += other.items
        self.seconds += other.seconds
        self.latencies.extend(other.latencies)

    @property
    def throughput(self) -> float:
        return self.items / self.seconds

    def ms(self, q: float) -> float:
        return float(np.percentile(np.array(self.latencies), q)) * 1e3


def in_process_slice(embed, inputs: tf.Tensor, seconds: float) -> Sample:
    sample = Sample()
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        embed(image_bytes=inputs)["embedding"].numpy()
        sample.latencies.append(time.perf_counter() - t0)
    sample.seconds = time.perf_counter() - started
    sample.items = len(sample.latencies) * int(inputs.shape[0])
    return sample


def server_slice(target: str, images: list[bytes], clients: int, seconds: float) -> Sample:
    latencies: list[list[tuple[float, float]]] = [[] for _ in range(clients)]  # (end, latency)
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
                t1 = time.perf_counter()
                latencies[index].append((t1, t1 - t0))
                i += clients

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stopped = time.perf_counter()
    stop.set()
    for thread in threads:
        thread.join(30)
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    # Only calls that finished inside the window count (and were timed from after the barrier).
    flat = [latency for per_client in latencies for end, latency in per_client if started <= end <= stopped]
    return Sample(len(flat), stopped - started, flat)


def run(quick: bool, workdir: Path) -> list[dict]:
    # Short alternating slices of baseline and server, so that load from other processes on the
    # machine hits both alike.
    slices, slice_seconds, warmup_seconds = (3, 0.6, 1.5) if quick else (8, 2.0, 5.0)
    work = Path(workdir) / "embedder-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = export_bench_model(work / "models")
    (work / "batching.config").write_text(BATCHING)
    images = make_jpegs(64)
    embed = tf.saved_model.load(str(model_dir)).signatures["serving_default"]

    baseline = {c: Sample() for c in CONCURRENCY}
    served = {c: Sample() for c in CONCURRENCY}
    with running_service(
        "embedder",
        "serve",
        "--model_name",
        "bench",
        "--model_base_path",
        str(work / "models" / "bench"),
        "--enable_batching",
        "--batching_parameters_file",
        str(work / "batching.config"),
        "--max-workers",
        "48",
        "--log-level",
        "warning",
        log_dir=work,
    ) as (_proc, target):
        # Both sides run a while before anything is measured: the first second of calls after a
        # load is markedly slower (thread pools, allocator), on both sides.
        in_process_slice(embed, tf.constant(images[:1]), warmup_seconds)
        server_slice(target, images, 1, warmup_seconds)
        for c in CONCURRENCY:
            inputs = tf.constant([images[i % len(images)] for i in range(c)])
            for _ in range(2):
                embed(image_bytes=inputs)  # warm up this batch size
            for _ in range(slices):
                baseline[c].add(in_process_slice(embed, inputs, slice_seconds))
                served[c].add(server_slice(target, images, c, slice_seconds))
    figures: list[dict] = []
    for c in CONCURRENCY:
        base = {"throughput": baseline[c].throughput, "p50": baseline[c].ms(50), "p99": baseline[c].ms(99)}
        got = {"throughput": served[c].throughput, "p50": served[c].ms(50), "p99": served[c].ms(99)}
        in_process = f"in-process TF, batch of {c}"
        figures.append(
            {
                "name": f"embedder throughput, {c} client{'s' if c > 1 else ''}",
                "value": round(got["throughput"], 1),
                "unit": "images/s",
                "baseline_name": in_process,
                "baseline": round(base["throughput"], 1),
                "ratio": round(got["throughput"] / base["throughput"], 3),
                "goal": "ratio >= 0.8" if c == 32 else "report",
                "higher_is_better": True,
            }
        )
        for q in ("p50", "p99"):
            figures.append(
                {
                    "name": f"embedder {q} latency, {c} client{'s' if c > 1 else ''}",
                    "value": round(got[q], 2),
                    "unit": "ms",
                    "baseline_name": f"{in_process} ({q} per call)",
                    "baseline": round(base[q], 2),
                    "ratio": round(got[q] / base[q], 3),
                    "goal": "report",
                    "higher_is_better": False,
                }
            )
    overhead = served[1].ms(50) - baseline[1].ms(50)
    figures.append(
        {
            "name": "embedder added latency, 1 client (p50 server - p50 in-process call)",
            "value": round(overhead, 2),
            "unit": "ms",
            "baseline_name": "in-process single-image call p50",
            "baseline": round(baseline[1].ms(50), 2),
            "ratio": round(served[1].ms(50) / baseline[1].ms(50), 3),
            "goal": "value <= 3",
            "higher_is_better": False,
        }
    )
    return figures


if __name__ == "__main__":
    import json
    import sys

    quick = "--full" not in sys.argv
    out = Path(tempfile.mkdtemp(prefix="bench-embedder-"))
    for figure in run(quick, out):
        print(json.dumps(figure))
