"""Gateway benchmark: end-to-end Search (gateway -> model server -> indexer) against in-process embedding +
in-process hnswlib on the same model and data, and against the model server's own throughput.

Stack: ``python -m embedder serve`` (dynamic batching, the bench model of bench_embedder: JPEG decode +
4 convolutions, D=128), ``python -m indexer serve`` with a generation of the catalogue's vectors, and
``python -m gateway serve``; a second, identical stack with TLS on every hop. Load comes from
load-generator processes (benchmarks/loadgen.py), and each service's CPU is read from /proc over
every load window (benchmarks/measure.py). Baselines, measured on the same machine in the same run:
- latency: one image embedded by the SavedModel in this process, then hnswlib knn_query (same M, ef, k);
- throughput: the model server's own throughput at the same concurrency (single-image Predicts from
  the same load generators), i.e. what the gateway can at best pass on.
Goals (issue 14): Search p50 at 1 client at most 1.5 ms above in-process; gateway CPU per Search
<= 0.6 ms at 1 client (idle wake-ups included) and <= 0.4 ms at 8 clients; throughput at 16 clients
>= 0.95 of the model server's; the same with TLS on, whose cost is reported apart. A py-spy profile
of the gateway at 8 clients says where its CPU goes.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import hnswlib
import numpy as np
import tensorflow as tf

from benchmarks import measure
from benchmarks.bench_embedder import (
    PREDICT,
    export_bench_model,
    make_jpegs,
    predict_requests,
    start_model_server,
)
from cbir.processes import ServiceProcess, wait_for_health, wait_for_port_file
from cbir.tls_certs import make_certs, openssl_available
from cbir.v1 import indexer_pb2, search_pb2, types_pb2

CATALOGUE = 1000
K = 10
M, EF_CONSTRUCTION, EF_SEARCH = 16, 200, 200
SEARCH = "/cbir.v1.SearchService/Search"
KNN = "/cbir.v1.IndexerService/Knn"
GENERATION = "bench-v1"


def build_catalogue(model_dir: Path, images: list[bytes]) -> np.ndarray:
    embed = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    vectors = [
        embed(image_bytes=tf.constant(images[i : i + 64]))["embedding"].numpy()
        for i in range(0, len(images), 64)
    ]
    return np.concatenate(vectors)


def measure_in_process(model_dir: Path, index: hnswlib.Index, queries: list[bytes], seconds: float) -> dict:
    """One query at a time: embed in-process, then hnswlib (the no-RPC floor of a search)."""
    embed = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    for image in queries[:3]:
        embed(image_bytes=tf.constant([image]))
    latencies = []
    cpu = measure.self_cpu()
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        vector = embed(image_bytes=tf.constant([queries[i % len(queries)]]))["embedding"].numpy()
        index.knn_query(vector, k=K)
        latencies.append(time.perf_counter() - t0)
        i += 1
    elapsed = time.perf_counter() - started
    return {
        "throughput": len(latencies) / elapsed,
        "p50": float(np.percentile(latencies, 50)) * 1e3,
        "p99": float(np.percentile(latencies, 99)) * 1e3,
        "cpu_ms": (measure.self_cpu() - cpu) / len(latencies) * 1e3,
    }


def _load_generation(indexer: str, vectors: np.ndarray, tls=None) -> None:
    from indexer.client import IndexerClient

    with IndexerClient([indexer], timeout=60, tls=tls) as client:
        client.create_generation(
            GENERATION,
            types_pb2.EmbeddingSpace(model_name="bench", model_version=1),
            types_pb2.METRIC_COSINE,
            vectors.shape[1],
            indexer_pb2.HnswParams(m=M, ef_construction=EF_CONSTRUCTION, ef_search=EF_SEARCH),
        )
        records = (
            indexer_pb2.Record(item=types_pb2.Item(id=f"item-{i:05d}", label=f"c{i % 10}"), vector=v.tolist())
            for i, v in enumerate(vectors)
        )
        client.upsert(records, generation=GENERATION)
        client.activate_generation(GENERATION)


def _start(module: str, args: list[str], work: Path, name: str) -> tuple[ServiceProcess, Path]:
    port_file = work / f"{name}.port"
    proc = ServiceProcess(
        [
            "-m",
            module,
            "serve",
            *args,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--log-level",
            "warning",
        ],
        work / f"{name}.log",
    )
    return proc, port_file


class Stack:
    """Model server, indexer and gateway on free ports; with ``certs``, TLS on every hop; with
    ``http``, the gateway's HTTP port too (its ``127.0.0.1:<port>`` in ``http`` once ready)."""

    def __init__(self, work: Path, models: Path, certs=None, *, http: bool = False):
        self.work, self.certs, self._http = work, certs, http
        self.http = ""
        work.mkdir(parents=True, exist_ok=True)
        tls = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)] if certs else []
        self.serving_proc = start_model_server(work, models, metrics_port=-1, extra=tls, names=("bench",))
        self.indexer_proc, self._indexer_port = _start(
            "indexer", ["--data-dir", str(work / "index"), "--metrics-port", "-1", *tls], work, "indexer"
        )
        self.procs = [self.serving_proc, self.indexer_proc]
        self.serving = self.indexer = self.gateway = ""

    @property
    def credentials(self):
        import grpc

        return grpc.ssl_channel_credentials(self.certs.ca.read_bytes()) if self.certs else None

    @property
    def load_tls(self) -> dict | None:
        return {"ca": str(self.certs.ca)} if self.certs else None

    def client_tls(self):
        from cbir.tls import ClientTLS

        return ClientTLS(ca_file=str(self.certs.ca)) if self.certs else None

    def start_gateway(self) -> None:
        self.serving = f"127.0.0.1:{wait_for_port_file(self.work / 'embedder.port', self.serving_proc, 180)}"
        self.indexer = f"127.0.0.1:{wait_for_port_file(self._indexer_port, self.indexer_proc, 180)}"
        tls = []
        if self.certs:
            ca = str(self.certs.ca)
            tls = [
                *("--tls-cert", str(self.certs.server_cert), "--tls-key", str(self.certs.server_key)),
                *("--serving-tls-ca", ca, "--indexer-tls-ca", ca),
            ]
        self.gateway_proc, self._gateway_port = _start(
            "gateway",
            [
                "--serving",
                self.serving,
                "--indexer",
                self.indexer,
                "--metrics-port",
                "-1",
                *self._http_flags(),
                *tls,
            ],
            self.work,
            "gateway",
        )
        self.procs.append(self.gateway_proc)

    def _http_flags(self) -> list[str]:
        if not self._http:
            return ["--http-port", "-1"]
        return ["--http-port", "0", "--http-port-file", str(self.work / "gateway.http-port")]

    def ready(self, vectors: np.ndarray) -> None:
        wait_for_health(self.indexer, "", 180, self.indexer_proc, credentials=self.credentials)
        wait_for_health(self.serving, "", 180, self.serving_proc, credentials=self.credentials)
        _load_generation(self.indexer, vectors, tls=self.client_tls())
        self.gateway = f"127.0.0.1:{wait_for_port_file(self._gateway_port, self.gateway_proc, 180)}"
        wait_for_health(self.gateway, "", 180, self.gateway_proc, credentials=self.credentials)
        if self._http:
            port = wait_for_port_file(self.work / "gateway.http-port", self.gateway_proc, 30)
            self.http = f"127.0.0.1:{port}"

    @property
    def pids(self) -> dict[str, int]:
        return {
            "gateway": self.gateway_proc.pid,
            "embedder": self.serving_proc.pid,
            "indexer": self.indexer_proc.pid,
        }

    def load(self, target: str, method: str, requests: list[bytes], clients: int, seconds: float, **kw):
        return measure.run_load(
            target,
            method,
            requests,
            clients=clients,
            seconds=seconds,
            services=self.pids,
            tls=self.load_tls,
            workdir=self.work,
            **kw,
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def _figure(name, value, unit, baseline_name, baseline, goal="report", higher=False, ratio=None, **extra):
    if ratio is None:
        ratio = value / baseline if baseline else float("nan")
    return {
        "name": name,
        "value": round(float(value), 3),
        "unit": unit,
        "baseline_name": baseline_name,
        "baseline": round(float(baseline), 3),
        "ratio": round(float(ratio), 3),
        "goal": goal,
        "higher_is_better": higher,
        **extra,
    }


def run(quick: bool, workdir: Path) -> list[dict]:
    seconds = 2.0 if quick else 5.0
    rounds = 1 if quick else 2
    work = Path(workdir) / "gateway-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = export_bench_model(work / "models")
    certs = make_certs(work / "certs") if openssl_available() else None
    stacks = {"plain": Stack(work / "plain", work / "models")}
    if certs is not None:
        stacks["tls"] = Stack(work / "tls", work / "models", certs)
    try:
        for stack in stacks.values():
            stack.start_gateway()
        images = make_jpegs(CATALOGUE if not quick else 300)
        queries = images[: min(64, len(images))]
        vectors = build_catalogue(model_dir, images)
        index = hnswlib.Index(space="cosine", dim=vectors.shape[1])
        index.init_index(max_elements=len(vectors), M=M, ef_construction=EF_CONSTRUCTION)
        index.add_items(vectors, np.arange(len(vectors)))
        index.set_ef(EF_SEARCH)
        for stack in stacks.values():
            stack.ready(vectors)

        searches = [search_pb2.SearchRequest(image=image, k=K).SerializeToString() for image in queries]
        predicts = predict_requests("bench", queries, version=1)
        knns = [
            indexer_pb2.KnnRequest(
                queries=[indexer_pb2.Vector(values=v)], k=K, generation=GENERATION, require_active=True
            ).SerializeToString()
            for v in vectors[:64].tolist()
        ]
        plain = stacks["plain"]
        for stack in stacks.values():  # warm-up of every path, not measured
            stack.load(stack.gateway, SEARCH, searches, 8, 1.0)
        inproc: list[dict] = []
        runs: dict[str, list[measure.LoadRun]] = {}

        def keep(key: str, got: measure.LoadRun) -> None:
            runs.setdefault(key, []).append(got)

        # Alternate baseline and system per round so background load hits both alike.
        for _ in range(rounds):
            inproc.append(measure_in_process(model_dir, index, queries, seconds))
            for name, stack in stacks.items():
                keep(f"{name}-gw1", stack.load(stack.gateway, SEARCH, searches, 1, seconds))
                keep(f"{name}-gw8", stack.load(stack.gateway, SEARCH, searches, 8, seconds))
            keep("serving1", plain.load(plain.serving, PREDICT, predicts, 1, seconds / 2))
            keep("knn1", plain.load(plain.indexer, KNN, knns, 1, seconds / 2))
            keep("serving16", plain.load(plain.serving, PREDICT, predicts, 16, seconds))
            keep("gw16", plain.load(plain.gateway, SEARCH, searches, 16, seconds))
        profiler = measure.Profiler(
            plain.pids["gateway"], seconds, work / "gateway.pyspy", extra=["--nonblocking", "--gil"]
        )
        profiled = plain.load(plain.gateway, SEARCH, searches, 8, seconds + 1, on_start=profiler.start)
        stacks_sampled = profiler.stacks()
    finally:
        for stack in stacks.values():
            stack.stop()

    best = min(inproc, key=lambda r: r["p50"])
    got = {key: measure.combine(value) for key, value in runs.items()}
    gw1, gw8, gw16 = got["plain-gw1"], got["plain-gw8"], got["gw16"]
    serving1, knn1, serving16 = got["serving1"], got["knn1"], got["serving16"]
    base_name = "in-process embed + hnswlib, 1 query at a time"
    breakdown = profiler.error or measure.format_breakdown(
        stacks_sampled,
        measure.GATEWAY_RULES,
        rate=profiler.rate,
        seconds=profiler.seconds,
        calls=profiled.throughput * profiler.seconds,
        cpu_ms=profiled.cpu_ms("gateway"),
    )
    per_service = "\n".join(
        f"{label}: gateway {run.cpu_ms('gateway'):.3f} ms, model server {run.cpu_ms('embedder'):.3f} ms, "
        f"indexer {run.cpu_ms('indexer'):.3f} ms, load generators {run.client_cpu_ms:.3f} ms per Search"
        for label, run in (("1 client", gw1), ("8 clients", gw8), ("16 clients", gw16))
    )
    figures = [
        _figure(
            "Search p50 at 1 client minus in-process embed + hnswlib",
            gw1.ms(50) - best["p50"],
            "ms",
            f"{base_name} (p50)",
            best["p50"],
            "value <= 1.5",
            ratio=gw1.ms(50) / best["p50"],
        ),
        _figure(
            "gateway CPU per Search, 1 client (idle wake-ups included)",
            gw1.cpu_ms("gateway"),
            "ms",
            "in-process embed + hnswlib CPU per query",
            best["cpu_ms"],
            "value <= 0.6",
            details=per_service,
        ),
        _figure(
            "gateway CPU per Search, 8 clients",
            gw8.cpu_ms("gateway"),
            "ms",
            "in-process embed + hnswlib CPU per query",
            best["cpu_ms"],
            "value <= 0.4",
            details=f"py-spy --gil profile of the gateway at 8 clients:\n{breakdown}",
        ),
        _figure(
            "Search throughput, 16 clients, vs model server alone",
            gw16.throughput,
            "searches/s",
            "model server alone, 16 single-image clients (images/s)",
            serving16.throughput,
            "ratio >= 0.95",
            higher=True,
        ),
        _figure(
            "gateway's own p50 share, 1 client (Search p50 - Predict RPC p50 - Knn RPC p50)",
            gw1.ms(50) - serving1.ms(50) - knn1.ms(50),
            "ms",
            "Search p50, 1 client",
            gw1.ms(50),
        ),
        _figure(
            "model server Predict RPC p50, 1 client", serving1.ms(50), "ms", f"{base_name} (p50)", best["p50"]
        ),
        _figure("indexer Knn RPC p50, 1 client", knn1.ms(50), "ms", f"{base_name} (p50)", best["p50"]),
        _figure("Search p50 latency, 1 client", gw1.ms(50), "ms", f"{base_name} (p50)", best["p50"]),
        _figure("Search p99 latency, 1 client", gw1.ms(99), "ms", f"{base_name} (p99)", best["p99"]),
        _figure(
            "Search p50 latency, 16 clients",
            gw16.ms(50),
            "ms",
            "model server alone, 16 clients (p50)",
            serving16.ms(50),
        ),
        _figure(
            "Search p99 latency, 16 clients",
            gw16.ms(99),
            "ms",
            "model server alone, 16 clients (p99)",
            serving16.ms(99),
        ),
        _figure(
            "load generators' CPU per Search, 8 clients",
            gw8.client_cpu_ms,
            "ms",
            "gateway CPU per Search, 8 clients",
            gw8.cpu_ms("gateway"),
        ),
    ]
    if "tls" in stacks:
        t1, t8 = got["tls-gw1"], got["tls-gw8"]
        figures += [
            _figure(
                "TLS: Search p50 at 1 client minus in-process embed + hnswlib",
                t1.ms(50) - best["p50"],
                "ms",
                f"{base_name} (p50)",
                best["p50"],
                "value <= 1.5",
                ratio=t1.ms(50) / best["p50"],
            ),
            _figure(
                "TLS: gateway CPU per Search, 1 client",
                t1.cpu_ms("gateway"),
                "ms",
                "the same without TLS",
                gw1.cpu_ms("gateway"),
                "value <= 0.6",
            ),
            _figure(
                "TLS: gateway CPU per Search, 8 clients",
                t8.cpu_ms("gateway"),
                "ms",
                "the same without TLS",
                gw8.cpu_ms("gateway"),
                "value <= 0.4",
            ),
            _figure(
                "TLS cost: CPU per Search of the whole stack, 8 clients (TLS - plain)",
                sum(t8.service_cpu.values()) / t8.calls * 1e3
                - sum(gw8.service_cpu.values()) / gw8.calls * 1e3,
                "ms",
                "whole stack's CPU per Search without TLS",
                sum(gw8.service_cpu.values()) / gw8.calls * 1e3,
                details="\n".join(
                    f"{name}: {t8.cpu_ms(name):.3f} ms with TLS vs {gw8.cpu_ms(name):.3f} ms without"
                    for name in ("gateway", "embedder", "indexer")
                )
                + f"\np50 at 1 client: {t1.ms(50):.2f} ms with TLS vs {gw1.ms(50):.2f} ms without",
            ),
        ]
    return figures


if __name__ == "__main__":
    import json
    import sys

    quick = "--full" not in sys.argv
    out = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    for figure in run(quick, out):
        print(json.dumps(figure))
