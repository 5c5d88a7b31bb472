"""`python -m indexer follow`: the rollout controller that puts new model versions live only if they are good.

It watches Serving (GetModelStatus of one model) and, for the newest AVAILABLE version that has no
decision yet and is newer than the active generation's:

1. reindexes the catalogue into the generation ``<model>-v<version>`` pinned to that version
   (indexer.reindex; an existing building generation of the version is resumed, so a controller
   killed mid-way continues where it stopped and never builds two generations for one version).
   With ``--reindex-job`` the embedding is done by a Kubernetes Indexed Job of partition workers
   (indexer.jobs) and the controller waits for it, then drains what is left;
2. evaluates the candidate and the active generation the same way, through the real path
   (indexer.rollout: queries embedded by Serving with each generation's own version, neighbours
   from that generation);
3. applies the quality gate (indexer.rollout.QualityGate) and records the decision in the indexer
   (RecordRollout: figures of both, verdict, reason, times), before acting on it;
4. PASSED: drains writes made meanwhile, checks, activates on every shard (compare-and-swap against
   the generation it was compared with), records the activation, drops old generations beyond
   ``keep_generations``. REJECTED: the generation is marked REJECTED, the active one keeps serving,
   the version is never tried again.

All state lives in the indexer: a restart reads the decisions and finishes what was interrupted
(a PASSED decision without ``activated_at`` is activated first). Serving or a shard that is down,
a version that is not AVAILABLE yet, counts that do not agree: the step is retried with exponential
backoff, and health is NOT_SERVING while a dependency is unreachable.
"""

from __future__ import annotations

import argparse
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeGuard, cast

import prometheus_client
from google.protobuf.timestamp_pb2 import Timestamp

from cbir.config import env_flag
from cbir.defaults import ROLLOUT_METRICS_PORT, ROLLOUT_PORT
from cbir.errors import CbirError, FailedPrecondition, InvalidInput, NotReady
from cbir.metric import METRIC_NAMES
from cbir.v1 import indexer_pb2
from indexer.jobs import KubernetesAPI, ReindexJobs
from indexer.reindex import ReindexOptions, ReindexReport, entry_items, reindex
from indexer.rollout import (
    EvalSet,
    Evaluation,
    QualityGate,
    compare,
    evaluate_generation,
    load_eval_set,
    recorded_figures,
)
from indexer.store import ItemRow

if TYPE_CHECKING:
    from embedder.client import EmbedderClient
    from indexer.client import IndexerClient

log = logging.getLogger(__name__)

ENV = "CBIR_ROLLOUT"
ACTIVE, RETIRED, REJECTED = (
    indexer_pb2.GENERATION_STATE_ACTIVE,
    indexer_pb2.GENERATION_STATE_RETIRED,
    indexer_pb2.GENERATION_STATE_REJECTED,
)
PASSED, VERDICT_REJECTED = indexer_pb2.ROLLOUT_VERDICT_PASSED, indexer_pb2.ROLLOUT_VERDICT_REJECTED
STATES = ("starting", "idle", "reindexing", "evaluating", "activating", "backoff")

DECISIONS = prometheus_client.Counter(
    "cbir_rollout_decisions_total", "Rollout decisions made, by verdict.", ["model", "verdict"]
)
PHASE_SECONDS = prometheus_client.Histogram(
    "cbir_rollout_phase_seconds",
    "Time of one rollout phase (reindex, evaluation, activation) of a model version.",
    ["phase"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200),
)
QUALITY = prometheus_client.Gauge(
    "cbir_rollout_quality",
    "Figures of the last decision: the candidate's and the generation it was compared with.",
    ["model", "role", "metric"],
)
LAST_DECISION = prometheus_client.Gauge(
    "cbir_rollout_last_decision_version",
    "Model version of the last decision, by verdict.",
    ["model", "verdict"],
)
ACTIVE_VERSION = prometheus_client.Gauge(
    "cbir_rollout_active_model_version", "Model version of the active generation (0: none).", ["model"]
)
STATE = prometheus_client.Gauge("cbir_rollout_state", "1 for the controller's current state.", ["state"])
RETRIES = prometheus_client.Counter(
    "cbir_rollout_retries_total", "Steps that failed and are retried with backoff, by reason.", ["reason"]
)


@dataclass(frozen=True)
class CatalogueSource:
    """A folder-per-class tree, the original layout (``dataset``) or a .csv/.jsonl manifest."""

    path: str
    layout: str = "auto"
    dataset: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class FollowOptions:
    """The controller's settings; ``reindex`` carries the model, Serving and reindexing tunables."""

    reindex: ReindexOptions
    eval_set: CatalogueSource
    # None: the catalogue is the index's own items (those of the active generation).
    catalogue: CatalogueSource | None = None
    gate: QualityGate = field(default_factory=QualityGate)
    eval_max_queries: int = 1000
    eval_k: int = 10
    keep_generations: int = 2
    poll_seconds: float = 5.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    # The suspended CronJob whose Indexed Jobs reindex in parallel; None: the controller embeds itself.
    reindex_job: str | None = None
    kubernetes: KubernetesAPI = field(default_factory=KubernetesAPI)

    def __post_init__(self) -> None:
        if self.keep_generations < 0:
            raise InvalidInput(f"--keep-generations must be >= 0, got {self.keep_generations}")
        if not 1 <= self.eval_k <= 100:
            raise InvalidInput(f"--eval-k must be 1..100, got {self.eval_k}")
        if self.eval_max_queries < 0:
            raise InvalidInput(f"--eval-max-queries must be >= 0, got {self.eval_max_queries}")
        if self.poll_seconds <= 0 or self.backoff_initial <= 0 or self.backoff_max < self.backoff_initial:
            raise InvalidInput(
                "--poll-seconds and --backoff-initial must be > 0, --backoff-max >= --backoff-initial"
            )

    @property
    def model(self) -> str:
        return self.reindex.model


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _verdict(decision: indexer_pb2.RolloutDecision) -> str:
    return indexer_pb2.RolloutVerdict.Name(decision.verdict).removeprefix("ROLLOUT_VERDICT_").lower()


class RolloutController:
    """Follows one model's versions; every decision and all progress is kept in the indexer.

    ``index`` is an IndexerClient, ``embedder`` an EmbedderClient of the model, ``jobs`` the
    Kubernetes Jobs that reindex (None: reindex in this process); ``set_healthy`` is told whether the
    dependencies answered the last step.
    """

    def __init__(
        self,
        options: FollowOptions,
        index: IndexerClient,
        embedder: EmbedderClient,
        eval_set: EvalSet,
        *,
        jobs: ReindexJobs | None = None,
        set_healthy: Callable[[bool], None] = lambda _healthy: None,
    ) -> None:
        self.options = options
        self.index = index
        self.embedder = embedder
        self.jobs = jobs
        self.eval_set = eval_set
        self.set_healthy = set_healthy
        self.state = "starting"
        self._stopped = threading.Event()
        self._reported: dict[int, str] = {}
        self._set_state("starting")

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        """Steps until stop(): busy steps follow each other, idle ones wait ``poll_seconds``."""
        delay = self.options.backoff_initial
        while not self._stopped.is_set():
            try:
                busy = self.step()
            except Exception as exc:  # noqa: BLE001 - every failure is retried; bugs are logged in full
                self._retry_later(exc, delay)
                self._stopped.wait(delay * random.uniform(0.75, 1.25))
                delay = min(delay * 2, self.options.backoff_max)
                continue
            delay = self.options.backoff_initial
            if not busy:
                self._set_state("idle")
                self._stopped.wait(self.options.poll_seconds)

    def _retry_later(self, exc: Exception, delay: float) -> None:
        self._set_state("backoff")
        if isinstance(exc, NotReady):
            reason = "unavailable"
            self.set_healthy(False)
        elif isinstance(exc, CbirError):
            reason = type(exc).__name__.lower()
        else:
            reason = "error"
        RETRIES.labels(reason).inc()
        fields = {"reason": reason, "retry_in_seconds": round(delay, 2), "model": self.options.model}
        if isinstance(exc, CbirError):
            log.warning(f"rollout step failed, retrying: {exc.message}", extra=fields)
        else:
            log.exception("rollout step failed unexpectedly, retrying", extra=fields)

    def _set_state(self, state: str) -> None:
        self.state = state
        for name in STATES:
            STATE.labels(name).set(1 if name == state else 0)

    @contextmanager
    def _phase(self, state: str, phase: str, seconds: dict[str, float]) -> Iterator[None]:
        self._set_state(state)
        started = time.monotonic()
        try:
            yield
        finally:
            seconds[phase] = time.monotonic() - started
        PHASE_SECONDS.labels(phase).observe(seconds[phase])

    # ------------------------------------------------------------------ one step

    def step(self) -> bool:
        """Does the next piece of work, if any; returns whether there was one."""
        model = self.options.model
        versions = self.embedder.model_versions()
        decisions = {d.model_version: d for d in self.index.list_rollouts(model)}
        generations = self.index.list_generations()
        self.set_healthy(True)  # Serving and the indexer answer
        active = next((g for g in generations if g.state == ACTIVE), None)
        ACTIVE_VERSION.labels(model).set(active.space.model_version if self._ours(active) else 0)
        names = {g.name for g in generations}
        unfinished = [
            d
            for d in decisions.values()
            # (A candidate a person dropped meanwhile cannot be finished; its version stays decided.)
            if d.verdict == PASSED and not d.HasField("activated_at") and d.generation in names
        ]
        if unfinished:
            self._activate(max(unfinished, key=lambda d: d.model_version))
            return True
        version = self._next_version(versions, decisions, generations, active)
        if version is None:
            return False
        self._decide(version, generations, active)
        return True

    def _ours(self, generation: indexer_pb2.Generation | None) -> TypeGuard[indexer_pb2.Generation]:
        return generation is not None and generation.space.model_name == self.options.model

    def _next_version(
        self,
        versions: dict[int, str],
        decisions: dict[int, indexer_pb2.RolloutDecision],
        generations: list[indexer_pb2.Generation],
        active: indexer_pb2.Generation | None,
    ) -> int | None:
        """The newest AVAILABLE version without a decision, newer than the active generation's."""
        for version, state in sorted(versions.items()):
            if state != "AVAILABLE" and self._reported.get(version) != state:
                self._reported[version] = state
                log.info(
                    "model version not available yet; it is considered once AVAILABLE",
                    extra={"model": self.options.model, "model_version": version, "state": state},
                )
        # A version activated some other way (`indexer reindex`, `generations activate`) is done too.
        done = set(decisions) | {
            g.space.model_version for g in generations if self._ours(g) and g.state in (ACTIVE, RETIRED)
        }
        floor = active.space.model_version if self._ours(active) else 0
        todo = [v for v, state in versions.items() if state == "AVAILABLE" and v not in done and v > floor]
        return max(todo) if todo else None

    def _generation_for(
        self, version: int, generations: list[indexer_pb2.Generation]
    ) -> indexer_pb2.Generation | None:
        """The building generation of ``version`` to resume, preferring the controller's own name."""
        building = [
            g
            for g in generations
            if self._ours(g)
            and g.space.model_version == version
            and g.state == indexer_pb2.GENERATION_STATE_BUILDING
        ]
        own = [g for g in building if g.name == f"{self.options.model}-v{version}"]
        return next(iter(own or building), None)

    def _catalogue_items(self, active: indexer_pb2.Generation | None) -> list[ItemRow]:
        source = self.options.catalogue
        if source is not None:
            from cbir.catalogue import read_catalogue

            entries = read_catalogue(
                source.path, layout=source.layout, dataset=source.dataset, split=source.split
            )
            return entry_items(entries)
        if active is None:
            raise FailedPrecondition(
                "nothing to index: no --catalogue was given and no generation is active to take the items from"
            )
        return [
            ItemRow(r.item.id, r.item.uri, r.item.label, dict(r.item.attributes))
            for r in self.index.list_items(active.name)
        ]

    def _say(self, version: int) -> Callable[[str], None]:
        return lambda message: log.info(
            message, extra={"model": self.options.model, "model_version": version}
        )

    def _build(self, name: str, version: int, items: list[ItemRow]) -> ReindexReport:
        options = replace(
            self.options.reindex,
            model_version=version,
            generation=name,
            resume=False,
            activate=False,
            progress=False,
            partition=None,
        )
        report = reindex(items, options, self.index, self.embedder, say=self._say(version))
        if report.failed:
            first_id, why = report.failed[0]
            raise FailedPrecondition(
                f"generation {name}: {len(report.failed)} catalogue images failed with model version {version} "
                f"(first: {first_id}: {why}); fix them, the build resumes"
            )
        return report

    def _build_with_job(self, name: str, version: int) -> ReindexReport:
        """Starts (or finds) the Indexed Job of ``version``, waits for it, then drains what is left."""
        jobs = cast(ReindexJobs, self.jobs)  # called only when the controller has them
        job = jobs.name(version)
        while True:
            state = jobs.state(job)
            if state == "succeeded":
                break
            if state == "failed":
                jobs.delete(job)
                raise FailedPrecondition(
                    f"reindex Job {job} failed (its pods' logs say why); it is deleted and started again, "
                    "and its workers resume"
                )
            if state == "missing":
                jobs.start(version, name)
            if self._stopped.wait(self.options.poll_seconds):
                raise NotReady(
                    f"stopping while reindex Job {job} runs; it goes on, and is picked up on restart"
                )
        # Writes made while the workers ran are pending in the generation; then the counts are checked.
        return self._build(name, version, [])

    def _decide(
        self, version: int, generations: list[indexer_pb2.Generation], active: indexer_pb2.Generation | None
    ) -> None:
        model = self.options.model
        existing = self._generation_for(version, generations)
        name = existing.name if existing is not None else f"{model}-v{version}"
        log.info(
            "rolling out a new model version",
            extra={
                "model": model,
                "model_version": version,
                "generation": name,
                "resume": existing is not None,
            },
        )
        seconds: dict[str, float] = {}
        with self._phase("reindexing", "reindex", seconds):
            if self.jobs is not None:
                self._build_with_job(name, version)
            else:
                self._build(name, version, self._catalogue_items(active))
        candidate = self.index.get_generation(name)
        with self._phase("evaluating", "evaluation", seconds):
            candidate_eval = self._evaluate(candidate)
            active_eval, note = self._evaluate_active(active) if candidate_eval.relevance else (None, "")
            if active_eval is not None and not set(active_eval.relevance) & set(candidate_eval.relevance):
                active_eval, note = None, "no evaluation query was answered by both generations: floors only"
        if candidate_eval.relevance:
            cand, act, queries = compare(candidate_eval, active_eval)
            if act is None and self._ours(active):
                # The active generation cannot be measured now (its model version is no longer
                # served, or no query was answered by both): compare with the figures recorded when
                # it was rolled out rather than let the floors alone (0 by default) pass anything.
                recorded = recorded_figures(self.index.list_rollouts(model), active.name)
                if recorded is not None:
                    act, note = (
                        recorded,
                        (
                            f"{note.removesuffix(': floors only')}: compared with the figures recorded at "
                            f"the rollout of {active.name}"
                        ),
                    )
            passed, reason = self.options.gate.judge(cand, act)
        else:
            first_id, why = candidate_eval.rejected[0]
            cand, act, queries, passed = {}, None, 0, False
            reason = f"Serving rejected every evaluation image with model version {version} (first: {first_id}: {why})"
        if note:
            reason = f"{reason}; {note}"
        decision = indexer_pb2.RolloutDecision(
            model_name=model,
            model_version=version,
            generation=name,
            verdict=PASSED if passed else VERDICT_REJECTED,
            reason=reason,
            candidate_metrics=cand,
            active_generation=active.name if active is not None else "",
            active_model_version=active.space.model_version if active is not None else 0,
            active_metrics=act or {},
            evaluation_queries=queries,
            started_at=candidate.created_at,
            decided_at=_timestamp(time.time()),
            reindex_seconds=seconds["reindex"],
            evaluation_seconds=seconds["evaluation"],
        )
        self.index.record_rollout(decision)
        self._announce("rollout decision", decision)
        if passed:
            self._activate(decision)

    def _evaluate(self, generation: indexer_pb2.Generation) -> Evaluation:
        o = self.options
        return evaluate_generation(
            self.eval_set,
            generation,
            self.index,
            self.embedder,
            k=o.eval_k,
            batch_size=o.reindex.batch_size,
            timeout=o.reindex.serving_timeout,
        )

    def _evaluate_active(self, active: indexer_pb2.Generation | None) -> tuple[Evaluation | None, str]:
        """The active generation's evaluation, or None and why the gate applies the floors only."""
        if active is None:
            return None, "no generation was active: floors only"
        if not self._ours(active):
            return (
                None,
                f"the active generation {active.name} holds model {active.space.model_name!r}: floors only",
            )
        version = active.space.model_version
        if self.embedder.model_versions().get(version) != "AVAILABLE":
            return None, (
                f"the active generation's model version {version} is no longer served "
                "(searches on it fail): floors only"
            )
        return self._evaluate(active), ""

    def _activate(self, decision: indexer_pb2.RolloutDecision) -> None:
        """Finishes a PASSED decision: drain, check, activate on every shard, record, retire old ones."""
        seconds: dict[str, float] = {}
        name = decision.generation
        with self._phase("activating", "activation", seconds):
            active = next((g for g in self.index.list_generations() if g.state == ACTIVE), None)
            current = active.name if active is not None else ""
            if current != name:
                if current != decision.active_generation:
                    # Someone activated another generation since the evaluation: the comparison no
                    # longer holds, and a person's choice is not overridden.
                    decision.verdict = VERDICT_REJECTED
                    decision.reason = (
                        f"not activated: the active generation changed from {decision.active_generation or 'none'} "
                        f"to {current or 'none'} after the evaluation ({decision.reason})"
                    )
                    self.index.record_rollout(decision)
                    self._announce("rollout decision", decision)
                    return
                # Writes made since the evaluation are pending in the candidate: embed them, check.
                self._build(name, decision.model_version, [])
                self.index.activate_generation(name, expected_active=decision.active_generation)
        decision.activated_at.CopyFrom(_timestamp(time.time()))
        decision.activation_seconds = seconds["activation"]
        self.index.record_rollout(decision)
        self._announce("rollout activated", decision)
        self._drop_old_generations()

    def _drop_old_generations(self) -> None:
        """Keeps the ``keep_generations`` newest old generations, rollback targets (RETIRED) first."""
        keep = self.options.keep_generations
        ours = [g for g in self.index.list_generations() if self._ours(g)]  # newest first
        old = [g for g in ours if g.state == RETIRED] + [g for g in ours if g.state == REJECTED]
        for generation in old[keep:]:
            self.index.drop_generation(generation.name)
            log.info(
                "old generation dropped",
                extra={"generation": generation.name, "keep_generations": keep, "model": self.options.model},
            )

    def _announce(self, event: str, d: indexer_pb2.RolloutDecision) -> None:
        verdict = _verdict(d)
        fields = {
            "model": d.model_name,
            "model_version": d.model_version,
            "generation": d.generation,
            "verdict": verdict,
            "reason": d.reason,
            "active_generation": d.active_generation,
            "active_model_version": d.active_model_version,
            "evaluation_queries": d.evaluation_queries,
            "reindex_seconds": round(d.reindex_seconds, 3),
            "evaluation_seconds": round(d.evaluation_seconds, 3),
            "activation_seconds": round(d.activation_seconds, 3),
        }
        fields.update({f"candidate_{k}": round(v, 4) for k, v in d.candidate_metrics.items()})
        fields.update({f"active_{k}": round(v, 4) for k, v in d.active_metrics.items()})
        log.info(event, extra=fields)
        if event == "rollout decision":
            DECISIONS.labels(d.model_name, verdict).inc()
            LAST_DECISION.labels(d.model_name, verdict).set(d.model_version)
            for role, figures in (("candidate", d.candidate_metrics), ("active", d.active_metrics)):
                for metric, value in figures.items():
                    QUALITY.labels(d.model_name, role, metric).set(value)
        else:
            ACTIVE_VERSION.labels(d.model_name).set(d.model_version)


# ---------------------------------------------------------------------- command line


_GATE = QualityGate()
_REINDEX = ReindexOptions(model="")


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    client_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    from cbir.server import add_common_flags

    d = FollowOptions(reindex=_REINDEX, eval_set=CatalogueSource(""))
    p = sub.add_parser(
        "follow",
        help="Roll out new model versions: reindex, evaluate, gate, activate (or reject).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_flags(p, env_prefix=ENV, port=ROLLOUT_PORT, metrics_port=ROLLOUT_METRICS_PORT)
    client_flags(p)
    env_flag(p, "--serving", env=f"{ENV}_SERVING", default=_REINDEX.serving, help="TF Serving gRPC address.")
    env_flag(p, "--model", env=f"{ENV}_MODEL", default=None, help="Served model name to follow (required).")
    env_flag(
        p,
        "--signature",
        env=f"{ENV}_SIGNATURE",
        default=_REINDEX.signature,
        help="Signature taking encoded images.",
    )
    env_flag(
        p,
        "--eval",
        env=f"{ENV}_EVAL",
        default=None,
        help="Labelled evaluation set (required): folder per class, the original layout, or a manifest. "
        "Catalogue items may be in it: a query never counts itself.",
    )
    env_flag(
        p,
        "--eval-layout",
        env=f"{ENV}_EVAL_LAYOUT",
        default=CatalogueSource.layout,
        choices=["auto", "folders", "original", "manifest"],
    )
    env_flag(
        p,
        "--eval-dataset",
        env=f"{ENV}_EVAL_DATASET",
        default=None,
        help="Dataset of an original-layout --eval.",
    )
    env_flag(p, "--eval-split", env=f"{ENV}_EVAL_SPLIT", default=None, help="Only this split of --eval.")
    env_flag(
        p,
        "--eval-max-queries",
        env=f"{ENV}_EVAL_MAX_QUERIES",
        default=d.eval_max_queries,
        type=int,
        help="At most this many queries, evenly spread over the set (0: all).",
    )
    env_flag(p, "--eval-k", env=f"{ENV}_EVAL_K", default=d.eval_k, type=int, help="Neighbours per query.")
    env_flag(
        p,
        "--catalogue",
        env=f"{ENV}_CATALOGUE",
        default=None,
        help="Catalogue to reindex (as `indexer reindex`); default: the items of the active generation.",
    )
    env_flag(
        p,
        "--catalogue-layout",
        env=f"{ENV}_CATALOGUE_LAYOUT",
        default=CatalogueSource.layout,
        choices=["auto", "folders", "original", "manifest"],
    )
    env_flag(
        p,
        "--catalogue-dataset",
        env=f"{ENV}_CATALOGUE_DATASET",
        default=None,
        help="Dataset of an original-layout --catalogue.",
    )
    env_flag(
        p,
        "--catalogue-split",
        env=f"{ENV}_CATALOGUE_SPLIT",
        default=None,
        help="Only this split of --catalogue.",
    )
    env_flag(
        p,
        "--tolerance",
        env=f"{ENV}_TOLERANCE",
        default=_GATE.tolerance,
        type=float,
        help="Largest drop of Recall@1 and of mAP@10 below the active generation's that still passes.",
    )
    env_flag(
        p,
        "--min-recall-at-1",
        env=f"{ENV}_MIN_RECALL_AT_1",
        default=_GATE.min_recall_at_1,
        type=float,
        help="Floor of Recall@1.",
    )
    env_flag(
        p,
        "--min-map-at-10",
        env=f"{ENV}_MIN_MAP_AT_10",
        default=_GATE.min_map_at_10,
        type=float,
        help="Floor of mAP@10.",
    )
    env_flag(
        p,
        "--keep-generations",
        env=f"{ENV}_KEEP_GENERATIONS",
        default=d.keep_generations,
        type=int,
        help="Old (retired or rejected) generations kept after an activation, newest first.",
    )
    env_flag(
        p,
        "--poll-seconds",
        env=f"{ENV}_POLL_SECONDS",
        default=d.poll_seconds,
        type=float,
        help="Seconds between looks at Serving.",
    )
    env_flag(
        p,
        "--backoff-initial",
        env=f"{ENV}_BACKOFF_INITIAL",
        default=d.backoff_initial,
        type=float,
        help="First retry delay after a failure.",
    )
    env_flag(
        p,
        "--backoff-max",
        env=f"{ENV}_BACKOFF_MAX",
        default=d.backoff_max,
        type=float,
        help="Longest retry delay.",
    )
    env_flag(
        p,
        "--reindex-job",
        env=f"{ENV}_REINDEX_JOB",
        default=None,
        help="Reindex through Kubernetes Indexed Jobs made from this suspended CronJob (its workers run "
        "`indexer reindex --partition`); default: embed in this process.",
    )
    k = KubernetesAPI()
    env_flag(
        p,
        "--kubernetes-api",
        env=f"{ENV}_KUBERNETES_API",
        default=k.url,
        help="API server URL (default: the pod's).",
    )
    env_flag(
        p,
        "--kubernetes-token-file",
        env=f"{ENV}_KUBERNETES_TOKEN_FILE",
        default=k.token_file,
        help="Bearer token file.",
    )
    env_flag(
        p,
        "--kubernetes-ca-file",
        env=f"{ENV}_KUBERNETES_CA_FILE",
        default=k.ca_file,
        help="CA of the API server.",
    )
    env_flag(
        p,
        "--kubernetes-namespace",
        env=f"{ENV}_KUBERNETES_NAMESPACE",
        default=k.namespace,
        help="Namespace of the Jobs (default: the pod's).",
    )
    env_flag(p, "--metric", env=f"{ENV}_METRIC", default=_REINDEX.metric, choices=sorted(METRIC_NAMES))
    env_flag(
        p,
        "--batch-size",
        env=f"{ENV}_BATCH_SIZE",
        default=_REINDEX.batch_size,
        type=int,
        help="Images per Predict call.",
    )
    env_flag(
        p,
        "--readers",
        env=f"{ENV}_READERS",
        default=_REINDEX.readers,
        type=int,
        help="Threads reading image files.",
    )
    env_flag(
        p,
        "--prefetch",
        env=f"{ENV}_PREFETCH",
        default=_REINDEX.prefetch,
        type=int,
        help="Batches read ahead.",
    )
    env_flag(
        p,
        "--serving-timeout",
        env=f"{ENV}_SERVING_TIMEOUT",
        default=_REINDEX.serving_timeout,
        type=float,
        help="Seconds per Predict call.",
    )
    env_flag(
        p,
        "--check-samples",
        env=f"{ENV}_CHECK_SAMPLES",
        default=_REINDEX.check_samples,
        type=int,
        help="Items queried to check a generation.",
    )
    env_flag(
        p,
        "--hnsw-m",
        env=f"{ENV}_HNSW_M",
        default=_REINDEX.hnsw_m,
        type=int,
        help="HNSW M of new generations (0: the server default).",
    )
    env_flag(
        p,
        "--hnsw-ef-construction",
        env=f"{ENV}_HNSW_EF_CONSTRUCTION",
        default=_REINDEX.hnsw_ef_construction,
        type=int,
        help="(0: the server default)",
    )
    env_flag(
        p,
        "--hnsw-ef-search",
        env=f"{ENV}_HNSW_EF_SEARCH",
        default=_REINDEX.hnsw_ef_search,
        type=int,
        help="(0: the server default)",
    )


def options_from_args(args: argparse.Namespace) -> FollowOptions:
    if not args.model:
        raise InvalidInput("--model is required (the served model name to follow)")
    if not args.eval:
        raise InvalidInput("--eval is required (a labelled evaluation set)")
    reindex_options = ReindexOptions(
        model=args.model,
        serving=args.serving,
        signature=args.signature,
        metric=args.metric,
        hnsw_m=args.hnsw_m,
        hnsw_ef_construction=args.hnsw_ef_construction,
        hnsw_ef_search=args.hnsw_ef_search,
        batch_size=args.batch_size,
        readers=args.readers,
        prefetch=args.prefetch,
        serving_timeout=args.serving_timeout,
        check_samples=args.check_samples,
        activate=False,
        progress=False,
    )
    catalogue = (
        CatalogueSource(args.catalogue, args.catalogue_layout, args.catalogue_dataset, args.catalogue_split)
        if args.catalogue
        else None
    )
    return FollowOptions(
        reindex=reindex_options,
        eval_set=CatalogueSource(args.eval, args.eval_layout, args.eval_dataset, args.eval_split),
        catalogue=catalogue,
        gate=QualityGate(args.tolerance, args.min_recall_at_1, args.min_map_at_10),
        eval_max_queries=args.eval_max_queries,
        eval_k=args.eval_k,
        keep_generations=args.keep_generations,
        poll_seconds=args.poll_seconds,
        backoff_initial=args.backoff_initial,
        backoff_max=args.backoff_max,
        reindex_job=args.reindex_job or None,
        kubernetes=KubernetesAPI(
            args.kubernetes_api,
            args.kubernetes_token_file,
            args.kubernetes_ca_file,
            args.kubernetes_namespace,
        ),
    )


def run(args: argparse.Namespace, make_client: Callable[[argparse.Namespace], IndexerClient]) -> int:
    """The follow command: health + metrics server, the controller in a thread, until SIGTERM."""
    from cbir.server import ServerOptions, serve_until_signalled, start_server
    from indexer.reindex import open_embedder

    # A CbirError is reported by indexer/cli.py's main (cbir.cli.run_main).
    options = options_from_args(args)
    e = options.eval_set
    eval_set = load_eval_set(
        e.path, layout=e.layout, dataset=e.dataset, split=e.split, max_queries=options.eval_max_queries
    )
    jobs = ReindexJobs(options.kubernetes, options.reindex_job) if options.reindex_job else None
    server_options = ServerOptions.from_args("rollout", args)
    for item_id, why in eval_set.unreadable[:20]:
        log.warning("evaluation image left out", extra={"id": item_id, "reason": why})
    log.info(
        "evaluation set loaded",
        extra={"queries": len(eval_set), "unreadable": len(eval_set.unreadable), "source": e.path},
    )
    index = make_client(args)
    embedder = open_embedder(options.reindex)
    running = start_server(server_options, [], [], serving=False)
    controller = RolloutController(
        options, index, embedder, eval_set, jobs=jobs, set_healthy=running.set_serving
    )
    thread = threading.Thread(target=controller.run, name="rollout", daemon=True)
    running.on_stop.extend([index.close, embedder.close, controller.stop])
    thread.start()
    return serve_until_signalled(running)
