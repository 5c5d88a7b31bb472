"""Retrieval metrics: hand-worked values, naive-loop references, chunked == unchunked, ties, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cbir.errors import InvalidInput
from trainer import metrics

# ---------------------------------------------------------------- naive references


def naive_ranking(q, gallery, metric, skip=None):
    """Gallery indices sorted by distance, ties by index, without item `skip`."""
    keyed = []
    for j, g in enumerate(gallery):
        if j == skip:
            continue
        if metric == "cosine":
            key = -float(np.dot(q, g) / (np.linalg.norm(q) * np.linalg.norm(g)))
        else:
            key = float(np.sum((q - g) ** 2))
        keyed.append((key, j))
    return [j for _, j in sorted(keyed)]


def naive_evaluate(x, labels, gallery=None, gallery_labels=None, ks=(1, 2, 4, 8, 16), metric="cosine"):
    loo = gallery is None
    if loo:
        gallery, gallery_labels = x, labels
    hits = {k: 0 for k in ks}
    ap_total, answerable = 0.0, 0
    for i in range(len(x)):
        ranking = naive_ranking(x[i], gallery, metric, skip=i if loo else None)
        rel = [gallery_labels[j] == labels[i] for j in ranking]
        r = sum(rel)
        if r == 0:
            continue
        answerable += 1
        for k in ks:
            hits[k] += any(rel[:k])
        precision_sum, found = 0.0, 0
        for pos in range(r):
            if rel[pos]:
                found += 1
                precision_sum += found / (pos + 1)
        ap_total += precision_sum / r
    out = {f"recall@{k}": hits[k] / answerable if answerable else 0.0 for k in ks}
    out["map@r"] = ap_total / answerable if answerable else 0.0
    return out


def naive_nmi(a, b):
    n = len(a)
    mutual = 0.0
    for u in set(a):
        for v in set(b):
            both = sum(1 for i in range(n) if a[i] == u and b[i] == v)
            if both:
                pu = sum(1 for i in range(n) if a[i] == u) / n
                pv = sum(1 for i in range(n) if b[i] == v) / n
                mutual += both / n * math.log(both / n / (pu * pv))

    def entropy(z):
        return -sum(z.count(v) / n * math.log(z.count(v) / n) for v in set(z))

    ha, hb = entropy(list(a)), entropy(list(b))
    return 1.0 if ha + hb == 0 else 2 * mutual / (ha + hb)


def _clustered(rng, n_classes, per_class, dim=8, noise=0.8):
    centers = rng.normal(size=(n_classes, dim)) * 2
    labels = np.repeat(np.arange(n_classes), per_class)
    x = centers[labels] + noise * rng.normal(size=(len(labels), dim))
    perm = rng.permutation(len(labels))
    return x[perm].astype(np.float32), labels[perm]


# ---------------------------------------------------------------- AP@R of the original


def test_average_precision_at_k_hand_worked():
    # Hits at ranks 1 and 3: (1/1 + 2/3) / 2.
    assert metrics.average_precision_at_k([True, False, True]) == pytest.approx((1 + 2 / 3) / 2)
    # Only the last of four: (1/4) / 1.
    assert metrics.average_precision_at_k([False, False, False, True]) == pytest.approx(0.25)
    assert metrics.average_precision_at_k([True, True]) == 1.0
    assert metrics.average_precision_at_k([False, False]) == 0.0
    assert metrics.average_precision_at_k([]) == 0.0


def test_original_map_matches_manual_loop():
    rng = np.random.default_rng(0)
    gallery, g_labels = _clustered(rng, 4, 10)
    queries, q_labels = _clustered(rng, 4, 5)
    value = metrics.original_map(queries, q_labels, gallery, g_labels, trials=25, r=6, seed=11)
    picks = np.random.default_rng(11).integers(0, len(queries), size=25)
    expected = np.mean(
        [
            metrics.average_precision_at_k(
                [g_labels[j] == q_labels[p] for j in naive_ranking(queries[p], gallery, "euclidean")[:6]]
            )
            for p in picks
        ]
    )
    assert value == pytest.approx(expected)
    # Seeded: the same queries every time, different ones with another seed.
    assert metrics.original_map(queries, q_labels, gallery, g_labels, trials=25, r=6, seed=11) == value


# ---------------------------------------------------------------- evaluate


def test_evaluate_hand_worked_leave_one_out():
    # 1-d points; cosine would collapse them, so euclidean.
    x = np.array([[0.0], [1.0], [10.0], [12.0], [1.5]])
    labels = np.array([0, 0, 1, 1, 1])
    result = metrics.evaluate(x, labels, ks=(1, 2), metric="euclidean", nmi=False)
    # Nearest others: 0->1 (hit), 1->4 (miss), 2->3 (hit), 3->2 (hit), 4->1 (miss).
    assert result["recall@1"] == pytest.approx(3 / 5)
    # recall@2: 0->[1,4] hit, 1->[4,0] hit, 2->[3,4] hit, 3->[2,4] hit, 4->[1,0] miss.
    assert result["recall@2"] == pytest.approx(4 / 5)
    # mAP@R: R=1 for class 0 -> 1, 0; class 1 R=2: 2->[3,4] 1, 3->[2,4] 1, 4->[1,0] 0.
    assert result["map@r"] == pytest.approx(3 / 5)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_evaluate_agrees_with_naive_loops(metric, seed):
    rng = np.random.default_rng(seed)
    x, labels = _clustered(rng, 5, 7, noise=2.0)
    expected = naive_evaluate(x, labels, metric=metric)
    got = metrics.evaluate(x, labels, metric=metric, nmi=False)
    assert got == pytest.approx(expected)

    gallery, g_labels = _clustered(rng, 5, 9, noise=2.0)
    expected = naive_evaluate(x, labels, gallery, g_labels, metric=metric)
    got = metrics.evaluate(
        x, labels, gallery_embeddings=gallery, gallery_labels=g_labels, metric=metric, nmi=False
    )
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_chunked_equals_unchunked(metric):
    x, labels = _clustered(np.random.default_rng(2), 6, 20, noise=2.5)
    whole = metrics.evaluate(x, labels, metric=metric, nmi=True)
    # 7 cells per block forces one query row per block.
    chunked = metrics.evaluate(x, labels, metric=metric, nmi=True, block_cells=7)
    assert chunked == pytest.approx(whole, rel=1e-12)


def test_ties_are_broken_by_gallery_position():
    # Every gallery item is at the same distance from the query: the ranking is the gallery order.
    gallery = np.array([[1.0, 0], [0, 1.0], [-1.0, 0], [0, -1.0]])
    g_labels = np.array([5, 7, 7, 5])
    top = metrics.top_k_indices(np.zeros((1, 4)), 3)
    assert top.tolist() == [[0, 1, 2]]
    result = metrics.evaluate(
        np.array([[0.0, 0.0]]),
        np.array([7]),
        gallery_embeddings=gallery,
        gallery_labels=g_labels,
        ks=(1, 2),
        metric="euclidean",
        nmi=False,
    )
    # Ranking 0 (5), 1 (7), 2 (7), 3 (5); R = 2 -> P@2 = 1/2 at rank 2 -> 0.25.
    assert result == {"recall@1": 0.0, "recall@2": 1.0, "map@r": pytest.approx(0.25)}


def test_top_k_indices_exact_with_ties_across_the_boundary():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(50, 30)).astype(np.float64)  # many ties
    for k in (1, 5, 13, 30, 40):
        got = metrics.top_k_indices(scores, k)
        expected = np.array([sorted(range(30), key=lambda j, row=row: (-row[j], j))[:k] for row in scores])
        np.testing.assert_array_equal(got, expected)


def test_queries_without_relevant_items_are_left_out():
    x = np.array([[0.0], [1.0], [5.0]])
    labels = np.array([0, 0, 9])  # class 9 has no other member
    result = metrics.evaluate(x, labels, ks=(1,), metric="euclidean", nmi=False)
    assert result == {"recall@1": 1.0, "map@r": 1.0}
    none = metrics.evaluate(x, np.array([1, 2, 3]), ks=(1,), metric="euclidean", nmi=False)
    assert none == {"recall@1": 0.0, "map@r": 0.0}


def test_k_larger_than_gallery():
    x = np.array([[0.0], [1.0], [3.0]])
    result = metrics.evaluate(x, np.array([0, 1, 0]), ks=(1, 16), metric="euclidean", nmi=False)
    assert result["recall@16"] == pytest.approx(2 / 2)  # the class-1 query has no match: left out


def test_perfect_clusters_score_one():
    x, labels = _clustered(np.random.default_rng(4), 4, 10, noise=0.01)
    result = metrics.evaluate(x, labels)
    assert set(result) == {"recall@1", "recall@2", "recall@4", "recall@8", "recall@16", "map@r", "nmi"}
    assert all(v == pytest.approx(1.0) for v in result.values())


def test_nmi_against_naive_formula():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 4, size=60)
    b = rng.integers(0, 3, size=60)
    assert metrics.normalized_mutual_information(a, b) == pytest.approx(naive_nmi(list(a), list(b)))
    assert metrics.normalized_mutual_information(a, a + 10) == pytest.approx(1.0)
    assert metrics.normalized_mutual_information([1, 1, 1], [0, 0, 0]) == 1.0


def test_kmeans_is_seeded_and_finds_separated_clusters():
    x, labels = _clustered(np.random.default_rng(6), 3, 15, noise=0.05)
    first = metrics.kmeans(x, 3, seed=1)
    np.testing.assert_array_equal(first, metrics.kmeans(x, 3, seed=1))
    assert metrics.normalized_mutual_information(labels, first) == pytest.approx(1.0)


def test_bounded_memory_on_a_large_set():
    # 8,000 x 8,000 scores would be 512 MB in float64; the blocks keep it to a few MB.
    rng = np.random.default_rng(7)
    x = rng.normal(size=(8_000, 16)).astype(np.float32)
    labels = rng.integers(0, 50, size=8_000)
    import tracemalloc

    tracemalloc.start()
    result = metrics.evaluate(x, labels, ks=(1,), nmi=False, block_cells=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100 * 2**20
    assert 0.0 <= result["recall@1"] <= 1.0


def test_input_checks():
    x = np.zeros((3, 2))
    with pytest.raises(InvalidInput, match="entries"):
        metrics.evaluate(x, [0, 1])
    with pytest.raises(InvalidInput, match="metric"):
        metrics.evaluate(x, [0, 1, 1], metric="manhattan")
    with pytest.raises(InvalidInput, match="dimension"):
        metrics.evaluate(x, [0, 1, 1], gallery_embeddings=np.zeros((2, 3)), gallery_labels=[0, 1])
    with pytest.raises(InvalidInput, match="go together"):
        metrics.evaluate(x, [0, 1, 1], gallery_embeddings=x)
    with pytest.raises(InvalidInput, match="NaN"):
        metrics.evaluate(np.full((3, 2), np.nan), [0, 1, 1])
    with pytest.raises(InvalidInput, match="ks"):
        metrics.evaluate(x, [0, 1, 1], ks=(0,))
    with pytest.raises(InvalidInput, match="trials"):
        metrics.original_map(x, [0, 1, 1], x, [0, 1, 1], trials=0, r=3, seed=0)


# ---------------------------------------------------------------- score spread


def naive_top_hit_scores(x, labels, k):
    """Cosines of every query's k best hits (leave-one-out), split by class: a plain loop."""
    same, different = [], []
    for i in range(len(x)):
        for j in naive_ranking(x[i], x, "cosine", skip=i)[:k]:
            score = float(np.dot(x[i], x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j])))
            (same if labels[j] == labels[i] else different).append(score)
    return same, different


def test_score_spread_of_top_hits_matches_a_plain_loop():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 4, size=40)
    x = rng.normal(size=(40, 6)) + 1.5 * np.eye(6)[labels]
    spread = metrics.score_spread(x, labels, top_k=5, pairs=500)
    same, different = naive_top_hit_scores(x, labels, 5)
    assert spread["top_k"] == 5
    assert spread["top_hits"]["same"]["count"] == len(same) and spread["top_hits"]["different"][
        "count"
    ] == len(different)
    assert spread["top_hits"]["same"]["mean"] == pytest.approx(np.mean(same))
    assert spread["top_hits"]["different"]["std"] == pytest.approx(np.std(different))
    assert spread["top_hits"]["same"]["p95"] == pytest.approx(np.percentile(same, 95))
    assert spread["random_pairs"]["same"]["count"] == spread["random_pairs"]["different"]["count"] == 500


def test_random_pairs_are_of_the_right_classes_and_never_an_item_with_itself():
    # One-hot class directions: same-class pairs score exactly 1 and different-class ones exactly 0.
    labels = np.array([0, 0, 0, 1, 1, 2, 3])
    x = np.eye(4)[labels]
    same, different = metrics.random_pair_scores(x, labels, x, labels, pairs=300, seed=2, exclude_self=True)
    assert np.all(same == 1.0) and np.all(different == 0.0) and len(different) == 300
    # Class 3 has one member: with itself excluded it has no same-class pair, so fewer than 300.
    assert 200 < len(same) < 300
    # Distinct vectors within a class: a self-pair would score 1, and there is none.
    rng = np.random.default_rng(3)
    y = rng.normal(size=(7, 5))
    same, _ = metrics.random_pair_scores(y, labels, y, labels, pairs=300, seed=2, exclude_self=True)
    assert np.all(same < 1.0 - 1e-9)
    # Against a gallery: queries of a class the gallery lacks give different-class pairs only.
    q_labels = np.array([5, 5, 0])
    same, different = metrics.random_pair_scores(np.eye(4)[[0, 1, 0]], q_labels, x, labels, pairs=300, seed=2)
    assert len(different) == 300 and 0 < len(same) < 300 and np.all(same == 1.0)


def test_a_collapsed_embedding_is_reported():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(5), 8)
    collapsed = np.ones((40, 16)) + 1e-3 * rng.normal(size=(40, 16))
    spread = metrics.score_spread(collapsed, labels)
    assert spread["collapsed"] and spread["random_pairs"]["different"]["mean"] > 0.999
    assert "collapsed" in metrics.collapse_warning(spread)
    healthy = metrics.score_spread(np.eye(5)[labels] + 0.1 * rng.normal(size=(40, 5)), labels)
    assert not healthy["collapsed"] and metrics.collapse_warning(healthy) is None
    assert healthy["random_pairs"]["different"]["mean"] < 0.5 < healthy["random_pairs"]["same"]["mean"]
