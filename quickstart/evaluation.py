"""Retrieval quality measured through the running system, and offline on the same embeddings.

System side: the ranked hits the Search RPC returned for every test query. Offline side:
``trainer.metrics`` on the vectors exported from the indexer (the catalogue) and the test queries
embedded by Serving with the generation's model version. Both use the same definitions: Recall@k,
mAP@R (Musgrave et al.) and the original ``evaluation.py`` mAP@10 over the same seeded query draw.

Why they may differ, and by how much: the index is HNSW, an approximate search. A query's
contribution to any of these metrics is a number in [0, 1] that depends only on the labels of its
first ``depth`` hits (1 for Recall@1, 10 for mAP@10, R for mAP@R), so the difference between the two
means is at most the share of queries whose first ``depth`` labels differ from exact search. That
share, measured here against an exact brute-force ranking, is the tolerance each metric is checked
against. Three more checks make sure the share is not large for a wrong reason: every hit's score
equals the cosine similarity recomputed offline (both sides use the same vectors), every hit's label is
the label stored with that item, and HNSW found at least ``MIN_NEIGHBOUR_RECALL`` of the exact
neighbours. (A fixed cap such as 0.02 on the difference would be stricter, but a barely trained model
packs the embeddings so tightly that near-ties legitimately move AP@10 by more on a user's data.)

Beyond agreement, ``quality_figures`` answers "how good is it, and where does it fail" from the Search
hits: Recall@1/5/10, mAP@10, Recall@1 per class, the most confused class pairs, and the score spread
(``trainer.metrics.spread_report``: the cosines of same-class and different-class top hits, and of
random pairs of the system's own vectors), with the collapse warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trainer import metrics as tm

KS = (1, 2, 4, 5, 8, 10, 16)
ORIGINAL_R = 10
MAP_DEPTH = 10  # mAP@10: the original AP@10 averaged over every query
CONFUSED_PAIRS = 5
MIN_NEIGHBOUR_RECALL = 0.9
SCORE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class RankedHits:
    """What Search returned for one query: ids, labels and scores, best first."""

    ids: Sequence[str]
    labels: Sequence[str]
    scores: Sequence[float]


def search_depth(gallery_labels: Sequence[str]) -> int:
    """The k to ask Search for: enough for Recall@16, mAP@10 and mAP@R (R = largest class)."""
    _, counts = np.unique(np.asarray(gallery_labels), return_counts=True)
    return int(max(max(KS), ORIGINAL_R, counts.max()))


def original_picks(n_queries: int, trials: int, seed: int) -> np.ndarray:
    """The queries of the original mAP@10, drawn exactly as ``trainer.metrics.original_map`` draws them."""
    return np.random.default_rng(seed).integers(0, n_queries, size=trials)


def metrics_from_hits(
    hits: Sequence[RankedHits],
    query_labels: Sequence[str],
    gallery_labels: Sequence[str],
    *,
    trials: int,
    seed: int,
) -> dict[str, float]:
    """Recall@k, mAP@R and the original mAP@10 of ranked hit lists (the system's side)."""
    classes, counts = np.unique(np.asarray(gallery_labels), return_counts=True)
    class_size = dict(zip(classes.tolist(), counts.tolist(), strict=True))
    recall = {k: [] for k in KS}
    map_r, map_depth = [], []
    for ranked, label in zip(hits, query_labels, strict=True):
        r = class_size.get(label, 0)
        if r == 0:  # unanswerable, left out as trainer.metrics does
            continue
        rel = np.asarray([hit_label == label for hit_label in ranked.labels], dtype=bool)
        for k in KS:
            recall[k].append(bool(rel[:k].any()))
        top_r = rel[:r]
        precision = np.cumsum(top_r) / np.arange(1, len(top_r) + 1)
        map_r.append(float(np.sum(precision[top_r]) / r))
        map_depth.append(tm.average_precision_at_k(rel[:MAP_DEPTH]))
    out = {f"recall@{k}": float(np.mean(v)) if v else 0.0 for k, v in recall.items()}
    out["map@r"] = float(np.mean(map_r)) if map_r else 0.0
    out[f"map@{MAP_DEPTH}"] = float(np.mean(map_depth)) if map_depth else 0.0
    aps = [
        tm.average_precision_at_k([lab == query_labels[i] for lab in hits[i].labels[:ORIGINAL_R]])
        for i in original_picks(len(hits), trials, seed)
    ]
    out[f"original_map@{ORIGINAL_R}"] = float(np.mean(aps))
    return out


def offline_metrics(
    queries: np.ndarray,
    query_labels: Sequence[str],
    gallery: np.ndarray,
    gallery_labels: Sequence[str],
    *,
    trials: int,
    seed: int,
) -> dict[str, float]:
    """The same figures from ``trainer.metrics`` on the embeddings (exact search)."""
    q_labels, g_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    out = tm.evaluate(
        queries,
        q_labels,
        gallery_embeddings=gallery,
        gallery_labels=g_labels,
        ks=KS,
        metric="cosine",
        nmi=False,
    )
    out[f"original_map@{ORIGINAL_R}"] = tm.original_map(
        queries, q_labels, gallery, g_labels, trials=trials, r=ORIGINAL_R, seed=seed, metric="cosine"
    )
    answerable = np.isin(q_labels, g_labels)
    top = tm.top_k_indices(_normalised(queries[answerable]) @ _normalised(gallery).T, MAP_DEPTH)
    relevant = g_labels[top] == q_labels[answerable][:, None]
    out[f"map@{MAP_DEPTH}"] = (
        float(np.mean([tm.average_precision_at_k(row) for row in relevant])) if len(top) else 0.0
    )
    out["nmi"] = tm.evaluate(queries, q_labels, ks=(1,), metric="cosine", nmi=True)["nmi"]
    return out


def _normalised(x: np.ndarray) -> np.ndarray:
    """Unit rows in float64, as ``trainer.metrics`` ranks: near-ties of a barely trained model must
    order the same way here as in the offline figures, or the exact ranking the tolerance is measured
    against would not be the one the offline side used."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def compare(
    hits: Sequence[RankedHits],
    queries: np.ndarray,
    query_labels: Sequence[str],
    gallery_ids: Sequence[str],
    gallery: np.ndarray,
    gallery_labels: Sequence[str],
    *,
    trials: int,
    seed: int,
) -> dict:
    """System vs offline figures, the tolerance of each, and whether they agree."""
    system = metrics_from_hits(hits, query_labels, gallery_labels, trials=trials, seed=seed)
    offline = offline_metrics(queries, query_labels, gallery, gallery_labels, trials=trials, seed=seed)

    # The exact ranking, to see how far HNSW strayed from it.
    g_labels = np.asarray(gallery_labels)
    scores = _normalised(queries) @ _normalised(gallery).T
    depth = max(len(h.ids) for h in hits)
    exact = tm.top_k_indices(scores, depth)
    position = {item_id: i for i, item_id in enumerate(gallery_ids)}
    class_size = dict(zip(*np.unique(g_labels, return_counts=True), strict=True))

    def differs(i: int, d: int) -> bool:
        return list(hits[i].labels[:d]) != g_labels[exact[i, :d]].tolist()

    n = len(hits)
    neighbour_recall = float(
        np.mean(
            [
                len(set(hits[i].ids[:depth]) & {gallery_ids[j] for j in exact[i, : len(hits[i].ids)]})
                / max(len(hits[i].ids), 1)
                for i in range(n)
            ]
        )
    )
    score_error = 0.0
    wrong_labels = 0
    for i, ranked in enumerate(hits):
        for item_id, label, score in zip(ranked.ids, ranked.labels, ranked.scores, strict=True):
            score_error = max(score_error, abs(float(score) - float(scores[i, position[item_id]])))
            wrong_labels += label != g_labels[position[item_id]]
    picks = original_picks(n, trials, seed)
    share = {f"recall@{k}": np.mean([differs(i, k) for i in range(n)]) for k in KS}
    share["map@r"] = np.mean([differs(i, int(class_size.get(query_labels[i], 0))) for i in range(n)])
    share[f"original_map@{ORIGINAL_R}"] = np.mean([differs(int(i), ORIGINAL_R) for i in picks])
    share[f"map@{MAP_DEPTH}"] = np.mean([differs(i, MAP_DEPTH) for i in range(n)])

    rows = []
    for name in (*[f"recall@{k}" for k in KS], "map@r", f"map@{MAP_DEPTH}", f"original_map@{ORIGINAL_R}"):
        diff = abs(system[name] - offline[name])
        tolerance = float(share[name]) + 1e-6
        rows.append(
            {
                "metric": name,
                "system": system[name],
                "offline": offline[name],
                "difference": diff,
                "tolerance": tolerance,
                "queries_differing_from_exact": float(share[name]),
                "agree": diff <= tolerance,
            }
        )
    return {
        "rows": rows,
        "system": system,
        "offline": offline,
        "neighbour_recall": neighbour_recall,
        "max_score_error": score_error,
        "scores_agree": score_error <= SCORE_TOLERANCE,
        "hits_with_wrong_label": int(wrong_labels),
        "agree": (
            all(r["agree"] for r in rows)
            and score_error <= SCORE_TOLERANCE
            and wrong_labels == 0
            and neighbour_recall >= MIN_NEIGHBOUR_RECALL
        ),
        "queries": n,
        "gallery": len(gallery_ids),
        "trials": trials,
        "seed": seed,
        "min_neighbour_recall": MIN_NEIGHBOUR_RECALL,
    }


def class_breakdown(hits: Sequence[RankedHits], query_labels: Sequence[str]) -> dict:
    """Recall@1 of each query class, and the class pairs most often confused at rank 1."""
    per_class: dict[str, list[bool]] = {}
    confused: dict[tuple[str, str], int] = {}
    for ranked, label in zip(hits, query_labels, strict=True):
        first = ranked.labels[0] if len(ranked.labels) else None
        per_class.setdefault(label, []).append(first == label)
        if first is not None and first != label:
            confused[(label, first)] = confused.get((label, first), 0) + 1
    queries_of = {label: len(v) for label, v in per_class.items()}
    pairs = sorted(confused.items(), key=lambda item: (-item[1], item[0]))[:CONFUSED_PAIRS]
    return {
        "per_class_recall@1": {label: float(np.mean(v)) for label, v in sorted(per_class.items())},
        "confused_pairs": [
            {"query_class": q, "answered_class": a, "count": count, "share_of_class": count / queries_of[q]}
            for (q, a), count in pairs
        ],
    }


def system_spread(
    hits: Sequence[RankedHits],
    query_labels: Sequence[str],
    queries: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: Sequence[str],
    *,
    seed: int,
) -> dict:
    """The score spread seen through the system: Search's own hit scores, and random pairs of its vectors."""
    depth = min(tm.SPREAD_TOP_K, min(len(h.scores) for h in hits))
    same, different = [], []
    for ranked, label in zip(hits, query_labels, strict=True):
        for hit_label, score in zip(ranked.labels[:depth], ranked.scores[:depth], strict=True):
            (same if hit_label == label else different).append(float(score))
    pairs_same, pairs_different = tm.random_pair_scores(
        queries, np.asarray(query_labels), gallery, np.asarray(gallery_labels), seed=seed
    )
    return tm.spread_report(same, different, pairs_same, pairs_different, depth)


def quality_figures(
    hits: Sequence[RankedHits],
    query_labels: Sequence[str],
    queries: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: Sequence[str],
    *,
    seed: int,
) -> dict:
    """What the report shows for one model version: headline metrics, per class, confusions, spread."""
    system = metrics_from_hits(hits, query_labels, gallery_labels, trials=len(hits), seed=seed)
    spread = system_spread(hits, query_labels, queries, gallery, gallery_labels, seed=seed)
    return {
        **{name: system[name] for name in ("recall@1", "recall@5", "recall@10", f"map@{MAP_DEPTH}")},
        **class_breakdown(hits, query_labels),
        "spread": spread,
        "collapse_warning": tm.collapse_warning(spread),
    }
