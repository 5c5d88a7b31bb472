"""`make demo`: the whole system on localhost, end to end, on 2 CPU cores.

Gets data, exports the untrained backbone as version 1 and trains (trainer CLI): on Fashion-MNIST a
small CNN briefly; on a user's catalogue (``--data``) the default recipe for real photos
(trainer/recipes.py: the pretrained EfficientNet-Lite0 fine-tuned on cached activations). Then it
starts the model server, the indexer and the gateway, reindexes the catalogue through Serving
(indexer reindex CLI), runs every test query through the Search RPC, evaluates through the system and
offline on the same embeddings, hot-swaps to version 2 (the trained model) while a client keeps
searching, evaluates it the same way, writes a report that answers "did training help?" (version 1
beside version 2 on the same catalogue and queries), and stops everything it started — also on
Ctrl-C, SIGTERM or failure.

Each run starts from fresh state under its root (models, runs, services, report); only the prepared
data is reused when its settings are unchanged.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from cbir.catalogue import read_catalogue, read_image_bytes
from cbir.errors import CbirError, FailedPrecondition
from cbir.v1 import search_pb2, search_pb2_grpc
from quickstart import data as demo_data
from quickstart import evaluation, report, services
from quickstart.options import FASHION_STEPS, DemoOptions
from quickstart.progress import Progress, StepFailed
from quickstart.stack import Stack

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "demo"
STEPS = 13
# The recipe at a test's scale on a user's catalogue (--quick --data): small inputs, few views.
QUICK_RECIPE = [
    "model.input.height=64",
    "model.input.width=64",
    "model.crop.height=72",
    "model.crop.width=72",
    "model.finetune.cached_views=2",
    "model.embedding_dim=32",
]


class _Interrupted(BaseException):
    """SIGTERM/SIGHUP turned into an exception so the cleanup in ``finally`` runs."""


def run_demo(options: DemoOptions) -> int:
    root = options.root.resolve()
    progress = Progress(STEPS)
    stack = Stack(root / "stack")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def interrupted(signum, _frame):
        raise _Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    # Ctrl-C stops the demo even when it was started with SIGINT ignored (from a background shell job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started_wall = time.monotonic()
    ok = False
    try:
        demo = _Demo(options, root, progress, stack)
        summary = demo.run()
        ok = (
            summary["evaluation"]["agree"]
            and summary["evaluation_v1"]["agree"]
            and summary["hot_swap"]["failed"] == 0
            and summary["hot_swap"]["inconsistent"] == 0
        )
        progress.say(
            f"\nreport: {root / 'report' / 'index.html'}  (figures in {root / 'report' / 'report.json'})"
        )
        progress.say(f"demo finished in {time.monotonic() - started_wall:.0f}s: " + summary["summary"])
    except (KeyboardInterrupt, _Interrupted) as exc:
        progress.say(f"\ninterrupted ({exc or 'Ctrl-C'}): stopping everything the demo started")
        return 130
    except CbirError as exc:
        progress.say(f"\ndemo failed: {exc.message}")
        return 1
    finally:
        progress.kill_current()
        if options.keep_running and ok:
            progress.say(f"services left running (stop: python -m quickstart down --root {stack.root})")
        else:
            stopped = stack.stop_all()
            progress.say(f"stopped: {', '.join(stopped)}" if stopped else "no service left running")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if ok else 1


def _machine() -> str:
    from benchmarks.run import machine_info

    info = machine_info()
    return (
        f"{info['cpu']}, {info['cores']} cores, {info.get('ram_gb', '?')} GB RAM, Python {info['python']}, "
        f"TensorFlow {info['tensorflow']}"
    )


class _Demo:
    """The steps of one demo run; state lives under ``root``."""

    def __init__(self, options: DemoOptions, root: Path, progress: Progress, stack: Stack):
        self.o = options
        self.root = root
        self.p = progress
        self.stack = stack
        self.models = root / "models"
        self.trainer_dir = root / "trainer"
        self.logs = root / "logs"
        self.report_dir = root / "report"
        self.report: dict = {
            "quick": options.quick,
            "models": [],
            "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": _machine(),
        }
        self.started = time.monotonic()

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        with self.p.step("Starting from a fresh state"):
            self._fresh_state()
            services.import_tensorflow_quietly()
        with self.p.step("Getting demo data"):
            train_per_class, test_per_class = self.o.per_class
            self.data = demo_data.prepare_demo_data(
                self.root / "data",
                data=self.o.data,
                train_per_class=train_per_class,
                test_per_class=test_per_class,
                seed=self.o.seed,
                install_package=self.o.install,
                allow_download=self.o.install,
                log=self.p.info,
            )
            self.p.info(
                f"{self.data.source}: {self.data.train_count} catalogue images, "
                f"{self.data.test_count} queries, {len(self.data.classes)} classes in {self.data.root}"
            )
            self.report["data"] = {
                "source": self.data.source,
                "classes": list(self.data.classes),
                "train_count": self.data.train_count,
                "test_count": self.data.test_count,
                "root": str(self.data.root),
            }
            self.gallery_entries = read_catalogue(self.data.train_dir, layout="folders")
            self.query_entries = read_catalogue(self.data.test_dir, layout="folders")
        with self.p.step(f"Exporting version 1: the {self.backbone} backbone as it is, before any training"):
            self._export(1, frozen=True)
        with self.p.step(f"Training version 2: {self.training_summary}"):
            self._train()
        with self.p.step("Starting the model server and the indexer"):
            self.ports = services.StackPorts.free()
            specs = services.stack_specs(
                self.stack.root, self.models, MODEL_NAME, self.ports, poll_seconds=0.5
            )
            self.report["services"] = []
            serving, indexer, self.gateway_spec = specs
            for spec in (serving, indexer):
                self._start(spec)
            services.wait_for_model_version(self.serving, MODEL_NAME, 1)
        with self.p.step(
            "Indexing the catalogue through Serving (generation of version 1); starting the gateway"
        ):
            self.gen1 = self._reindex(1)
            # The gateway serves once a generation is active.
            self._start(self.gateway_spec)
        with self.p.step(
            f"Searching every query through the gateway ({len(self.query_entries)} Search calls, version 1)"
        ):
            hits1, answered_by = self._search_all()
            self.p.info(f"answered by generation {answered_by}")
        with self.p.step("Evaluating version 1: through the system vs offline on the same embeddings"):
            self.report["evaluation_v1"] = self._evaluate(hits1, 1, self.gen1)
            self.grid_v1 = self._grid_rows(hits1)
        with self.p.step("Exporting version 2 (the trained model); Serving loads it"):
            self._export(2)
            services.wait_for_model_version(self.serving, MODEL_NAME, 2)
        with self.p.step("Hot-swap: reindexing with version 2 and activating it while searches run"):
            swap = self._hot_swap()
            self.report["hot_swap"] = swap
            self.p.info(
                f"{swap['searches']} searches during the swap, {swap['failed']} failed, "
                f"{swap['inconsistent']} answered with a model version other than their generation's; "
                f"{swap['answered_by_old']} by version 1, {swap['answered_by_new']} by version 2"
            )
        with self.p.step(
            f"Searching every query through the gateway ({len(self.query_entries)} Search calls, version 2)"
        ):
            hits2, answered_by = self._search_all()
            self.p.info(f"answered by generation {answered_by}")
        with self.p.step("Evaluating version 2 the same way; did training help?"):
            self.report["evaluation"] = self._evaluate(hits2, 2, self.gen2)
            self.grid_v2 = self._grid_rows(hits2)
            self._compare_versions()
        with self.p.step("Writing the report"):
            path = self._write_report()
            self.p.info(str(path))
        return self.report

    @property
    def backbone(self) -> str:
        return "efficientnet_lite0" if self.o.data is not None else "small_cnn"

    @property
    def training_summary(self) -> str:
        if self.o.data is None:
            return f"small_cnn from scratch, {self.steps} steps"
        return f"the default recipe for real photos (trainer/recipes.py), {self.steps} steps"

    @property
    def steps(self) -> int:
        if self.o.steps is not None:
            return self.o.steps
        if self.o.data is None:
            return FASHION_STEPS
        from trainer.recipes import STEPS as RECIPE_STEPS

        return RECIPE_STEPS

    @property
    def serving(self) -> str:
        return f"127.0.0.1:{self.ports.serving}"

    @property
    def indexer(self) -> str:
        return f"127.0.0.1:{self.ports.indexer}"

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.ports.gateway}"

    # ------------------------------------------------------------------ steps

    def _fresh_state(self) -> None:
        # A previous demo left running (--keep-running) or killed hard: stop it before wiping its data.
        stopped = self.stack.stop_all()
        if stopped:
            self.p.info(f"stopped a previous demo's {', '.join(stopped)}")
        for folder in (self.models, self.trainer_dir, self.logs, self.report_dir, self.stack.root):
            shutil.rmtree(folder, ignore_errors=True)
        for folder in (self.models, self.trainer_dir, self.logs, self.report_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.p.info(f"working in {self.root} (Python {platform.python_version()}, {sys.executable})")

    def _start(self, spec) -> None:
        services.start_service(self.stack, spec, log=self.p.info)
        record = self.stack.record(spec.name)
        self.report["services"].append(
            {"name": spec.name, "target": spec.target, "pid": record.pid, "log": record.log}
        )

    def _config(self) -> Path:
        """The Fashion-MNIST demo's config: a small CNN from scratch (a user's catalogue uses the recipe)."""
        size = self.o.image_size
        config = {
            "dataset": str(self.data.root),
            "loading_threads": 2,
            "checkpoint_frequency": self.steps,
            # Recall@1 on the test split at the last step, in the training log.
            "eval_frequency": self.steps,
            "model": {
                "name": "small_cnn",
                "head": "direct_normalize",
                "embedding_dim": self.o.embedding_dim,
                "weights": None,
                "input": {"height": size, "width": size},
                "crop": {"height": size + size // 8, "width": size + size // 8},
                "batch": {"P": min(len(self.data.classes), 10), "K": 4},
                "fit": {
                    # A proxy loss: batch-hard triplets collapsed this model (every score 0.9997-1.0).
                    "loss": "normalized_softmax",
                    "metric": "cosine",
                    "optimizer": "adam",
                    "epochs": self.steps,
                    "lr": 0.001,
                    "decay_start_iteration": -1,
                },
            },
        }
        path = self.root / "demo_config.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def _trainer(self, command: str, *extra: str) -> list[str]:
        if self.o.data is None:
            source = ["-c", str(self._config())]
        else:
            # The one command a user runs on their own catalogue (trainer/README.md).
            source = [
                "--dataset",
                str(self.data.root),
                *(f"--set={x}" for x in (QUICK_RECIPE if self.o.quick else [])),
            ]
        return [
            sys.executable,
            "-m",
            "trainer",
            command,
            *source,
            "--data-dir",
            str(self.trainer_dir),
            "--run-name",
            "demo",
            "--set",
            f"model.fit.epochs={self.steps}",
            *extra,
        ]

    def _train(self) -> None:
        started = time.monotonic()
        self.p.run(
            self._trainer("train", "--seed", str(self.o.seed)),
            self.logs / "train.log",
            cwd=REPO,
        )
        self.train_seconds = time.monotonic() - started
        checkpoint = self.trainer_dir / "checkpoints" / "demo" / "tf_ckpts" / f"ckpt-{self.steps}.index"
        if not checkpoint.exists():
            raise StepFailed(f"training did not leave the checkpoint of step {self.steps} ({checkpoint})")

    def _export(self, version: int, frozen: bool = False) -> None:
        which = ["--frozen-backbone"] if frozen else ["--checkpoint", "latest"]
        self.p.run(
            self._trainer(
                "export",
                *which,
                "--model-repo",
                str(self.models),
                "--model-name",
                MODEL_NAME,
                "--version",
                str(version),
            ),
            self.logs / f"export-v{version}.log",
            cwd=REPO,
        )
        meta_path = self.models / MODEL_NAME / str(version) / "assets.extra" / "cbir_model.json"
        meta = json.loads(meta_path.read_text())
        self.p.info(
            f"exported {self.models / MODEL_NAME / str(version)} ({meta.get('backbone')}, "
            f"{'untrained, ' if frozen else ''}{meta.get('embedding_dim')}-d)"
        )
        self.report["models"].append(
            {
                "version": version,
                "what": f"{meta.get('backbone')} as it is, untrained" if frozen else "trained",
                "backbone": meta.get("backbone"),
                "embedding_dim": meta.get("embedding_dim"),
                "steps": 0 if frozen else self.steps,
                "train_seconds": 0.0 if frozen else round(self.train_seconds, 1),
                "evaluation": meta.get("evaluation", {}),
            }
        )

    def _reindex(self, version: int) -> str:
        generation = f"demo-v{version}-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%S')}"
        self.p.run(
            [
                sys.executable,
                "-m",
                "indexer",
                "reindex",
                str(self.data.train_dir),
                "--layout",
                "folders",
                "--indexer",
                self.indexer,
                "--serving",
                self.serving,
                "--model",
                MODEL_NAME,
                "--model-version",
                str(version),
                "--generation",
                generation,
                "--metric",
                "cosine",
            ],
            self.logs / f"reindex-v{version}.log",
            cwd=REPO,
        )
        active = services.active_generation(self.indexer)
        if active is None or active.name != generation:
            raise StepFailed(
                f"reindex finished but the active generation is {active.name if active else None}, "
                f"not {generation}"
            )
        self.p.info(
            f"generation {generation} active: {active.item_count} items, model {active.space.model_name} "
            f"version {active.space.model_version}"
        )
        return generation

    def _search_all(self) -> tuple[list[evaluation.RankedHits], set[str]]:
        k = evaluation.search_depth([e.label for e in self.gallery_entries])
        images = [read_image_bytes(e) for e in self.query_entries]
        with grpc.insecure_channel(self.gateway) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)

            def one(image: bytes) -> search_pb2.SearchResponse:
                return stub.Search(search_pb2.SearchRequest(image=image, k=k), timeout=30)

            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(one, images))
        hits = [
            evaluation.RankedHits(
                [h.id for h in a.hits], [h.label for h in a.hits], [h.score for h in a.hits]
            )
            for a in answers
        ]
        return hits, {a.generation.name for a in answers}

    def _evaluate(self, hits: list[evaluation.RankedHits], version: int, generation: str) -> dict:
        from embedder.client import EmbedderClient

        exported = self.root / "report" / f"vectors-{generation}.npz"
        self.p.run(
            [
                sys.executable,
                "-m",
                "indexer",
                "export",
                "--indexer",
                self.indexer,
                "--generation",
                generation,
                "--output",
                str(exported),
            ],
            self.logs / "export-vectors.log",
            cwd=REPO,
        )
        with np.load(exported, allow_pickle=False) as npz:
            gallery_ids = [str(i) for i in npz["ids"]]
            gallery = np.asarray(npz["vectors"], dtype=np.float32)
            gallery_labels = [str(label) for label in npz["labels"]]
            if str(npz["model_version"]) != str(version):
                raise StepFailed(
                    f"generation {generation} holds model version {npz['model_version']}, not {version}"
                )
        images = [read_image_bytes(e) for e in self.query_entries]
        with EmbedderClient(self.serving, MODEL_NAME, timeout=60) as client:
            parts = [
                client.embed(images[i : i + 64], version=version).vectors for i in range(0, len(images), 64)
            ]
        queries = np.concatenate(parts)
        exported.unlink()  # the figures are in the report; the vectors are big
        query_labels = [e.label for e in self.query_entries]
        result = evaluation.compare(
            hits,
            queries,
            query_labels,
            gallery_ids,
            gallery,
            gallery_labels,
            trials=len(self.query_entries),
            seed=self.o.seed,
        )
        result["figures"] = evaluation.quality_figures(
            hits, query_labels, queries, gallery, gallery_labels, seed=self.o.seed
        )
        for row in result["rows"]:
            self.p.info(
                f"{row['metric']:17s} system {row['system']:.4f}  offline {row['offline']:.4f}  "
                f"|diff| {row['difference']:.4f} <= {row['tolerance']:.4f}: {'ok' if row['agree'] else 'NO'}"
            )
        self.p.info(
            f"HNSW neighbour recall {result['neighbour_recall']:.4f}; hit scores match offline "
            f"within {result['max_score_error']:.1e}"
        )
        spread = result["figures"]["spread"]
        self.p.info(
            "score spread: top-{k} hits of the query's class {s[mean]:.3f} ± {s[std]:.3f}, of another class "
            "{d[mean]:.3f} ± {d[std]:.3f}; random pairs of different classes {r[mean]:.3f} ± {r[std]:.3f}".format(
                k=spread["top_k"],
                s=spread["top_hits"]["same"],
                d=spread["top_hits"]["different"],
                r=spread["random_pairs"]["different"],
            )
        )
        if result["figures"]["collapse_warning"]:
            self.p.info(f"WARNING (version {version}): {result['figures']['collapse_warning']}")
        if not result["agree"]:
            raise FailedPrecondition(
                f"version {version}: system and offline evaluation disagree beyond what HNSW explains "
                f"(see {self.report_dir / 'report.json'})"
            )
        return result

    def _compare_versions(self) -> None:
        """Did training help? Version 1 (untrained) beside version 2 (trained), through the system."""
        before, after = self.report["evaluation_v1"]["figures"], self.report["evaluation"]["figures"]
        names = ("recall@1", "recall@5", "recall@10", f"map@{evaluation.MAP_DEPTH}")
        self.report["comparison"] = {
            "metrics": [
                {"metric": n, "v1": before[n], "v2": after[n], "gain": after[n] - before[n]} for n in names
            ],
            "per_class_recall@1": [
                {"class": c, "v1": before["per_class_recall@1"].get(c, 0.0), "v2": v}
                for c, v in after["per_class_recall@1"].items()
            ],
        }
        for row in self.report["comparison"]["metrics"]:
            self.p.info(
                f"{row['metric']:10s} version 1 {row['v1']:.4f}  ->  version 2 {row['v2']:.4f}  ({row['gain']:+.4f})"
            )

    def _hot_swap(self) -> dict:
        from indexer.client import IndexerClient

        images = [read_image_bytes(e) for e in self.query_entries]
        samples: list[dict] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def keep_searching() -> None:
            with grpc.insecure_channel(self.gateway) as channel:
                stub = search_pb2_grpc.SearchServiceStub(channel)
                i = 0
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        answer = stub.Search(
                            search_pb2.SearchRequest(image=images[i % len(images)], k=10), timeout=30
                        )
                        samples.append(
                            {
                                "t": started - t0,
                                "ok": True,
                                "latency_ms": 1000 * (time.monotonic() - started),
                                "generation": answer.generation.name,
                                "model_version": answer.generation.space.model_version,
                                "hits": len(answer.hits),
                            }
                        )
                    except grpc.RpcError as exc:
                        samples.append(
                            {
                                "t": started - t0,
                                "ok": False,
                                "latency_ms": 1000 * (time.monotonic() - started),
                                "error": f"{exc.code().name}: {exc.details()}",
                                "model_version": None,
                            }
                        )
                    i += 1
                    # A steady client, not a flood: leave the CPU to the reindexing it is watching.
                    stop.wait(0.02)

        searcher = threading.Thread(target=keep_searching, name="searcher", daemon=True)
        searcher.start()
        events = {}
        try:
            time.sleep(1.0)
            events["reindex starts"] = time.monotonic() - t0
            gen2 = self.gen2 = self._reindex(2)
            events["reindex done, v2 active"] = time.monotonic() - t0
            time.sleep(1.5)
        finally:
            stop.set()
            searcher.join(60)
        with IndexerClient([self.indexer]) as client:
            version_of = {g.name: g.space.model_version for g in client.list_generations()}
        ok = [s for s in samples if s["ok"]]
        inconsistent = [
            s for s in ok if version_of.get(s["generation"]) != s["model_version"] or s["hits"] == 0
        ]
        self.swap_samples, self.swap_events = samples, events
        return {
            "from_version": 1,
            "to_version": 2,
            "from_generation": self.gen1,
            "to_generation": gen2,
            "searches": len(samples),
            "failed": len(samples) - len(ok),
            "inconsistent": len(inconsistent),
            "answered_by_old": sum(1 for s in ok if s["model_version"] == 1),
            "answered_by_new": sum(1 for s in ok if s["model_version"] == 2),
            "errors": [s["error"] for s in samples if not s["ok"]][:20],
            "p50_latency_ms": float(np.median([s["latency_ms"] for s in ok])) if ok else None,
            "events": events,
        }

    def _grid_rows(self, hits: list[evaluation.RankedHits]) -> list[report.GridRow]:
        n, depth = self.o.grid_rows, self.o.grid_hits
        path_of = {e.id: e.path for e in self.gallery_entries}
        # One query per class first (a varied grid), then the rest.
        chosen, seen = [], set()
        for i, entry in enumerate(self.query_entries):
            if entry.label not in seen:
                chosen.append(i)
                seen.add(entry.label)
        chosen = (chosen + [i for i in range(len(hits)) if i not in chosen])[:n]
        return [
            report.GridRow(
                self.query_entries[i].path,
                self.query_entries[i].label,
                [path_of[x] for x in hits[i].ids[:depth]],
                list(hits[i].labels[:depth]),
                list(hits[i].scores[:depth]),
            )
            for i in chosen
        ]

    def _write_report(self) -> Path:
        v1, v2 = self.report["evaluation_v1"], self.report["evaluation"]
        figures = {
            "grid_v1": report.result_grid(
                self.grid_v1,
                self.report_dir / "grid_v1.png",
                f"Search results, version 1: {self.backbone} untrained ({self.gen1})",
            ).name,
            "grid_v2": report.result_grid(
                self.grid_v2,
                self.report_dir / "grid_v2.png",
                f"Search results after the hot-swap, version 2: trained ({self.gen2})",
            ).name,
            "recall": report.recall_figure(
                {
                    "system v1 (untrained)": v1["system"],
                    "system v2 (trained)": v2["system"],
                    "offline v2": v2["offline"],
                },
                self.report_dir / "recall.png",
            ).name,
            "spread": report.spread_figure(
                {"v1 (untrained)": v1["figures"]["spread"], "v2 (trained)": v2["figures"]["spread"]},
                self.report_dir / "score_spread.png",
            ).name,
            "swap": report.swap_figure(
                self.swap_samples, self.swap_events, self.report_dir / "hot_swap.png"
            ).name,
        }
        swap = self.report["hot_swap"]
        system, before = v2["system"], v1["system"]
        self.report["timings"] = dict(self.p.timings)
        self.report["wall_seconds"] = round(time.monotonic() - self.started, 1)
        self.report["figures"] = figures
        agree = v1["agree"] and v2["agree"]
        self.report["summary"] = (
            f"Recall@1 {system['recall@1']:.3f} (untrained {self.backbone}: {before['recall@1']:.3f}), mAP@10 "
            f"{system['map@10']:.3f} ({before['map@10']:.3f}) through the system "
            f"({'agrees' if agree else 'DISAGREES'} with offline); hot-swap v1->v2 with {swap['searches']} "
            f"searches, {swap['failed']} failed, {swap['inconsistent']} inconsistent."
            + (
                " WARNING: the trained embedding has collapsed."
                if v2["figures"]["spread"]["collapsed"]
                else ""
            )
        )
        return report.write_report(self.report_dir, self.report, figures)
