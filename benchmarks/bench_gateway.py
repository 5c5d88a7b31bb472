"""Gateway benchmark: end-to-end Search (gateway -> model server -> indexer) against in-process embedding +
in-process hnswlib on the same model and data, and against the model server's own throughput.

Stack: ``python -m embedder serve`` (dynamic batching, the bench model of bench_embedder: JPEG decode +
4 convolutions, D=128), ``python -m indexer serve`` with a generation of the catalogue's vectors, and
``python -m gateway serve``. Baselines, measured in this process on the same machine:
- latency: one image embedded by the SavedModel in-process, then hnswlib knn_query (same M, ef, k);
- throughput: the model server's own throughput at the same concurrency (EmbedderClient, one image
  per call), i.e. what the gateway can at best pass on.
Goals (issue 6): p50 overhead <= 5 ms at 1 client; throughput >= 0.8 of the model server's at 16 clients.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import hnswlib
import numpy as np
import tensorflow as tf

from benchmarks.bench_embedder import BATCHING, export_bench_model, make_jpegs
from cbir.v1 import indexer_pb2, search_pb2, search_pb2_grpc, types_pb2
from tests.support.processes import ServiceProcess, free_port, wait_for_health, wait_for_port_file

CATALOGUE = 1000
K = 10
M, EF_CONSTRUCTION, EF_SEARCH = 16, 200, 200


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


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
        "p50": _percentile(latencies, 50) * 1e3,
        "p99": _percentile(latencies, 99) * 1e3,
    }


def measure_serving(target: str, queries: list[bytes], clients: int, seconds: float) -> dict:
    """The model server alone: each client embeds one image per call through EmbedderClient."""
    from embedder.client import EmbedderClient

    with EmbedderClient(target, "bench", max_retries=0, timeout=30) as client:
        return _closed_loop(lambda image: client.embed([image], version=1), queries, clients, seconds)


def measure_knn(target: str, vectors: np.ndarray, seconds: float) -> dict:
    """The indexer alone: one Knn RPC per query vector (what the gateway's neighbour stage costs)."""
    from indexer.client import IndexerClient

    rows = list(vectors[:64])
    with IndexerClient([target], timeout=30) as client:
        return _closed_loop(lambda v: client.knn(v, K, generation="bench-v1"), rows, 1, seconds)


def measure_gateway(target: str, queries: list[bytes], clients: int, seconds: float) -> dict:
    import grpc

    with grpc.insecure_channel(target) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        return _closed_loop(
            lambda image: stub.Search(search_pb2.SearchRequest(image=image, k=K), timeout=30),
            queries,
            clients,
            seconds,
        )


def _closed_loop(call, queries: list, clients: int, seconds: float) -> dict:
    """``clients`` threads each calling ``call(image)`` back to back for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    stop = threading.Event()
    barrier = threading.Barrier(clients + 1)

    def client_loop(index: int) -> None:
        call(queries[index % len(queries)])  # connection set-up, not timed
        barrier.wait()
        i = index
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                call(queries[i % len(queries)])
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
    if failures:
        raise RuntimeError(f"{len(failures)} calls failed, e.g. {failures[0]}")
    flat = [x for per_client in latencies for x in per_client]
    return {
        "throughput": len(flat) / elapsed,
        "p50": _percentile(flat, 50) * 1e3,
        "p99": _percentile(flat, 99) * 1e3,
    }


def _load_generation(indexer: str, vectors: np.ndarray) -> None:
    from indexer.client import IndexerClient

    with IndexerClient([indexer], timeout=60) as client:
        client.create_generation(
            "bench-v1",
            types_pb2.EmbeddingSpace(model_name="bench", model_version=1),
            types_pb2.METRIC_COSINE,
            vectors.shape[1],
            indexer_pb2.HnswParams(m=M, ef_construction=EF_CONSTRUCTION, ef_search=EF_SEARCH),
        )
        records = (
            indexer_pb2.Record(item=types_pb2.Item(id=f"item-{i:05d}", label=f"c{i % 10}"), vector=v.tolist())
            for i, v in enumerate(vectors)
        )
        client.upsert(records, generation="bench-v1")
        client.activate_generation("bench-v1")


def _start(module: str, args: list[str], work: Path) -> tuple[ServiceProcess, Path]:
    port_file = work / f"{module}.port"
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
        work / f"{module}.log",
    )
    return proc, port_file


def _ready(proc: ServiceProcess, port_file: Path, timeout: float = 180.0) -> str:
    target = f"127.0.0.1:{wait_for_port_file(port_file, proc, timeout)}"
    wait_for_health(target, "", timeout, proc)
    return target


def run(quick: bool, workdir: Path) -> list[dict]:
    seconds = 2.0 if quick else 8.0
    rounds = 1 if quick else 2
    work = Path(workdir) / "gateway-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = export_bench_model(work / "models")
    (work / "batching.config").write_text(BATCHING)
    procs: list[ServiceProcess] = []
    try:
        # All three services start at once (their imports dominate a quick run); the gateway turns
        # SERVING by itself once the generation below is active.
        # The gateway needs the model server's address up front, so that one gets a fixed free port.
        serving_target = f"127.0.0.1:{free_port()}"
        serving_proc = ServiceProcess(
            [
                "-m",
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
                "--host",
                "127.0.0.1",
                "--port",
                serving_target.rsplit(":", 1)[1],
                "--log-level",
                "warning",
            ],
            work / "embedder.log",
        )
        procs.append(serving_proc)
        indexer_proc, indexer_port = _start(
            "indexer", ["--data-dir", str(work / "index"), "--metrics-port", "-1"], work
        )
        procs.append(indexer_proc)
        indexer = _ready(indexer_proc, indexer_port)
        gateway_proc, gateway_port = _start(
            "gateway",
            [
                "--serving",
                serving_target,
                "--indexer",
                indexer,
                "--metrics-port",
                "-1",
                "--http-port",
                "-1",
                "--max-workers",
                "48",
                "--probe-period",
                "0.5",
            ],
            work,
        )
        procs.append(gateway_proc)

        images = make_jpegs(CATALOGUE if not quick else 300)
        queries = images[: min(64, len(images))]
        vectors = build_catalogue(model_dir, images)
        index = hnswlib.Index(space="cosine", dim=vectors.shape[1])
        index.init_index(max_elements=len(vectors), M=M, ef_construction=EF_CONSTRUCTION)
        index.add_items(vectors, np.arange(len(vectors)))
        index.set_ef(EF_SEARCH)

        wait_for_health(serving_target, "", 180, serving_proc)
        _load_generation(indexer, vectors)
        gateway = _ready(gateway_proc, gateway_port)
        results: dict[str, dict] = {}

        def keep_best(key: str, got: dict) -> None:
            if key not in results or got["throughput"] > results[key]["throughput"]:
                results[key] = got

        # Alternate baseline and system per round so background load hits both alike.
        for _ in range(rounds):
            keep_best("inproc", measure_in_process(model_dir, index, queries, seconds))
            keep_best("gw1", measure_gateway(gateway, queries, 1, seconds))
            keep_best("serving1", measure_serving(serving_target, queries, 1, seconds / 2))
            keep_best("knn1", measure_knn(indexer, vectors, seconds / 2))
            keep_best("serving16", measure_serving(serving_target, queries, 16, seconds))
            keep_best("gw16", measure_gateway(gateway, queries, 16, seconds))
    finally:
        for proc in reversed(procs):
            proc.stop()

    inproc, gw1, gw16, serving16 = results["inproc"], results["gw1"], results["gw16"], results["serving16"]
    serving1, knn1 = results["serving1"], results["knn1"]
    own = gw1["p50"] - serving1["p50"] - knn1["p50"]
    base_name = "in-process embed + hnswlib, 1 query at a time"
    return [
        {
            "name": "gateway Search p50 overhead, 1 client (gateway p50 - in-process p50)",
            "value": round(gw1["p50"] - inproc["p50"], 2),
            "unit": "ms",
            "baseline_name": f"{base_name} (p50)",
            "baseline": round(inproc["p50"], 2),
            "ratio": round(gw1["p50"] / inproc["p50"], 3),
            "goal": "value <= 5",
            "higher_is_better": False,
        },
        {
            "name": "gateway's own p50 share, 1 client (gateway p50 - model server RPC p50 - indexer Knn RPC p50)",
            "value": round(own, 2),
            "unit": "ms",
            "baseline_name": "gateway Search p50, 1 client",
            "baseline": round(gw1["p50"], 2),
            "ratio": round(own / gw1["p50"], 3),
            "goal": "report",
            "higher_is_better": False,
        },
        {
            "name": "model server Predict p50, 1 client (one image, EmbedderClient)",
            "value": round(serving1["p50"], 2),
            "unit": "ms",
            "baseline_name": "in-process embed + hnswlib p50",
            "baseline": round(inproc["p50"], 2),
            "ratio": round(serving1["p50"] / inproc["p50"], 3),
            "goal": "report",
            "higher_is_better": False,
        },
        {
            "name": "indexer Knn RPC p50, 1 client (k=10, IndexerClient)",
            "value": round(knn1["p50"], 2),
            "unit": "ms",
            "baseline_name": "in-process embed + hnswlib p50",
            "baseline": round(inproc["p50"], 2),
            "ratio": round(knn1["p50"] / inproc["p50"], 3),
            "goal": "report",
            "higher_is_better": False,
        },
        {
            "name": "gateway Search p50 latency, 1 client",
            "value": round(gw1["p50"], 2),
            "unit": "ms",
            "baseline_name": f"{base_name} (p50)",
            "baseline": round(inproc["p50"], 2),
            "ratio": round(gw1["p50"] / inproc["p50"], 3),
            "goal": "report",
            "higher_is_better": False,
        },
        {
            "name": "gateway Search p99 latency, 1 client",
            "value": round(gw1["p99"], 2),
            "unit": "ms",
            "baseline_name": f"{base_name} (p99)",
            "baseline": round(inproc["p99"], 2),
            "ratio": round(gw1["p99"] / inproc["p99"], 3),
            "goal": "report",
            "higher_is_better": False,
        },
        {
            "name": "gateway Search throughput, 1 client",
            "value": round(gw1["throughput"], 1),
            "unit": "searches/s",
            "baseline_name": base_name,
            "baseline": round(inproc["throughput"], 1),
            "ratio": round(gw1["throughput"] / inproc["throughput"], 3),
            "goal": "report",
            "higher_is_better": True,
        },
        {
            "name": "gateway Search throughput, 16 clients",
            "value": round(gw16["throughput"], 1),
            "unit": "searches/s",
            "baseline_name": "model server alone, 16 clients (images/s)",
            "baseline": round(serving16["throughput"], 1),
            "ratio": round(gw16["throughput"] / serving16["throughput"], 3),
            "goal": "ratio >= 0.8",
            "higher_is_better": True,
        },
        {
            "name": "gateway Search p50 latency, 16 clients",
            "value": round(gw16["p50"], 2),
            "unit": "ms",
            "baseline_name": "model server alone, 16 clients (p50)",
            "baseline": round(serving16["p50"], 2),
            "ratio": round(gw16["p50"] / serving16["p50"], 3),
            "goal": "report",
            "higher_is_better": False,
        },
        {
            "name": "gateway Search p99 latency, 16 clients",
            "value": round(gw16["p99"], 2),
            "unit": "ms",
            "baseline_name": "model server alone, 16 clients (p99)",
            "baseline": round(serving16["p99"], 2),
            "ratio": round(gw16["p99"] / serving16["p99"], 3),
            "goal": "report",
            "higher_is_better": False,
        },
    ]


if __name__ == "__main__":
    import json
    import sys

    quick = "--full" not in sys.argv
    out = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    for figure in run(quick, out):
        print(json.dumps(figure))
