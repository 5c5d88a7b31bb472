"""Retrieval metrics: Recall@k, mAP@R, NMI and the original AP@R, vectorised and chunked for bounded memory.

Every function works on NumPy arrays. Similarities are computed a block of query rows at a time and only
the top of each ranking is kept, so a 50,000-image evaluation never holds an N x N matrix. Rankings are
deterministic: equal scores are ordered by gallery position (lower index first).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from cbir.errors import InvalidInput

__all__ = [
    "COLLAPSE_COSINE",
    "DEFAULT_KS",
    "average_precision_at_k",
    "collapse_warning",
    "evaluate",
    "kmeans",
    "normalized_mutual_information",
    "original_map",
    "random_pair_scores",
    "score_spread",
    "score_stats",
    "spread_report",
    "top_k_indices",
]

DEFAULT_KS = (1, 2, 4, 8, 16)
# The trainer's distances in the original config's spelling (model.fit.metric). They are not
# cbir.metric.Metric's names on purpose: "euclidean" ranks like an index's Metric.L2 (squared), and
# "cosine" like Metric.COSINE; inner product is an index metric only.
METRICS = ("cosine", "euclidean")
# Float64 cells of one block of the query x gallery score matrix (64 MB).
DEFAULT_BLOCK_CELLS = 1 << 23
# An embedding whose random different-class pairs score this cosine on average has collapsed: every item
# is nearly the same vector, rankings rest on the last decimals and a score threshold means nothing.
COLLAPSE_COSINE = 0.9
SPREAD_TOP_K = 10
SPREAD_PAIRS = 20_000


def _as_embeddings(name: str, x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InvalidInput(f"{name} must be a non-empty [n, dim] array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise InvalidInput(f"{name} must be numeric, got {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.all(np.isfinite(x)):
        raise InvalidInput(f"{name} contains NaN or infinite values")
    return x


def _as_labels(name: str, labels, n: int) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n:
        raise InvalidInput(f"{name} has {labels.shape[0]} entries for {n} embeddings")
    return labels


def _prepare_space(x: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Vectors and squared norms such that score = 2 q.g - |g|^2 ranks like -|q-g|^2, or cosine."""
    if metric not in METRICS:
        raise InvalidInput(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(norms, 1e-12), np.zeros(len(x))
    return x, np.sum(x * x, axis=1)


def _score_blocks(
    queries: np.ndarray,
    gallery: np.ndarray,
    metric: str,
    *,
    exclude_self: bool,
    block_cells: int,
) -> Iterator[tuple[int, np.ndarray]]:
    """(first query row, scores [rows, G]) blocks; higher score = nearer. Self matches get -inf."""
    q, _ = _prepare_space(queries, metric)
    g, g_sq = _prepare_space(gallery, metric)
    g_t = np.ascontiguousarray(g.T)  # a contiguous right operand makes the block products ~3x faster
    rows = max(1, block_cells // max(1, len(g)))
    for start in range(0, len(q), rows):
        block = q[start : start + rows]
        scores = block @ g_t
        if metric == "euclidean":
            # -|q - g|^2 without the per-row constant |q|^2, which does not change the ranking.
            scores *= 2.0
            scores -= g_sq[None, :]
        if exclude_self:
            idx = np.arange(len(block))
            scores[idx, start + idx] = -np.inf
        yield start, scores


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices [rows, k] of the k highest scores per row, best first, ties by lower column index.

    Exact under ties: argpartition picks arbitrarily among scores equal to the k-th one, so rows where
    such a tie crosses the cut are redone by taking the lowest tied columns.
    """
    rows, cols = scores.shape
    k = min(k, cols)
    if k == 0:
        return np.zeros((rows, 0), dtype=np.int64)
    cand = np.argpartition(scores, cols - k, axis=1)[:, cols - k :]
    cand_scores = np.take_along_axis(scores, cand, axis=1)
    kth = cand_scores.min(axis=1, keepdims=True)
    tied_in_row = np.count_nonzero(scores == kth, axis=1)
    tied_in_cand = np.count_nonzero(cand_scores == kth, axis=1)
    for r in np.nonzero(tied_in_row > tied_in_cand)[0]:
        above = np.nonzero(scores[r] > kth[r])[0]
        tied = np.nonzero(scores[r] == kth[r])[0][: k - len(above)]
        cand[r] = np.concatenate([above, tied])
    cand.sort(axis=1)  # column order first, so the stable sort below breaks ties by column
    order = np.argsort(-np.take_along_axis(scores, cand, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cand, order, axis=1)


def average_precision_at_k(relevant: Sequence[bool]) -> float:
    """The original AP@R (tfr utils/metrics.APatk) of one ranked result list of length R.

    AP = sum over ranks i with a relevant result of (relevant results in 1..i) / i, divided by the number
    of relevant results in the list; 0 when there are none.
    """
    rel = np.asarray(relevant, dtype=bool).reshape(-1)
    hits = np.cumsum(rel)
    count = int(hits[-1]) if len(hits) else 0
    if count == 0:
        return 0.0
    ranks = np.arange(1, len(rel) + 1)
    return float(np.sum((hits / ranks)[rel]) / count)


def _class_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, exclude_self: bool) -> np.ndarray:
    """R per query: the number of gallery items sharing its label (minus itself when leaving one out)."""
    classes, counts = np.unique(gallery_labels, return_counts=True)
    pos = np.searchsorted(classes, query_labels)
    pos = np.clip(pos, 0, len(classes) - 1)
    r = np.where(classes[pos] == query_labels, counts[pos], 0)
    return r - 1 if exclude_self else r


def _retrieval_metrics(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    ks: Sequence[int],
    metric: str,
    exclude_self: bool,
    block_cells: int,
) -> dict[str, float]:
    r_all = _class_counts(query_labels, gallery_labels, exclude_self)
    depth_cap = len(gallery) - (1 if exclude_self else 0)
    recall_hits = {k: 0 for k in ks}
    ap_sum = 0.0
    for start, scores in _score_blocks(
        queries, gallery, metric, exclude_self=exclude_self, block_cells=block_cells
    ):
        rows = len(scores)
        r = r_all[start : start + rows]
        depth = min(max(max(ks), int(r.max(initial=0))), depth_cap)
        top = top_k_indices(scores, depth)
        rel = gallery_labels[top] == query_labels[start : start + rows, None]  # [rows, depth]
        for k in ks:
            recall_hits[k] += int(np.sum(rel[:, :k].any(axis=1) & (r > 0)))
        # mAP@R: mean over i <= R of precision@i at relevant ranks, divided by R.
        ranks = np.arange(1, depth + 1)
        within_r = ranks[None, :] <= r[:, None]
        precision = np.cumsum(rel, axis=1) / ranks[None, :]
        ap_sum += float(np.sum(np.where(rel & within_r, precision, 0.0).sum(axis=1) / np.maximum(r, 1)))
    answerable = int(np.sum(r_all > 0))
    out = {f"recall@{k}": recall_hits[k] / answerable if answerable else 0.0 for k in ks}
    out["map@r"] = ap_sum / answerable if answerable else 0.0
    return out


def evaluate(
    embeddings,
    labels,
    *,
    gallery_embeddings=None,
    gallery_labels=None,
    ks: Sequence[int] = DEFAULT_KS,
    metric: str = "cosine",
    nmi: bool = True,
    seed: int = 0,
    block_cells: int = DEFAULT_BLOCK_CELLS,
) -> dict[str, float]:
    """Recall@k, mAP@R (Musgrave, Belongie & Lim 2020) and NMI of embeddings with class labels.

    Without a gallery, every embedding is a query against all the others (leave-one-out). With one,
    the embeddings are the queries and the gallery is searched. Queries whose class has no other
    member in the gallery cannot be answered and are left out of Recall@k and mAP@R. NMI clusters the
    query embeddings with k-means (k = their number of classes, seeded) against their labels.
    Returns {"recall@1": ..., ..., "map@r": ..., "nmi": ...} (nmi only when asked for).
    """
    queries = _as_embeddings("embeddings", embeddings)
    query_labels = _as_labels("labels", labels, len(queries))
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise InvalidInput(f"ks must be positive integers, got {ks}")
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise InvalidInput("gallery_embeddings and gallery_labels go together")
    if gallery_embeddings is None:
        gallery, g_labels, exclude_self = queries, query_labels, True
        if len(queries) < 2:
            raise InvalidInput("leave-one-out evaluation needs at least 2 embeddings")
    else:
        gallery = _as_embeddings("gallery_embeddings", gallery_embeddings)
        g_labels = _as_labels("gallery_labels", gallery_labels, len(gallery))
        exclude_self = False
        if gallery.shape[1] != queries.shape[1]:
            raise InvalidInput(f"gallery dimension {gallery.shape[1]} != query dimension {queries.shape[1]}")
    result = _retrieval_metrics(
        queries,
        query_labels,
        gallery,
        g_labels,
        ks=ks,
        metric=metric,
        exclude_self=exclude_self,
        block_cells=block_cells,
    )
    if nmi:
        space, _ = _prepare_space(queries, metric)
        n_clusters = len(np.unique(query_labels))
        assignment = kmeans(space, n_clusters, seed=seed, block_cells=block_cells)
        result["nmi"] = normalized_mutual_information(query_labels, assignment)
    return result


def original_map(
    query_embeddings,
    query_labels,
    gallery_embeddings,
    gallery_labels,
    *,
    trials: int,
    r: int,
    seed: int,
    metric: str = "euclidean",
) -> float:
    """The original evaluation.py mAP: the mean AP@R (see average_precision_at_k) of `trials` queries.

    The original drew its queries at random without a seed; here they are drawn with replacement from
    a seeded generator, so a run can be repeated. Returns a fraction (the original printed it * 100).
    """
    queries = _as_embeddings("query_embeddings", query_embeddings)
    q_labels = _as_labels("query_labels", query_labels, len(queries))
    gallery = _as_embeddings("gallery_embeddings", gallery_embeddings)
    g_labels = _as_labels("gallery_labels", gallery_labels, len(gallery))
    if trials < 1 or r < 1:
        raise InvalidInput(f"trials and r must be >= 1, got trials={trials}, r={r}")
    picks = np.random.default_rng(seed).integers(0, len(queries), size=trials)
    picked_labels = q_labels[picks]
    aps = []
    blocks = _score_blocks(
        queries[picks], gallery, metric, exclude_self=False, block_cells=DEFAULT_BLOCK_CELLS
    )
    for start, scores in blocks:
        top = top_k_indices(scores, r)
        for row, label in zip(top, picked_labels[start : start + len(scores)], strict=True):
            aps.append(average_precision_at_k(g_labels[row] == label))
    return float(np.mean(aps))


def kmeans(
    x: np.ndarray,
    n_clusters: int,
    *,
    seed: int = 0,
    max_iter: int = 50,
    block_cells: int = DEFAULT_BLOCK_CELLS,
) -> np.ndarray:
    """Cluster assignments [n] by Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not 1 <= n_clusters <= n:
        raise InvalidInput(f"k-means needs 1 <= n_clusters <= {n}, got {n_clusters}")
    rng = np.random.default_rng(seed)
    x_sq = np.sum(x * x, axis=1)
    centers = np.empty((n_clusters, x.shape[1]))
    centers[0] = x[rng.integers(n)]
    closest = np.maximum(x_sq - 2 * x @ centers[0] + centers[0] @ centers[0], 0.0)
    for c in range(1, n_clusters):
        total = closest.sum()
        pick = rng.choice(n, p=closest / total) if total > 0 else rng.integers(n)
        centers[c] = x[pick]
        closest = np.minimum(closest, np.maximum(x_sq - 2 * x @ centers[c] + centers[c] @ centers[c], 0.0))

    assignment = np.full(n, -1)
    rows = max(1, block_cells // n_clusters)
    for _ in range(max_iter):
        c_sq = np.sum(centers * centers, axis=1)
        new = np.concatenate(
            [np.argmin(c_sq[None, :] - 2 * x[s : s + rows] @ centers.T, axis=1) for s in range(0, n, rows)]
        )
        if np.array_equal(new, assignment):
            break
        assignment = new
        sums = np.zeros_like(centers)
        np.add.at(sums, assignment, x)
        counts = np.bincount(assignment, minlength=n_clusters)
        # An emptied cluster keeps its old centre rather than becoming NaN.
        nonempty = counts > 0
        centers[nonempty] = sums[nonempty] / counts[nonempty, None]
    return assignment


def normalized_mutual_information(labels_true, labels_pred) -> float:
    """NMI with the arithmetic-mean normalisation: 2 I(Y; C) / (H(Y) + H(C)); 1 when both are constant."""
    _, y = np.unique(np.asarray(labels_true).reshape(-1), return_inverse=True)
    _, c = np.unique(np.asarray(labels_pred).reshape(-1), return_inverse=True)
    if len(y) != len(c):
        raise InvalidInput(f"label arrays differ in length: {len(y)} != {len(c)}")
    n = len(y)
    joint = np.zeros((y.max() + 1, c.max() + 1))
    np.add.at(joint, (y, c), 1.0)
    joint /= n
    py, pc = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mutual = float(np.sum(joint[nz] * np.log(joint[nz] / np.outer(py, pc)[nz])))
    h_y = float(-np.sum(py * np.log(py)))
    h_c = float(-np.sum(pc * np.log(pc)))
    if h_y + h_c == 0:
        return 1.0
    return max(0.0, 2.0 * mutual / (h_y + h_c))


def score_stats(scores) -> dict[str, float]:
    """Mean, standard deviation, 5th and 95th percentiles and count of a set of scores (NaN when empty)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        return {
            "mean": float("nan"),
            "std": float("nan"),
            "p05": float("nan"),
            "p95": float("nan"),
            "count": 0,
        }
    p05, p95 = np.percentile(scores, [5, 95])
    return {
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "p05": float(p05),
        "p95": float(p95),
        "count": int(scores.size),
    }


def score_spread(
    embeddings,
    labels,
    *,
    gallery_embeddings=None,
    gallery_labels=None,
    top_k: int = SPREAD_TOP_K,
    pairs: int = SPREAD_PAIRS,
    seed: int = 0,
    block_cells: int = DEFAULT_BLOCK_CELLS,
) -> dict:
    """How the cosine scores are spread: of each query's top ``top_k`` hits and of random pairs, by class.

    ``top_hits``: the scores of every query's first ``top_k`` hits (exact search), split into hits of
    the query's class and hits of another class: how far apart right and wrong answers score where it
    matters. ``random_pairs``: ``pairs`` random (query, gallery item) pairs of the same class and as many
    of different classes: the spread of the whole space. Leave-one-out without a gallery (a query is
    never paired with itself). ``collapsed`` is True when the mean different-class random-pair cosine is
    at least COLLAPSE_COSINE; ``collapse_warning`` words it.
    """
    queries = _as_embeddings("embeddings", embeddings)
    q_labels = _as_labels("labels", labels, len(queries))
    if gallery_embeddings is None:
        gallery, g_labels, exclude_self = queries, q_labels, True
    else:
        gallery = _as_embeddings("gallery_embeddings", gallery_embeddings)
        g_labels = _as_labels("gallery_labels", gallery_labels, len(gallery))
        exclude_self = False
    same_top, other_top = [], []
    depth = min(top_k, len(gallery) - (1 if exclude_self else 0))
    for start, scores in _score_blocks(
        queries, gallery, "cosine", exclude_self=exclude_self, block_cells=block_cells
    ):
        top = top_k_indices(scores, depth)
        top_scores = np.take_along_axis(scores, top, axis=1)
        same = g_labels[top] == q_labels[start : start + len(scores), None]
        same_top.append(top_scores[same])
        other_top.append(top_scores[~same])

    same_pairs, other_pairs = random_pair_scores(
        queries, q_labels, gallery, g_labels, pairs=pairs, seed=seed, exclude_self=exclude_self
    )
    return spread_report(np.concatenate(same_top), np.concatenate(other_top), same_pairs, other_pairs, depth)


def spread_report(top_same, top_different, pairs_same, pairs_different, top_k: int) -> dict:
    """The score_spread dict from the four sets of cosines (also built from Search results by the demo)."""
    different = score_stats(pairs_different)
    return {
        "top_k": int(top_k),
        "top_hits": {"same": score_stats(top_same), "different": score_stats(top_different)},
        "random_pairs": {"same": score_stats(pairs_same), "different": different},
        "collapsed": bool(different["count"] and different["mean"] >= COLLAPSE_COSINE),
    }


def random_pair_scores(
    queries,
    query_labels,
    gallery,
    gallery_labels,
    *,
    pairs: int = SPREAD_PAIRS,
    seed: int = 0,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of ``pairs`` random same-class and of as many random different-class (query, item) pairs.

    Each pair draws a random query, then a random gallery item of its class (never itself when
    ``exclude_self``: queries and gallery are the same set) and one of another class; a query whose
    class has no (other) item in the gallery gives no same-class pair.
    """
    q_unit, _ = _prepare_space(_as_embeddings("queries", queries), "cosine")
    g_unit, _ = _prepare_space(_as_embeddings("gallery", gallery), "cosine")
    q_labels = _as_labels("query_labels", query_labels, len(q_unit))
    g_labels = _as_labels("gallery_labels", gallery_labels, len(g_unit))
    rng = np.random.default_rng(seed)
    classes, g_class = np.unique(g_labels, return_inverse=True)
    order = np.argsort(g_class, kind="stable")  # gallery items grouped by class, each group in index order
    counts = np.bincount(g_class, minlength=len(classes))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    q = rng.integers(0, len(q_unit), size=pairs)
    pos = np.clip(np.searchsorted(classes, q_labels[q]), 0, len(classes) - 1)
    known = classes[pos] == q_labels[q]
    size = np.where(known, counts[pos], 0)
    # Same class: the r-th member of the query's class, skipping the query itself when leaving one out.
    own = size - (1 if exclude_self else 0)
    has_same = own > 0
    r = np.floor(rng.random(pairs) * np.maximum(own, 1)).astype(np.int64)
    if exclude_self:
        rank_of_self = np.empty(len(order), np.int64)
        rank_of_self[order] = np.arange(len(order))
        r = np.where(r >= rank_of_self[q] - starts[pos], r + 1, r)
    same_items = order[np.minimum(starts[pos] + r, len(order) - 1)]
    # Different class: the r-th item outside the query's class block of ``order``.
    others = len(g_labels) - size
    has_other = others > 0
    r = np.floor(rng.random(pairs) * np.maximum(others, 1)).astype(np.int64)
    r = np.where(known & (r >= starts[pos]), r + size, r)
    other_items = order[np.minimum(r, len(order) - 1)]
    same = np.einsum("ij,ij->i", q_unit[q[has_same]], g_unit[same_items[has_same]])
    other = np.einsum("ij,ij->i", q_unit[q[has_other]], g_unit[other_items[has_other]])
    return same, other


def collapse_warning(spread: dict) -> str | None:
    """A sentence for a user when ``spread`` (score_spread's result) shows a collapsed embedding, else None."""
    if not spread.get("collapsed"):
        return None
    different = spread["random_pairs"]["different"]
    return (
        f"the embedding has collapsed: random pairs of different classes score {different['mean']:.4f} "
        f"(std {different['std']:.4f}) on average, >= {COLLAPSE_COSINE}; rankings rest on the last decimals "
        "and a score threshold (min_score) cannot separate right from wrong answers. Train with a proxy loss "
        "(normalized_softmax, proxy_anchor) or a lower learning rate."
    )
