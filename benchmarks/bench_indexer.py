"""Indexer benchmark: the `python -m indexer serve` process against in-process hnswlib with the same
parameters, on clustered vectors of dimension 128 (200k; quick mode 20k).

Figures: build time (streaming upserts, durable, through gRPC) vs raw hnswlib add_items; resident
memory of the server vs the raw float32 vectors; recall@10 vs exact search, and for queries unlike
any catalogue item the speed of the service's defaults against an exact scan plus an ef sweep of
recall against speed; batched and single-query QPS vs in-process hnswlib; per-query gRPC overhead
(p50 single-query latency minus in-process p50, minus an empty gRPC call, goal <= 0.25 ms); the
server's CPU per Knn (k=10, 2,000 items) under 8 load-generator clients against an empty gRPC call's,
with a py-spy breakdown; reindex throughput (catalogue -> local model server -> indexer) vs the model
server's own throughput on the same images and batch size (goal >= 0.95).

The vectors are Gaussian blobs each spread over an 8-dim subspace (+ small noise), like real
embeddings: clustered by class with a low intrinsic dimension. Recall is measured for queries drawn
from the same clusters, and for queries from other clusters (unlike any catalogue item: the hard
case for HNSW, compared with in-process hnswlib on the same queries).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import grpc
import hnswlib
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks import measure
from cbir.processes import ServiceProcess, running_service, wait_for_health, wait_for_port_file
from cbir.v1 import indexer_pb2, types_pb2
from indexer.client import IndexerClient
from indexer.graph import ExactIndex

DIM = 128
SMALL = 2_000  # items of the generation whose CPU per Knn is measured
KNN = "/cbir.v1.IndexerService/Knn"
HEALTH = "/grpc.health.v1.Health/Check"
# Up to 3200: at 200k items queries from other clusters need ef 1600-3200 for recall 0.96-0.99.
SWEEP_EF = (20, 50, 100, 200, 400, 800, 1600, 3200)


def _server_defaults() -> tuple[int, int, int]:
    from indexer.core import IndexerConfig

    config = IndexerConfig(data_dir=Path("."))
    return config.default_m, config.default_ef_construction, config.default_ef_search


M, EF_CONSTRUCTION, EF_SEARCH = _server_defaults()


def clustered(
    rng: np.random.Generator, n: int, dim: int, centres: int = 200, intrinsic: int = 8
) -> np.ndarray:
    c = rng.normal(size=(centres, dim)) * 2
    bases = rng.normal(size=(centres, intrinsic, dim)) / np.sqrt(intrinsic)
    which = rng.integers(0, centres, n)
    z = rng.normal(size=(n, intrinsic))
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 20_000):  # chunked: the einsum's temporaries stay small
        s = slice(start, start + 20_000)
        out[s] = (
            c[which[s]]
            + np.einsum("ni,nid->nd", z[s], bases[which[s]])
            + 0.1 * rng.normal(size=(len(z[s]), dim))
        )
    return out


def _figure(
    name, value, unit, baseline_name, baseline, goal, higher_is_better, ratio=None, details=""
) -> dict:
    if ratio is None:
        ratio = value / baseline if baseline else float("nan")
    return {
        "name": name,
        "value": float(value),
        "unit": unit,
        "baseline_name": baseline_name,
        "baseline": float(baseline),
        "ratio": float(ratio),
        "goal": goal,
        "higher_is_better": higher_is_better,
        **({"details": details} if details else {}),
    }


def _cpu_figures(client: IndexerClient, target: str, pid: int, pool: np.ndarray, workdir: Path, quick: bool):
    """CPU per Knn of a 2,000-item generation at 8 clients, against an empty call's, and its profile."""
    seconds = 2.0 if quick else 4.0
    client.create_generation(
        "small", types_pb2.EmbeddingSpace(model_name="bench", model_version=1), types_pb2.METRIC_COSINE, DIM
    )
    client.upsert(
        (indexer_pb2.Record(item=types_pb2.Item(id=f"small-{j:05d}"), vector=pool[j]) for j in range(SMALL)),
        generation="small",
    )
    knns = [
        indexer_pb2.KnnRequest(
            queries=[indexer_pb2.Vector(values=v)], k=10, generation="small"
        ).SerializeToString()
        for v in pool[-64:].tolist()
    ]
    health = [health_pb2.HealthCheckRequest().SerializeToString()]

    def load(method, requests, clients, secs, **kw):
        return measure.run_load(
            target,
            method,
            requests,
            clients=clients,
            seconds=secs,
            services={"indexer": pid},
            workdir=workdir,
            **kw,
        )

    load(KNN, knns, 8, 1.0)  # warm-up
    knn_runs, empty_runs = [], []
    for _ in range(1 if quick else 2):
        knn_runs.append(load(KNN, knns, 8, seconds))
        empty_runs.append(load(HEALTH, health, 8, seconds))
    knn, empty = measure.combine(knn_runs), measure.combine(empty_runs)
    profiler = measure.Profiler(pid, seconds, workdir / "indexer.pyspy", extra=["--nonblocking", "--gil"])
    profiled = load(KNN, knns, 8, seconds + 1, on_start=profiler.start)
    stacks = profiler.stacks()
    breakdown = profiler.error or measure.format_breakdown(
        stacks,
        measure.INDEXER_RULES,
        rate=profiler.rate,
        seconds=profiler.seconds,
        calls=profiled.throughput * profiler.seconds,
        cpu_ms=profiled.cpu_ms("indexer"),
    )
    return [
        _figure(
            f"indexer CPU per Knn (k=10, {SMALL:,} items), 8 clients",
            knn.cpu_ms("indexer"),
            "ms",
            "empty gRPC call (health Check) CPU, 8 clients",
            empty.cpu_ms("indexer"),
            "value <= 0.15",
            False,
            details=f"{knn.throughput:.0f} Knn/s; load generators' CPU per Knn {knn.client_cpu_ms:.3f} ms\n"
            f"py-spy --gil profile at 8 clients:\n{breakdown}",
        ),
        _figure(
            "indexer Knn throughput, 8 clients",
            knn.throughput,
            "queries/s",
            "empty gRPC calls/s, 8 clients",
            empty.throughput,
            "report",
            True,
        ),
    ]


def _partition_figures(
    x, ids, q, q_other, exact, exact_other, few, exact_ms, per_query_ms, raw_build
) -> list[dict]:
    """The partition index (IVF-flat) on the same vectors and queries, in-process as the service holds
    it: trained when it held 2^k vectors (the last growth step the service trains at before n), the
    rest assigned to those lists; recall and speed for a sweep of probes, one query at a time."""
    from indexer.partitions import RETRAIN_GROWTH, TRAIN_MIN, PartitionIndex, PartitionParams

    n = len(x)
    trained_at = TRAIN_MIN
    while trained_at * RETRAIN_GROWTH <= n:
        trained_at *= RETRAIN_GROWTH
    index = PartitionIndex(PartitionParams(metric=types_pb2.METRIC_COSINE, dimension=DIM), capacity=n)
    index.put(ids[:trained_at], x[:trained_at])
    started = time.perf_counter()
    index.retrain()
    train_seconds = time.perf_counter() - started
    index.put(ids[trained_at:], x[trained_at:])
    default = index.default_width

    def search(queries, width):
        with index.lock.read():
            return index.search(queries, 10, width=width)[0]

    def recall_of(queries, truth, width):
        return _recall([[ids[j] for j in row] for row in search(queries, width)], truth)

    rows, at_default = [], {}
    for probes in sorted({8, 16, 24, 48, 64, default}):
        other, own = recall_of(q_other, exact_other, probes), recall_of(q, exact, probes)
        ms = per_query_ms(lambda row: search(row, probes), few)  # noqa: B023 - used in this iteration
        if probes == default:
            at_default = {"other": other, "own": own, "ms": ms}
        rows.append(
            f"{probes:>6} {other:>14.3f} {own:>13.3f} {ms:>10.3f} {exact_ms / ms:>10.1f}x"
            + ("  <- default" if probes == default else "")
        )
    sweep = (
        f"probes sweep, in-process PartitionIndex, {index.lists} lists (trained at {trained_at} vectors), "
        f"{n} items, 1 query at a time:\n"
        f"{'probes':>6} {'recall@10 other':>14} {'recall@10 own':>13} {'ms/query':>10} {'vs exact':>11}\n"
        + "\n".join(rows)
    )
    return [
        _figure(
            "partition index: recall@10, queries from other clusters (hard case), its defaults",
            at_default["other"],
            "",
            "exact search",
            1.0,
            ">= 0.95",
            True,
        ),
        _figure(
            "partition index: recall@10, queries from the data's clusters, its defaults",
            at_default["own"],
            "",
            "exact search",
            1.0,
            ">= 0.98",
            True,
        ),
        _figure(
            "partition index: speed vs exact scan at its defaults, queries from other clusters",
            exact_ms / at_default["ms"],
            "x",
            "exact scan, 1 query at a time (ms per query)",
            exact_ms,
            "value >= 20",
            True,
            ratio=exact_ms / at_default["ms"],
            details=sweep,
        ),
        _figure(
            f"partition index: training ({trained_at} vectors, {index.lists} lists, k-means in a background thread)",
            train_seconds,
            "s",
            "in-process hnswlib add_items of every vector",
            raw_build,
            "informational",
            False,
        ),
    ]


def _recall(found: list[list[str]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def _start_embedder(workdir: Path, n_images: int):
    """Exports the embedder benchmark's CNN and starts the local model server (not waited for)."""
    try:
        from benchmarks.bench_embedder import BATCHING, export_bench_model, make_jpegs
    except ImportError:
        return None
    repo = workdir / "models"
    export_bench_model(repo)
    (workdir / "batching.txt").write_text(BATCHING)
    images = workdir / "catalogue" / "all"
    images.mkdir(parents=True, exist_ok=True)
    jpegs = make_jpegs(n_images)
    for j, data in enumerate(jpegs):
        (images / f"img{j:05d}.jpg").write_bytes(data)
    port_file = workdir / "embedder.port"
    proc = ServiceProcess(
        [
            "-m",
            "embedder",
            "serve",
            "--model_name",
            "bench",
            "--model_base_path",
            str(repo / "bench"),
            "--enable_batching",
            "--batching_parameters_file",
            str(workdir / "batching.txt"),
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--log-format",
            "text",
        ],
        workdir / "embedder.log",
    )
    return proc, port_file, jpegs


def _log(message: str, t0: list[float] = [time.perf_counter()]) -> None:  # noqa: B006 - start time
    print(f"[{time.perf_counter() - t0[0]:6.1f}s] {message}", file=sys.stderr, flush=True)


def run(quick: bool, workdir: Path) -> list[dict]:
    workdir = Path(workdir)
    for leftover in ("models", "catalogue", "index", "index-reindex"):  # of an earlier run
        shutil.rmtree(workdir / leftover, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    n = 20_000 if quick else 200_000
    n_images = 256 if quick else 1024
    rng = np.random.default_rng(0)
    pool = clustered(rng, n + 200, DIM)
    x, q = pool[:n], pool[n:]  # queries from the catalogue's own clusters
    # Queries unlike any catalogue item (the same generator draws other clusters): the hard case.
    q_other = clustered(np.random.default_rng(1), 200, DIM)
    ids = [f"item-{j:07d}" for j in range(n)]
    figures: list[dict] = []
    with ExitStack() as stack:
        # The model is exported and its server loads TensorFlow while the index is being built.
        embedder_pool = stack.enter_context(ThreadPoolExecutor(1))
        embedder_future = embedder_pool.submit(_start_embedder, workdir, n_images)
        stack.callback(lambda: embedder_future.result() and embedder_future.result()[0].stop())
        _proc, target = stack.enter_context(
            running_service(
                "indexer",
                "serve",
                "--data-dir",
                str(workdir / "index"),
                "--metrics-port",
                "-1",
                "--log-format",
                "text",
                "--snapshot-interval",
                "3600",
                log_dir=workdir,
            )
        )
        client = stack.enter_context(IndexerClient([target], timeout=120))
        rss_empty = client.stats()[0].process_rss_bytes
        _log("indexer up")

        # ---- build: durable streaming upserts vs raw hnswlib
        client.create_generation(
            "bench",
            types_pb2.EmbeddingSpace(model_name="bench", model_version=1),
            types_pb2.METRIC_COSINE,
            DIM,
        )
        started = time.perf_counter()
        for s in range(0, n, 20_000):
            client.upsert(
                (
                    indexer_pb2.Record(item=types_pb2.Item(id=ids[j]), vector=x[j])
                    for j in range(s, min(s + 20_000, n))
                ),
                generation="bench",
                batch_size=1000,
            )
        build = time.perf_counter() - started
        _log("built through the server")
        client.activate_generation("bench")
        raw = hnswlib.Index(space="cosine", dim=DIM)
        raw.init_index(max_elements=n, M=M, ef_construction=EF_CONSTRUCTION)
        started = time.perf_counter()
        raw.add_items(x, np.arange(n))
        raw_build = time.perf_counter() - started
        _log("built in-process")
        raw.set_ef(EF_SEARCH)
        # Wait for the model server now: its start-up must not compete with the latency figures.
        embedder = embedder_future.result()
        if embedder is not None:
            proc, port_file, _jpegs = embedder
            serving = f"127.0.0.1:{wait_for_port_file(port_file, proc, 180)}"
            wait_for_health(serving, timeout=180, proc=proc)
            embedder = (*embedder, serving)
        _log("model server up")
        figures.append(
            _figure(
                f"build {n} x {DIM} (durable, gRPC)",
                build,
                "s",
                "in-process hnswlib add_items",
                raw_build,
                "ratio <= 3",
                False,
            )
        )

        stats = client.stats()[0]
        raw_bytes = n * DIM * 4
        figures.append(
            _figure(
                "server resident memory",
                (stats.process_rss_bytes - rss_empty) / 2**20,
                "MiB",
                "raw float32 vectors",
                raw_bytes / 2**20,
                "ratio <= 3",
                False,
            )
        )

        # ---- recall@10 vs exact
        exact, _ = ExactIndex(1, ids, x).search(q, 10)
        answer = client.knn(q, 10, generation="bench")
        recall = _recall([[h.id for h in r.hits] for r in answer.results], exact)
        figures.append(
            _figure(
                "recall@10 (default params, queries from the data's clusters)",
                recall,
                "",
                "exact search",
                1.0,
                ">= 0.98",
                True,
            )
        )
        exact_index = ExactIndex(1, ids, x)
        exact_other, _ = exact_index.search(q_other, 10)
        answer = client.knn(q_other, 10, generation="bench")
        recall_other = _recall([[h.id for h in r.hits] for r in answer.results], exact_other)
        raw_labels, _ = raw.knn_query(q_other, k=10)
        raw_recall_other = _recall([[ids[j] for j in row] for row in raw_labels], exact_other)
        figures.append(
            _figure(
                "recall@10, queries from other clusters (hard case), service defaults",
                recall_other,
                "",
                "exact search",
                1.0,
                ">= 0.95",
                True,
                details=f"in-process hnswlib with the same parameters: {raw_recall_other:.3f}",
            )
        )

        def per_query_ms(search, queries, passes: int = 3) -> float:
            """Best of a few passes: on shared cores one preempted pass made a row of the sweep slower
            than a wider ef (ef 200 at 1.26 ms, ef 300 at 0.30 ms in the 2026-12-02 run)."""
            best = float("inf")
            for _ in range(passes):
                started = time.perf_counter()
                for row in queries:
                    search(row[None, :])
                best = min(best, (time.perf_counter() - started) / len(queries) * 1e3)
            return best

        few = q_other[: 40 if quick else 100]
        exact_ms = per_query_ms(lambda row: exact_index.search(row, 10), few)
        sweep, at_default = [], 0.0
        for ef in sorted({*SWEEP_EF, EF_SEARCH}):
            raw.set_ef(ef)
            labels, _ = raw.knn_query(q_other, k=10)
            recall_ef = _recall([[ids[j] for j in row] for row in labels], exact_other)
            labels_in, _ = raw.knn_query(q, k=10)
            recall_in = _recall([[ids[j] for j in row] for row in labels_in], exact)
            ms = per_query_ms(lambda row: raw.knn_query(row, k=10, num_threads=1), few)
            if ef == EF_SEARCH:
                at_default = ms
            sweep.append(
                f"{ef:>6} {recall_ef:>14.3f} {recall_in:>13.3f} {ms:>10.3f} {exact_ms / ms:>10.1f}x"
                + ("  <- service default" if ef == EF_SEARCH else "")
            )
        raw.set_ef(EF_SEARCH)
        figures.append(
            _figure(
                "speed vs exact scan at the service defaults, queries from other clusters",
                exact_ms / at_default,
                "x",
                "exact scan, 1 query at a time (ms per query)",
                exact_ms,
                "value >= 20",
                True,
                ratio=exact_ms / at_default,
                details=(
                    f"ef sweep, in-process hnswlib, M={M}, ef_construction={EF_CONSTRUCTION}, {n} items, "
                    "1 query at a time:\n"
                    f"{'ef':>6} {'recall@10 other':>14} {'recall@10 own':>13} {'ms/query':>10} {'vs exact':>11}\n"
                    + "\n".join(sweep)
                ),
            )
        )

        figures.extend(
            _partition_figures(x, ids, q, q_other, exact, exact_other, few, exact_ms, per_query_ms, raw_build)
        )
        _log("partition index measured")

        # ---- batched QPS
        def qps(call, seconds=3.0, per_call=1):
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                call()
                done += per_call
            return done / (time.perf_counter() - started)

        batch = q[:100]
        server_batched = qps(lambda: client.knn(batch, 10, generation="bench"), per_call=100)
        raw_batched = qps(lambda: raw.knn_query(batch, k=10), per_call=100)
        figures.append(
            _figure(
                "batched QPS (100 queries / RPC)",
                server_batched,
                "queries/s",
                "in-process hnswlib batched",
                raw_batched,
                "ratio >= 0.5",
                True,
            )
        )

        # ---- single-query latency and QPS
        def latencies(call, count):
            out = []
            for j in range(count):
                t0 = time.perf_counter()
                call(j)
                out.append(time.perf_counter() - t0)
            return np.array(out)

        count = 300 if quick else 1000
        latencies(lambda j: client.knn(q[j % 200], 10, generation="bench"), 20)  # warm-up
        server_lat = latencies(lambda j: client.knn(q[j % 200], 10, generation="bench"), count)
        raw_lat = latencies(lambda j: raw.knn_query(q[j % 200 : j % 200 + 1], k=10, num_threads=1), count)
        figures.append(
            _figure(
                "single-query QPS (1 client)",
                1 / server_lat.mean(),
                "queries/s",
                "in-process hnswlib single query",
                1 / raw_lat.mean(),
                "ratio >= 0.5",
                True,
            )
        )
        overhead = (np.median(server_lat) - np.median(raw_lat)) * 1e3
        # The floor any RPC pays on this machine right now: a health check does no work at all.
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest()
            latencies(lambda j: health.Check(check), 20)
            empty_rpc = np.median(latencies(lambda j: health.Check(check), count)) * 1e3
        figures.append(
            _figure(
                "indexer Knn RPC p50 minus in-process hnswlib p50 minus an empty gRPC call",
                overhead - empty_rpc,
                "ms",
                "empty gRPC round trip (health Check, p50)",
                empty_rpc,
                "value <= 0.25",
                False,
                ratio=overhead / empty_rpc,
                details=f"Knn RPC p50 {np.median(server_lat) * 1e3:.3f} ms, in-process p50 "
                f"{np.median(raw_lat) * 1e3:.3f} ms, so {overhead:.3f} ms of RPC overhead",
            )
        )
        figures.extend(_cpu_figures(client, target, _proc.pid, pool, workdir, quick))

        _log("queries measured")
        figures.append(
            _figure(
                "machine load average while measuring (1 min)",
                os.getloadavg()[0],
                "",
                "CPU cores",
                os.cpu_count() or 1,
                "informational",
                False,
            )
        )
        # ---- reindex throughput vs the model server's own
        if embedder is not None:
            # A fresh indexer: the benchmark's 20k vector-only items would be "pending" in a new
            # generation of this one (they have no image to embed).
            _proc2, target2 = stack.enter_context(
                running_service(
                    "indexer",
                    "serve",
                    "--data-dir",
                    str(workdir / "index-reindex"),
                    "--metrics-port",
                    "-1",
                    "--log-format",
                    "text",
                    log_dir=workdir,
                )
            )
            figures.extend(_reindex_figures(workdir, embedder, target2))
    return figures


def _reindex_figures(workdir: Path, embedder, indexer_target: str) -> list[dict]:
    from cbir.catalogue import read_catalogue
    from embedder.client import EmbedderClient
    from indexer.cli import build_parser, make_client
    from indexer.reindex import entry_items, open_embedder, options_from_args, reindex

    _proc, _port_file, jpegs, serving = embedder
    batch = 32
    with EmbedderClient(serving, "bench", timeout=60) as client:
        client.embed(jpegs[:batch])  # warm-up
        started = time.perf_counter()
        for s in range(0, len(jpegs), batch):
            client.embed(jpegs[s : s + batch])
        serving_rate = len(jpegs) / (time.perf_counter() - started)
    _log("model server measured")
    args = build_parser().parse_args(
        [
            "reindex",
            str(workdir / "catalogue"),
            "--indexer",
            indexer_target,
            "--serving",
            serving,
            "--model",
            "bench",
            "--batch-size",
            str(batch),
            "--no-progress",
            "--generation",
            "reindex-bench",
            "--no-activate",
            "--check-samples",
            "5",
        ]
    )
    items = entry_items(read_catalogue(args.catalogue))
    options = options_from_args(args)
    with make_client(args) as index, open_embedder(options) as serving_client:
        report = reindex(items, options, index, serving_client)
    _log("reindex measured")
    if report.failed or report.embedded != len(jpegs):
        raise RuntimeError(
            f"reindex embedded {report.embedded} of {len(jpegs)} ({len(report.failed)} failed)"
        )
    return [
        _figure(
            f"reindex streaming throughput ({len(jpegs)} JPEGs, batch {batch})",
            report.stream_items_per_second,
            "images/s",
            "model server alone (same batches)",
            serving_rate,
            "ratio >= 0.95",
            True,
        ),
        _figure(
            "reindex end to end (incl. create, drain, check)",
            report.items_per_second,
            "images/s",
            "model server alone (same batches)",
            serving_rate,
            "informational",
            True,
        ),
    ]


if __name__ == "__main__":
    import json

    quick = "--full" not in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        for fig in run(quick, Path(tmp)):
            print(json.dumps(fig))
