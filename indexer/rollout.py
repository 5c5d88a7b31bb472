"""Retrieval quality of a generation through the real path, and the quality gate a new model version must pass.

The evaluation is what a user's search does: each query image is embedded by Serving with the
generation's own model version, and its neighbours come from that generation in the indexer (by
name, so a candidate that is not active yet can be measured). A query that is itself a catalogue
item (same id and uri) is left out of its own neighbours, so the catalogue can serve as its own
evaluation set. Figures use the definitions of ``trainer.metrics``: Recall@k (a relevant item, same
label, among the first k) and mAP@10 (the original evaluation.py AP@10 of each query, averaged).

The gate compares the candidate with the active generation on the queries both answered.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from cbir.errors import InvalidInput
from cbir.v1 import indexer_pb2
from trainer.metrics import average_precision_at_k

if TYPE_CHECKING:
    from embedder.client import EmbedderClient
    from indexer.client import IndexerClient

# What embed_keeping_good returns: (positions embedded, vectors, version that answered, rejected).
_Embedded = tuple[list[int], np.ndarray, int | None, list[tuple[int, str]]]

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
MAP_DEPTH = 10
# The figures the gate compares (and for which it has floors).
GATED = ("recall@1", "map@10")


@dataclass(frozen=True)
class EvalQuery:
    """One labelled query image of the evaluation set."""

    id: str
    uri: str
    label: str


@dataclass(frozen=True)
class EvalSet:
    """Labelled query images, read once (they are sent to Serving for every generation evaluated)."""

    queries: tuple[EvalQuery, ...]
    images: tuple[bytes, ...]
    unreadable: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.queries)


def load_eval_set(
    source: str,
    *,
    layout: str = "auto",
    dataset: str | None = None,
    split: str | None = None,
    max_queries: int = 0,
) -> EvalSet:
    """The labelled images of a folder-per-class tree, the original layout or a manifest.

    With ``max_queries`` > 0, that many queries evenly spread over the id-sorted set (the same ones
    every time). Unreadable files are left out and listed in ``unreadable``.
    """
    from cbir.catalogue import read_catalogue, read_image_bytes

    entries = [e for e in read_catalogue(source, layout=layout, dataset=dataset, split=split) if e.label]
    if not entries:
        raise InvalidInput(f"the evaluation set {source} has no labelled images")
    if max_queries and len(entries) > max_queries:
        picks = np.linspace(0, len(entries) - 1, max_queries).round().astype(int)
        entries = [entries[i] for i in sorted(set(picks.tolist()))]
    queries, images, unreadable = [], [], []
    for entry in entries:
        try:
            images.append(read_image_bytes(entry))
        except InvalidInput as exc:
            unreadable.append((entry.id, exc.message))
            continue
        queries.append(EvalQuery(entry.id, str(entry.path), entry.label))
    if not queries:
        raise InvalidInput(f"no image of the evaluation set {source} could be read ({unreadable[0][1]})")
    return EvalSet(tuple(queries), tuple(images), tuple(unreadable))


@dataclass(frozen=True)
class Evaluation:
    """Per query id: the relevance (same label) of its ranked neighbours, best first."""

    generation: str
    model_version: int
    relevance: dict[str, tuple[bool, ...]]
    rejected: tuple[tuple[str, str], ...] = ()


def _same_item(query: EvalQuery, hit_id: str, hit_uri: str) -> bool:
    if hit_id != query.id:
        return False
    return hit_uri == query.uri or os.path.realpath(hit_uri) == os.path.realpath(query.uri)


def evaluate_generation(
    eval_set: EvalSet,
    generation: indexer_pb2.Generation,
    index: IndexerClient,
    embedder: EmbedderClient,
    *,
    k: int = MAP_DEPTH,
    batch_size: int = 32,
    timeout: float = 60.0,
) -> Evaluation:
    """Embeds every query with ``generation``'s model version and searches ``generation`` for it.

    ``generation`` is an indexer_pb2.Generation; ``index`` an IndexerClient, ``embedder`` an
    EmbedderClient of the generation's model. Images Serving rejects are left out (``rejected``).
    """
    from indexer.reindex import embed_keeping_good

    version = int(generation.space.model_version)
    relevance: dict[str, tuple[bool, ...]] = {}
    rejected: list[tuple[str, str]] = []
    batches = [range(s, min(s + batch_size, len(eval_set))) for s in range(0, len(eval_set), batch_size)]

    def embed(rows: range) -> _Embedded:
        return embed_keeping_good(
            embedder, [eval_set.images[i] for i in rows], version=version, timeout=timeout
        )

    # Serving embeds the next batch while the indexer answers this one.
    with futures.ThreadPoolExecutor(1, thread_name_prefix="rollout-embed") as pool:
        pending = pool.submit(embed, batches[0]) if batches else None
        for n, rows in enumerate(batches):
            # ``pending`` is set for every batch.
            kept, vectors, _answered, bad = cast("futures.Future[_Embedded]", pending).result()
            pending = pool.submit(embed, batches[n + 1]) if n + 1 < len(batches) else None
            queries = [eval_set.queries[rows[j]] for j in kept]
            rejected.extend((eval_set.queries[rows[j]].id, why) for j, why in bad)
            if not queries:
                continue
            # One more than k: the query itself may be among them when it is a catalogue item.
            answer = index.knn(vectors, k + 1, generation=generation.name, require_active=False)
            for query, neighbours in zip(queries, answer.results, strict=True):
                hits = [h for h in neighbours.hits if not _same_item(query, h.id, h.uri)][:k]
                relevance[query.id] = tuple(h.label == query.label for h in hits)
    return Evaluation(generation.name, version, relevance, tuple(rejected))


def figures(relevance: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Recall@1/5/10 and mAP@10 of ranked relevance lists (one per query)."""
    if not relevance:
        raise InvalidInput("no evaluation query was answered")
    out = {f"recall@{k}": float(np.mean([any(rel[:k]) for rel in relevance])) for k in RECALL_KS}
    out[f"map@{MAP_DEPTH}"] = float(np.mean([average_precision_at_k(rel[:MAP_DEPTH]) for rel in relevance]))
    return out


def compare(
    candidate: Evaluation, active: Evaluation | None
) -> tuple[dict[str, float], dict[str, float] | None, int]:
    """Figures of both on the queries both answered: (candidate, active or None, number of queries)."""
    ids = sorted(candidate.relevance if active is None else set(candidate.relevance) & set(active.relevance))
    cand = figures([candidate.relevance[i] for i in ids])
    act = figures([active.relevance[i] for i in ids]) if active is not None else None
    return cand, act, len(ids)


def recorded_figures(
    decisions: Iterable[indexer_pb2.RolloutDecision], generation: str
) -> dict[str, float] | None:
    """The gated figures measured when ``generation`` passed its rollout, or None if it never did
    (it was activated by hand, or by a controller with another evaluation set it did not record)."""
    for decision in sorted(decisions, key=lambda d: d.decided_at.ToNanoseconds(), reverse=True):
        if (
            decision.generation == generation
            and decision.verdict == indexer_pb2.ROLLOUT_VERDICT_PASSED
            and all(name in decision.candidate_metrics for name in GATED)
        ):
            return {name: float(decision.candidate_metrics[name]) for name in GATED}
    return None


@dataclass(frozen=True)
class QualityGate:
    """A candidate passes when every gated figure is at least its floor and, if a generation is
    active, not lower than the active one's by more than ``tolerance`` (absolute, in [0, 1])."""

    tolerance: float = 0.02
    min_recall_at_1: float = 0.0
    min_map_at_10: float = 0.0

    def __post_init__(self) -> None:
        for name in ("tolerance", "min_recall_at_1", "min_map_at_10"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise InvalidInput(f"the gate's {name.replace('_', '-')} must be in [0, 1], got {value}")

    def floors(self) -> dict[str, float]:
        return {"recall@1": self.min_recall_at_1, "map@10": self.min_map_at_10}

    def judge(self, candidate: dict[str, float], active: dict[str, float] | None) -> tuple[bool, str]:
        """(passed, reason): every comparison in words, failing ones first."""
        failed, passed = [], []
        for name, floor in self.floors().items():
            value = candidate[name]
            if value < floor:
                failed.append(f"{name} {value:.4f} is below the floor {floor:.4f}")
            elif active is None:
                passed.append(f"{name} {value:.4f} >= floor {floor:.4f}")
            elif value < active[name] - self.tolerance:
                failed.append(
                    f"{name} {value:.4f} is {active[name] - value:.4f} below the active generation's "
                    f"{active[name]:.4f} (tolerance {self.tolerance:.4f})"
                )
            else:
                passed.append(
                    f"{name} {value:.4f} >= active {active[name]:.4f} - {self.tolerance:.4f} "
                    f"and >= floor {floor:.4f}"
                )
        return not failed, "; ".join(failed + passed)
