"""Rollout controller benchmark: the time from a new model version becoming AVAILABLE to its generation
serving, for a catalogue of a few thousand JPEGs (3000; quick mode 500), split into its phases.

Real processes: the local model server (the embedder benchmark's CNN, dynamic batching), one indexer,
and `python -m indexer follow`. Version 1 is rolled out first (warm-up, and the generation version 2
is compared with); version 2 is then exported and measured. Phase times are the ones the controller
records with its decision (RolloutDecision: reindex, evaluation, activation). Baselines, measured after
it with the same processes: the model server alone embedding the catalogue in the same batches (the
floor of any reindex), and embedding the evaluation queries twice (the floor of evaluating two
generations); for the whole decision, a manual `indexer reindex` of the catalogue (which activates
without evaluating anything): the ratio is what following and gating costs over doing it by hand.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from cbir.processes import ServiceProcess, running_service
from cbir.v1 import indexer_pb2
from embedder.client import EmbedderClient
from indexer.client import IndexerClient

MODEL = "bench"
BATCH = 32
CLASSES = 10


def _figure(name, value, unit, baseline_name, baseline, goal, higher_is_better) -> dict:
    return {
        "name": name,
        "value": float(value),
        "unit": unit,
        "baseline_name": baseline_name,
        "baseline": float(baseline),
        "ratio": float(value / baseline) if baseline else float("nan"),
        "goal": goal,
        "higher_is_better": higher_is_better,
    }


def _log(message: str, t0: list[float] = [time.perf_counter()]) -> None:  # noqa: B006 - start time
    print(f"[{time.perf_counter() - t0[0]:6.1f}s] {message}", file=sys.stderr, flush=True)


def _wait(condition, what: str, timeout: float, proc: ServiceProcess):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if not proc.alive():
            raise RuntimeError(f"the controller exited while waiting for {what}:\n{proc.log_text()[-3000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f}s:\n{proc.log_text()[-3000:]}")


def _activated(client: IndexerClient, version: int) -> indexer_pb2.RolloutDecision | None:
    for decision in client.list_rollouts(MODEL):
        if decision.model_version == version:
            if decision.verdict == indexer_pb2.ROLLOUT_VERDICT_REJECTED:
                raise RuntimeError(f"version {version} was rejected: {decision.reason}")
            return decision if decision.HasField("activated_at") else None
    return None


def run(quick: bool, workdir: Path) -> list[dict]:
    from benchmarks.bench_embedder import BATCHING, export_bench_model, make_jpegs

    workdir = Path(workdir)
    for leftover in ("models", "catalogue", "index"):  # of an earlier run
        shutil.rmtree(workdir / leftover, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    n_images = 500 if quick else 3000
    n_queries = 100 if quick else 300
    repo = workdir / "models"
    export_bench_model(repo, MODEL, 1)
    (workdir / "batching.txt").write_text(BATCHING)
    # Two versions loaded, as in production: the active one must stay served to be compared with.
    config = workdir / "models.config"
    config.write_text(
        f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{repo / MODEL}" '
        'model_platform: "tensorflow" model_version_policy { latest { num_versions: 2 } } } }\n'
    )
    catalogue = workdir / "catalogue"
    jpegs = make_jpegs(n_images)
    for j, data in enumerate(jpegs):
        folder = catalogue / f"class{j % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{j:05d}.jpg").write_bytes(data)
    _log(f"{n_images} JPEGs written")
    with ExitStack() as stack:
        _e, serving = stack.enter_context(
            running_service(
                "embedder",
                "serve",
                "--model_config_file",
                str(config),
                "--file_system_poll_wait_seconds",
                "0.2",
                "--enable_batching",
                "--batching_parameters_file",
                str(workdir / "batching.txt"),
                "--log-format",
                "text",
                log_dir=workdir,
                timeout=180,
            )
        )
        _i, indexer = stack.enter_context(
            running_service(
                "indexer",
                "serve",
                "--data-dir",
                str(workdir / "index"),
                "--metrics-port",
                "-1",
                "--log-format",
                "text",
                log_dir=workdir,
            )
        )
        _log("model server and indexer up")
        controller = ServiceProcess(
            [
                "-m",
                "indexer",
                "follow",
                "--indexer",
                indexer,
                "--serving",
                serving,
                "--model",
                MODEL,
                "--catalogue",
                str(catalogue),
                "--eval",
                str(catalogue),
                "--eval-max-queries",
                str(n_queries),
                # Random weights and arbitrary classes: the figures measure time, not quality.
                "--tolerance",
                "1",
                "--batch-size",
                str(BATCH),
                "--poll-seconds",
                "0.1",
                "--port",
                "0",
                "--metrics-port",
                "-1",
            ],
            workdir / "follow.log",
        )
        stack.callback(controller.stop)
        client = stack.enter_context(IndexerClient([indexer], timeout=120))
        embedder = stack.enter_context(EmbedderClient(serving, MODEL, timeout=120))
        _wait(lambda: _activated(client, 1), "version 1's rollout", 300, controller)
        _log("version 1 rolled out (warm-up)")

        export_bench_model(repo, MODEL, 2)
        _wait(lambda: embedder.model_versions().get(2) == "AVAILABLE", "version 2 AVAILABLE", 120, controller)
        available = time.perf_counter()
        decision = _wait(lambda: _activated(client, 2), "version 2's rollout", 300, controller)
        decided = time.perf_counter() - available
        _log(f"version 2 rolled out in {decided:.1f} s")
        if decision.active_model_version != 1 or not decision.active_metrics:
            raise RuntimeError(f"version 2 was not compared with version 1: {decision.reason}")

        embedder.embed(jpegs[:BATCH], version=2)  # warm
        started = time.perf_counter()
        for s in range(0, n_images, BATCH):
            embedder.embed(jpegs[s : s + BATCH], version=2)
        embed_catalogue = time.perf_counter() - started
        queries = [jpegs[i] for i in range(0, n_images, max(1, n_images // n_queries))][:n_queries]
        started = time.perf_counter()
        for _ in range(2):
            for s in range(0, len(queries), BATCH):
                embedder.embed(queries[s : s + BATCH], version=2)
        embed_queries = time.perf_counter() - started
        _log("model server alone measured")
        manual = _manual_reindex(catalogue, indexer, serving)
        _log("manual reindex measured")
    phases = decision.reindex_seconds + decision.evaluation_seconds + decision.activation_seconds
    return [
        _figure(
            f"rollout decision, version AVAILABLE -> active ({n_images} JPEGs, {decision.evaluation_queries} queries)",
            decided,
            "s",
            "manual `indexer reindex` of the catalogue (no evaluation)",
            manual,
            "ratio <= 2",
            False,
        ),
        _figure(
            "  reindex phase",
            decision.reindex_seconds,
            "s",
            f"model server alone embedding the catalogue (batches of {BATCH})",
            embed_catalogue,
            "ratio <= 1.5",
            False,
        ),
        _figure(
            "  evaluation phase (candidate and active generation)",
            decision.evaluation_seconds,
            "s",
            "model server alone embedding the queries twice",
            embed_queries,
            "ratio <= 2",
            False,
        ),
        _figure(
            "  activation phase (drain, check, activate, record, retention)",
            decision.activation_seconds,
            "s",
            "reindex phase",
            decision.reindex_seconds,
            "informational",
            False,
        ),
        _figure(
            "  outside the phases (noticing the version, recording the decision)",
            max(decided - phases, 0.0),
            "s",
            "rollout decision",
            decided,
            "informational",
            False,
        ),
    ]


def _manual_reindex(catalogue: Path, indexer: str, serving: str) -> float:
    """Seconds of `indexer reindex` (in this process) of the catalogue with version 2, activating it."""
    from indexer.cli import main

    started = time.perf_counter()
    code = main(
        [
            "reindex",
            str(catalogue),
            "--indexer",
            indexer,
            "--serving",
            serving,
            "--model",
            MODEL,
            "--model-version",
            "2",
            "--generation",
            "manual-v2",
            "--batch-size",
            str(BATCH),
            "--no-progress",
        ]
    )
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"the manual reindex failed with exit code {code}")
    return seconds


if __name__ == "__main__":
    import json

    quick = "--full" not in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(quick, Path(tmp)), indent=2))
