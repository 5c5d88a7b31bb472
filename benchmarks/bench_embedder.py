"""Model server benchmark: the local model server (``python -m embedder serve`` with dynamic batching)
against in-process batched TensorFlow on the same SavedModel.

1, 8 and 32 concurrent clients, in load-generator processes of their own (benchmarks/loadgen.py),
each send single-image Predicts for a fixed time; the baseline runs the SavedModel in this process
with batches of the same size (the best a server could do with perfect batching and no RPCs). A
single-image in-process call is the latency baseline. The model is a small CNN (JPEG decode, resize,
4 convolutions, L2 normalise) exported with the model contract, heavy enough that the figures say
something about serving, not about a no-op. Goals (issues 4 and 14): at 32 clients throughput >= 0.85
of in-process, with the batcher forming full batches (the batch-size histogram is reported); at
1 client <= 3 ms added latency.

The server's own cost is measured as CPU time (from /proc) per Predict with a tiny model whose
TensorFlow work is almost nothing, minus what the same model costs in-process at the batch sizes the
server formed (goal <= 0.3 ms at 8 clients), with a py-spy breakdown of where it goes.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from benchmarks import measure
from cbir.processes import ServiceProcess, free_port, wait_for_health, wait_for_port_file
from trainer.export import publish_version

CONCURRENCY = (1, 8, 32)
IMAGE_SIZE = 144
INPUT_SIZE = 128
DIM = 128
# Batching for CPU after TF Serving's batching guide (one batch thread, the queue fills while the
# model runs), with a 5 ms batch_timeout_micros as the upper bound: this model server closes a batch
# as soon as it holds the demand (embedder/batching.py), so the timeout gives full batches under
# steady load and costs nothing at low load.
BATCHING = """\
max_batch_size { value: 32 }
batch_timeout_micros { value: 5000 }
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
    module = BenchEmbedder()
    return publish_version(
        module,
        repo,
        name,
        version,
        signatures={"serving_default": module.serve_bytes},
        metadata={
            "backbone": "bench_4_convs",
            "embedding_dim": DIM,
            "metric": "cosine",
            "input": {"height": INPUT_SIZE, "width": INPUT_SIZE},
            "resize": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        },
    )


class TinyEmbedder(tf.Module):
    """JPEG bytes -> decode -> 8x8 average -> projection, L2-normalised: TensorFlow's share of a request
    is a small fraction of a millisecond, so the server's CPU per request is mostly its own."""

    def __init__(self, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.projection = tf.Variable(rng.normal(0, 0.05, (8 * 8 * 3, DIM)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        def preprocess(data):
            image = tf.io.decode_jpeg(data, channels=3)
            return tf.image.resize(tf.cast(image, tf.float32), (8, 8), method="area")

        pixels = tf.map_fn(preprocess, image_bytes, fn_output_signature=tf.TensorSpec((8, 8, 3), tf.float32))
        flat = tf.reshape(pixels / 127.5 - 1.0, (-1, 8 * 8 * 3))
        return {"embedding": tf.math.l2_normalize(tf.matmul(flat, self.projection), axis=1)}


def export_tiny_model(repo: Path, name: str = "tiny", version: int = 1) -> Path:
    module = TinyEmbedder()
    return publish_version(
        module,
        repo,
        name,
        version,
        signatures={"serving_default": module.serve_bytes},
        metadata={"backbone": "bench_8x8_projection", "embedding_dim": DIM, "metric": "cosine"},
    )


PREDICT = "/tensorflow.serving.PredictionService/Predict"


def predict_requests(model: str, images: list[bytes], version: int | None = None) -> list[bytes]:
    """Serialised single-image PredictRequests, as a load generator sends them."""
    from tensorflow_serving.apis import predict_pb2

    out = []
    for image in images:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = "serving_default"
        if version is not None:
            request.model_spec.version.value = version
        tensor = request.inputs["image_bytes"]
        tensor.dtype = tf.string.as_datatype_enum
        tensor.tensor_shape.dim.add(size=1)
        tensor.string_val.append(image)
        request.output_filter.append("embedding")
        out.append(request.SerializeToString())
    return out


def make_jpegs(count: int, size: int = IMAGE_SIZE) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


@dataclass
class Sample:
    """Images answered, time and CPU spent and per-call latencies, accumulated over time slices."""

    items: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    calls: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Sample) -> None:
        self.items += other.items
        self.seconds += other.seconds
        self.cpu += other.cpu
        self.calls += other.calls
        self.latencies.extend(other.latencies)

    @property
    def throughput(self) -> float:
        return self.items / self.seconds

    def ms(self, q: float) -> float:
        return float(np.percentile(np.array(self.latencies), q)) * 1e3

    @property
    def cpu_ms_per_call(self) -> float:
        return self.cpu / self.calls * 1e3


def in_process_slice(embed, inputs: tf.Tensor, seconds: float) -> Sample:
    sample = Sample()
    cpu = measure.self_cpu()
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        embed(image_bytes=inputs)["embedding"].numpy()
        sample.latencies.append(time.perf_counter() - t0)
    sample.seconds = time.perf_counter() - started
    sample.cpu = measure.self_cpu() - cpu
    sample.calls = len(sample.latencies)
    sample.items = sample.calls * int(inputs.shape[0])
    return sample


def _batches(metrics_port: int, batcher: str):
    return measure.histogram(measure.scrape(metrics_port), "cbir_embedder_batch_size", batcher=batcher)


_CLOSE_REASONS = ("full", "demand", "timeout", "immediate")


def _closed_by(metrics_port: int, batcher: str) -> dict[str, float]:
    """Batches closed so far, by reason (embedder.metrics.BATCHES_CLOSED)."""
    found = measure.counter_by(
        measure.scrape(metrics_port), "cbir_embedder_batches_closed_total", "reason", batcher=batcher
    )
    return {reason: found.get(reason, 0.0) for reason in _CLOSE_REASONS}


class _BatchWatch:
    """Batch sizes formed by one batcher over several load windows (Prometheus deltas summed)."""

    def __init__(self, metrics_port: int, batcher: str):
        self.port, self.batcher = metrics_port, batcher
        self.rows: dict[tuple[float, float], float] = {}
        self.sum = self.count = 0.0
        self.closed = dict.fromkeys(_CLOSE_REASONS, 0.0)

    def around(self, load: callable):
        before = _batches(self.port, self.batcher)
        closed_before = _closed_by(self.port, self.batcher)
        result = load()
        rows, total, count = measure.histogram_delta(before, _batches(self.port, self.batcher))
        for reason, n in _closed_by(self.port, self.batcher).items():
            self.closed[reason] += n - closed_before[reason]
        for lower, upper, n in rows:
            self.rows[(lower, upper)] = self.rows.get((lower, upper), 0.0) + n
        self.sum += total
        self.count += count
        return result

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else float("nan")

    def text(self) -> str:
        rows = [(lo, hi, n) for (lo, hi), n in sorted(self.rows.items())]
        return (
            f"batch sizes formed (model runs per size bucket; mean {self.mean:.1f} images per run, "
            f"{self.count:.0f} runs):\n"
            + measure.format_histogram(rows)
            + "\nclosed by: "
            + ", ".join(f"{reason} {n:.0f}" for reason, n in self.closed.items())
        )


def _interpolate(points: dict[int, float], x: float) -> float:
    """Piecewise-linear value at ``x`` of points measured at a few batch sizes."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    for a, b in zip(xs, xs[1:], strict=False):
        if x <= b:
            return points[a] + (points[b] - points[a]) * (x - a) / (b - a)
    return points[xs[-1]]


def _model_config(repo: Path, names: tuple[str, ...]) -> str:
    return (
        "model_config_list {\n"
        + "".join(
            f'  config {{ name: "{name}" base_path: "{repo / name}" model_platform: "tensorflow" }}\n'
            for name in names
        )
        + "}\n"
    )


def start_model_server(
    work: Path,
    models: Path,
    metrics_port: int,
    extra: list[str] = (),
    names: tuple[str, ...] = ("bench", "tiny"),
) -> ServiceProcess:
    """The local model server over the bench models with the bench's batching (not waited for)."""
    (work / "batching.config").write_text(BATCHING)
    (work / "models.config").write_text(_model_config(models, names))
    return ServiceProcess(
        [
            "-m",
            "embedder",
            "serve",
            "--model_config_file",
            str(work / "models.config"),
            "--enable_batching",
            "--batching_parameters_file",
            str(work / "batching.config"),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(work / "embedder.port"),
            "--metrics-port",
            str(metrics_port),
            "--log-level",
            "warning",
            *extra,
        ],
        work / "embedder.log",
    )


def run(quick: bool, workdir: Path) -> list[dict]:
    # Short alternating slices of baseline and server, so that load from other processes on the
    # machine hits both alike.
    slices, slice_seconds, warmup_seconds = (1, 1.5, 1.0) if quick else (4, 3.0, 3.0)
    work = Path(workdir) / "embedder-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = export_bench_model(work / "models")
    tiny_dir = export_tiny_model(work / "models")
    metrics_port = free_port()
    server = start_model_server(work, work / "models", metrics_port)
    try:
        images = make_jpegs(64)
        tiny_images = make_jpegs(64, size=32)
        embed = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
        tiny = tf.saved_model.load(str(tiny_dir)).signatures["serving_default"]
        target = f"127.0.0.1:{wait_for_port_file(work / 'embedder.port', server, 180)}"
        wait_for_health(target, "", 180, server)
        pids = {"server": server.pid}
        requests = predict_requests("bench", images)
        tiny_requests = predict_requests("tiny", tiny_images)

        def load(reqs, clients, seconds, **kw):
            return measure.run_load(
                target, PREDICT, reqs, clients=clients, seconds=seconds, services=pids, workdir=work, **kw
            )

        # Both sides run a while before anything is measured: the first second of calls after a
        # load is markedly slower (thread pools, allocator), on both sides.
        in_process_slice(embed, tf.constant(images[:1]), warmup_seconds)
        load(requests, 8, warmup_seconds)
        load(tiny_requests, 8, warmup_seconds / 2)
        baseline = {c: Sample() for c in CONCURRENCY}
        served: dict[int, list[measure.LoadRun]] = {c: [] for c in CONCURRENCY}
        full_batches = _BatchWatch(metrics_port, "bench-1-serving_default")
        for c in CONCURRENCY:
            inputs = tf.constant([images[i % len(images)] for i in range(c)])
            for _ in range(2):
                embed(image_bytes=inputs)  # warm up this batch size
            for _ in range(slices):
                baseline[c].add(in_process_slice(embed, inputs, slice_seconds))
                if c == 32:
                    served[c].append(full_batches.around(lambda: load(requests, c, slice_seconds)))  # noqa: B023
                else:
                    served[c].append(load(requests, c, slice_seconds))

        # The server's own cost: the tiny model at 8 clients, against the same model in-process at
        # the batch sizes the server formed.
        tiny_batches = _BatchWatch(metrics_port, "tiny-1-serving_default")
        tiny_runs = []
        tiny_inprocess: dict[int, float] = {}
        for _ in range(max(1, slices // 2)):
            tiny_runs.append(tiny_batches.around(lambda: load(tiny_requests, 8, slice_seconds)))
        for size in (1, 2, 4, 8):
            inputs = tf.constant(tiny_images[:size])
            tiny(image_bytes=inputs)
            tiny_inprocess[size] = in_process_slice(tiny, inputs, slice_seconds / 2).cpu_ms_per_call / size
        profiler = measure.Profiler(
            server.pid, slice_seconds, work / "embedder.pyspy", extra=["--nonblocking", "--gil"]
        )
        profiled = load(tiny_requests, 8, slice_seconds + 1, on_start=profiler.start)
        stacks = profiler.stacks()
    finally:
        server.stop()

    figures: list[dict] = []
    runs = {c: measure.combine(served[c]) for c in CONCURRENCY}
    for c in CONCURRENCY:
        base, got = baseline[c], runs[c]
        in_process = f"in-process TF, batch of {c}"
        plural = "s" if c > 1 else ""
        figures.append(
            {
                "name": f"embedder throughput, {c} single-image client{plural}",
                "value": round(got.throughput, 1),
                "unit": "images/s",
                "baseline_name": in_process,
                "baseline": round(base.throughput, 1),
                "ratio": round(got.throughput / base.throughput, 3),
                "goal": "ratio >= 0.85" if c == 32 else "report",
                "higher_is_better": True,
                **({"details": full_batches.text()} if c == 32 else {}),
            }
        )
        for q in (50, 99):
            figures.append(
                {
                    "name": f"embedder p{q} latency, {c} client{plural}",
                    "value": round(got.ms(q), 2),
                    "unit": "ms",
                    "baseline_name": f"{in_process} (p{q} per call)",
                    "baseline": round(base.ms(q), 2),
                    "ratio": round(got.ms(q) / base.ms(q), 3),
                    "goal": "report",
                    "higher_is_better": False,
                }
            )
        figures.append(
            {
                "name": f"model server CPU per image, {c} client{plural} (bench CNN)",
                "value": round(got.cpu_ms("server"), 3),
                "unit": "ms",
                "baseline_name": f"{in_process} (CPU per image)",
                "baseline": round(base.cpu / base.items * 1e3, 3),
                "ratio": round(got.cpu_ms("server") / (base.cpu / base.items * 1e3), 3),
                "goal": "report",
                "higher_is_better": False,
            }
        )
    figures.append(
        {
            "name": "mean batch size formed, 32 single-image clients",
            "value": round(full_batches.mean, 2),
            "unit": "images",
            "baseline_name": "max_batch_size",
            "baseline": 32,
            "ratio": round(full_batches.mean / 32, 3),
            "goal": "ratio >= 0.9",
            "higher_is_better": True,
            "details": full_batches.text(),
        }
    )
    overhead = runs[1].ms(50) - baseline[1].ms(50)
    figures.append(
        {
            "name": "embedder added latency, 1 client (p50 server - p50 in-process call)",
            "value": round(overhead, 2),
            "unit": "ms",
            "baseline_name": "in-process single-image call p50",
            "baseline": round(baseline[1].ms(50), 2),
            "ratio": round(runs[1].ms(50) / baseline[1].ms(50), 3),
            "goal": "value <= 3",
            "higher_is_better": False,
        }
    )
    tiny_run = measure.combine(tiny_runs)
    tf_own = _interpolate(tiny_inprocess, tiny_batches.mean)
    server_cpu = tiny_run.cpu_ms("server")
    figures.append(
        {
            "name": "model server CPU per Predict beyond TensorFlow's own compute, 8 clients (tiny model)",
            "value": round(server_cpu - tf_own, 3),
            "unit": "ms",
            "baseline_name": "server CPU per Predict (the same model in-process costs the difference)",
            "baseline": round(server_cpu, 3),
            "ratio": round((server_cpu - tf_own) / server_cpu, 3),
            "goal": "value <= 0.3",
            "higher_is_better": False,
            "details": (
                "TensorFlow's own CPU per image in-process: "
                + ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in tiny_inprocess.items())
                + f"; at the server's mean batch {tiny_batches.mean:.1f}: {tf_own:.3f} ms\n"
                + f"load generators' own CPU per Predict: {tiny_run.client_cpu_ms:.3f} ms\n"
                + (
                    profiler.error
                    or measure.format_breakdown(
                        stacks,
                        measure.EMBEDDER_RULES,
                        rate=profiler.rate,
                        seconds=profiler.seconds,
                        calls=profiled.throughput * profiler.seconds,
                        cpu_ms=profiled.cpu_ms("server"),
                    )
                )
            ),
        }
    )
    figures.append(
        {
            "name": "load generators' CPU per Predict, 32 clients",
            "value": round(runs[32].client_cpu_ms, 3),
            "unit": "ms",
            "baseline_name": "model server CPU per Predict, 32 clients",
            "baseline": round(runs[32].cpu_ms("server"), 3),
            "ratio": round(runs[32].client_cpu_ms / runs[32].cpu_ms("server"), 3),
            "goal": "report",
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
