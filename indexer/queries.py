"""k-NN queries over one generation's index (HNSW or partitions) or exact: filters, exclusions, hits.

A query reads ONE graph under ONE hold of its read lock, from the search to the last hit: candidates,
filter decisions, ids, metadata and vectors all come from that graph's state, so an answer never names
an item the graph no longer holds or shows metadata that does not pass the filter (see "Concurrency" in
indexer/README.md). The catalogue is only used to size a filter and to list candidate ids, each of
which is rechecked against the graph's own row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import cast

import numpy as np

from cbir.errors import InvalidInput
from cbir.metric import Metric
from indexer.catalogue import Catalogue, ItemFilter
from indexer.graph import ExactIndex
from indexer.indexes import GenerationIndex
from indexer.store import ItemRow


@dataclass(slots=True)
class Hit:
    item: ItemRow
    distance: float
    score: float


@dataclass(frozen=True)
class KnnQuery:
    """A validated query batch against one graph."""

    vectors: np.ndarray  # float32 [n, dimension]
    k: int
    item_filter: ItemFilter
    ef: int  # 0: the graph's default (HNSW generations)
    min_score: float | None
    exclude_ids: frozenset[str]
    probes: int = 0  # 0: the index's default (partition generations)


def search(
    graph: GenerationIndex,
    metric: Metric,
    query: KnnQuery,
    catalogue: Catalogue,
    exact_threshold: int,
    exact_below: int,
) -> list[list[Hit]]:
    """The hits of every query vector, best first (fewer than k only if fewer items match).

    Exact search answers a filtered query that at most ``exact_threshold`` items can match, and an
    unfiltered one over at most max(k, ``exact_below``) items (HNSW saves nothing there, and exact search
    never misses); HNSW answers the rest, and exact search again when HNSW finds fewer than k.
    """
    width = graph.width_of(query.ef, query.probes)
    custom = bool(width) and width != graph.default_width
    # An HNSW width override is rare: it runs alone on the graph (see HnswGraph.custom_ef); a
    # partition index takes it per query.
    lock = graph.lock.write() if custom and graph.exclusive_width else graph.lock.read()
    with lock, graph.custom_width(width) if custom else nullcontext():
        rows, dists = _search(graph, metric, query, catalogue, exact_threshold, exact_below, width)
    dists = np.asarray(dists, np.float32).reshape(len(query.vectors), -1)
    if not metric.distances_can_be_negative:
        # Float rounding can give an item a distance of -1e-7 to itself; these distances are >= 0.
        dists = np.maximum(dists, 0.0)
    scores = metric.scores(dists).tolist()
    min_score = query.min_score
    return [
        [
            Hit(row, d, s)
            for row, d, s in zip(row_items, row_dists, row_scores, strict=False)
            if min_score is None or s >= min_score
        ]
        for row_items, row_dists, row_scores in zip(rows, dists.tolist(), scores, strict=True)
    ]


# Per query: the rows found and their distances. Both searches return live items only, so the
# graph's None (a deleted label) never appears; the casts below say so once per search.
_Found = tuple[list[list[ItemRow]], np.ndarray]


def _search(
    graph: GenerationIndex,
    metric: Metric,
    query: KnnQuery,
    catalogue: Catalogue,
    exact_threshold: int,
    exact_below: int,
    width: int,
) -> _Found:
    """(rows, distances) per query; the caller holds the graph's lock."""
    q, k, flt, exclude = query.vectors, query.k, query.item_filter, query.exclude_ids
    live = len(graph)
    if live == 0:
        return [[] for _ in q], np.zeros((len(q), 0), np.float32)
    excluded_labels = {graph.label_of[i] for i in exclude if i in graph.label_of}
    if not flt:
        if live - len(excluded_labels) <= max(k, exact_below):
            return _exact(graph, metric, q, k, [i for i in graph.label_of if i not in exclude])

        def not_excluded(label: int) -> bool:
            return label not in excluded_labels

        return _hnsw_or_exact(
            graph,
            metric,
            q,
            k,
            not_excluded if excluded_labels else None,
            lambda: [i for i in graph.label_of if i not in exclude],
            width,
        )

    def candidates() -> list[str]:
        return [i for i in catalogue.candidates(flt) if i not in exclude and flt.matches(graph.row_of(i))]

    if catalogue.estimate(flt) <= exact_threshold:
        return _exact(graph, metric, q, k, candidates())
    rows = graph.rows

    def accept(label: int) -> bool:
        return label not in excluded_labels and flt.matches(rows[label])

    return _hnsw_or_exact(graph, metric, q, k, accept, candidates, width)


def _hnsw_or_exact(
    graph: GenerationIndex,
    metric: Metric,
    q: np.ndarray,
    k: int,
    accept: Callable[[int], bool] | None,
    candidates: Callable[[], list[str]],
    width: int,
) -> _Found:
    try:
        labels, dists = graph.search(q, k, accept, width)
    except RuntimeError:
        # The index found fewer than k (deletes, a narrow filter): answer exactly instead.
        return _exact(graph, metric, q, k, candidates())
    rows = graph.rows
    found = [[rows[label] for label in row] for row in labels.tolist()]
    return cast("list[list[ItemRow]]", found), dists


def _exact(graph: GenerationIndex, metric: Metric, q: np.ndarray, k: int, ids: list[str]) -> _Found:
    found, dists = ExactIndex(metric, ids, graph.vectors_of(ids)).search(q, k)
    rows = [[graph.row_of(i) for i in row] for row in found]
    return cast("list[list[ItemRow]]", rows), dists


@dataclass(frozen=True)
class PackedVectors:
    """Query vectors as KnnRequest.packed_queries carries them: little-endian float32, row after row."""

    data: bytes


def as_queries(
    queries: np.ndarray | Sequence[np.ndarray | Sequence[float]] | PackedVectors, dim: int
) -> np.ndarray:
    """A float32 [n, dim] matrix of finite query vectors, or InvalidInput naming the bad one."""
    if isinstance(queries, PackedVectors):
        if len(queries.data) % (4 * dim):
            raise InvalidInput(
                f"packed_queries holds {len(queries.data)} bytes, not a whole number of {dim}-value "
                f"float32 vectors ({4 * dim} bytes each) for this generation"
            )
        queries = np.frombuffer(queries.data, "<f4").reshape(-1, dim)
    rows = list(queries) if not isinstance(queries, np.ndarray) else queries
    if len(rows) == 0:
        raise InvalidInput("at least one query vector is required")
    if not isinstance(rows, np.ndarray):
        for j, row in enumerate(rows):
            if len(row) != dim:
                raise InvalidInput(
                    f"queries[{j}] has {len(row)} values, the generation expects dimension {dim}"
                )
    q = np.asarray(rows, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise InvalidInput(f"query vectors must have dimension {dim}, got shape {tuple(q.shape)}")
    bad = ~np.isfinite(q).all(axis=1)
    if bad.any():
        raise InvalidInput(f"queries[{int(np.argmax(bad))}] contains NaN or infinite values")
    return q
