"""System-vs-offline evaluation: identical rankings agree exactly; approximations stay within the bound."""

from __future__ import annotations

import numpy as np
import pytest

from quickstart import evaluation as ev
from trainer import metrics as tm


def clustered(n, classes, dim, seed, spread=0.9):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = np.arange(n) % classes
    x = centres[labels] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.array(
        [f"c{c}" for c in labels]
    )


@pytest.fixture
def space():
    gallery, g_labels = clustered(120, 4, 8, 0)
    queries, q_labels = clustered(40, 4, 8, 1)
    ids = [f"item-{i}" for i in range(len(gallery))]
    return queries, q_labels, ids, gallery, g_labels


def exact_hits(queries, gallery, ids, g_labels, depth):
    scores = queries @ gallery.T
    top = tm.top_k_indices(scores, depth)
    return [
        ev.RankedHits([ids[j] for j in row], g_labels[row].tolist(), scores[i, row].tolist())
        for i, row in enumerate(top)
    ]


def test_search_depth_covers_the_largest_class():
    assert ev.search_depth(["a"] * 40 + ["b"] * 3) == 40
    assert ev.search_depth(["a", "b"]) == 16


def test_exact_hits_agree_exactly_with_trainer_metrics(space):
    queries, q_labels, ids, gallery, g_labels = space
    hits = exact_hits(queries, gallery, ids, g_labels, ev.search_depth(g_labels))
    result = ev.compare(hits, queries, q_labels, ids, gallery, g_labels, trials=50, seed=3)
    assert result["agree"] and result["scores_agree"] and result["neighbour_recall"] == 1.0
    for row in result["rows"]:
        assert row["difference"] < 1e-9 and row["queries_differing_from_exact"] == 0.0
    # An independent value: plain-loop Recall@1.
    top1 = np.argmax(queries @ gallery.T, axis=1)
    assert result["system"]["recall@1"] == pytest.approx(np.mean(g_labels[top1] == q_labels))
    assert 0 < result["system"]["map@r"] < 1


def test_a_swapped_pair_of_hits_is_explained_by_the_bound(space):
    queries, q_labels, ids, gallery, g_labels = space
    hits = exact_hits(queries, gallery, ids, g_labels, ev.search_depth(g_labels))
    # What an approximate search does: it misses the best hit of query 0 (the next one moves up).
    h = hits[0]
    hits[0] = ev.RankedHits(h.ids[1:], h.labels[1:], h.scores[1:])
    result = ev.compare(hits, queries, q_labels, ids, gallery, g_labels, trials=50, seed=3)
    assert result["scores_agree"] and result["neighbour_recall"] < 1.0
    for row in result["rows"]:
        assert row["difference"] <= row["tolerance"]
    assert result["agree"]


def test_different_vectors_are_caught_by_the_scores(space):
    queries, q_labels, ids, gallery, g_labels = space
    hits = exact_hits(queries, gallery, ids, g_labels, ev.search_depth(g_labels))
    other_queries, _ = clustered(40, 4, 8, 7)
    result = ev.compare(hits, other_queries, q_labels, ids, gallery, g_labels, trials=50, seed=3)
    assert not result["scores_agree"] and not result["agree"]


def test_an_index_that_misses_too_many_neighbours_is_caught(space):
    queries, q_labels, ids, gallery, g_labels = space
    depth = ev.search_depth(g_labels)
    hits = exact_hits(queries, gallery, ids, g_labels, 3 * depth)
    # Every other true neighbour dropped: scores and labels are right, but it is not a good ANN.
    hits = [ev.RankedHits(h.ids[::2][:depth], h.labels[::2][:depth], h.scores[::2][:depth]) for h in hits]
    result = ev.compare(hits, queries, q_labels, ids, gallery, g_labels, trials=50, seed=3)
    assert result["scores_agree"] and result["hits_with_wrong_label"] == 0
    assert result["neighbour_recall"] < ev.MIN_NEIGHBOUR_RECALL and not result["agree"]


def test_wrong_metric_is_caught(space):
    queries, q_labels, ids, gallery, g_labels = space
    hits = exact_hits(queries, gallery, ids, g_labels, ev.search_depth(g_labels))
    # Labels shuffled in the hits (a system returning the wrong items) beyond the absolute tolerance.
    rng = np.random.default_rng(0)
    hits = [ev.RankedHits(h.ids, list(rng.permutation(h.labels)), h.scores) for h in hits]
    result = ev.compare(hits, queries, q_labels, ids, gallery, g_labels, trials=50, seed=3)
    assert result["hits_with_wrong_label"] > 0 and not result["agree"]


def test_map_at_10_is_the_mean_of_the_original_ap_over_every_query(space):
    queries, q_labels, ids, gallery, g_labels = space
    hits = exact_hits(queries, gallery, ids, g_labels, ev.search_depth(g_labels))
    result = ev.compare(hits, queries, q_labels, ids, gallery, g_labels, trials=50, seed=3)
    expected = np.mean(
        [
            tm.average_precision_at_k(np.asarray(h.labels[:10]) == label)
            for h, label in zip(hits, q_labels, strict=True)
        ]
    )
    assert result["system"]["map@10"] == pytest.approx(expected)
    assert result["offline"]["map@10"] == pytest.approx(expected)
    assert {"recall@5", "recall@10"} <= set(result["system"])


def test_class_breakdown_counts_rank_one_answers():
    hits = [
        ev.RankedHits(["a"], ["cat"], [0.9]),
        ev.RankedHits(["b"], ["dog"], [0.8]),
        ev.RankedHits(["c"], ["dog"], [0.7]),
        ev.RankedHits(["d"], ["cat"], [0.6]),
        ev.RankedHits(["e"], ["cat"], [0.5]),
    ]
    result = ev.class_breakdown(hits, ["cat", "cat", "cat", "dog", "bird"])
    assert result["per_class_recall@1"] == {"bird": 0.0, "cat": pytest.approx(1 / 3), "dog": 0.0}
    assert result["confused_pairs"][0] == {
        "query_class": "cat",
        "answered_class": "dog",
        "count": 2,
        "share_of_class": pytest.approx(2 / 3),
    }
    assert {(p["query_class"], p["answered_class"]) for p in result["confused_pairs"]} == {
        ("cat", "dog"),
        ("dog", "cat"),
        ("bird", "cat"),
    }


def test_quality_figures_take_the_spread_from_the_systems_scores(space):
    queries, q_labels, ids, gallery, g_labels = space
    hits = exact_hits(queries, gallery, ids, g_labels, ev.search_depth(g_labels))
    figures = ev.quality_figures(hits, q_labels, queries, gallery, g_labels, seed=0)
    offline = tm.score_spread(
        queries, q_labels, gallery_embeddings=gallery, gallery_labels=g_labels, top_k=10
    )
    # The same top-10 hits, so the same top-hit scores; random pairs are drawn from the same vectors.
    for which in ("same", "different"):
        assert figures["spread"]["top_hits"][which]["mean"] == pytest.approx(
            offline["top_hits"][which]["mean"], abs=1e-6
        )
        assert figures["spread"]["top_hits"][which]["count"] == offline["top_hits"][which]["count"]
    assert figures["spread"]["random_pairs"] == offline["random_pairs"]
    assert not figures["spread"]["collapsed"] and figures["collapse_warning"] is None
    assert set(figures) >= {
        "recall@1",
        "recall@5",
        "recall@10",
        "map@10",
        "per_class_recall@1",
        "confused_pairs",
    }


def test_a_collapsed_embedding_ranked_in_float32_is_within_the_bound():
    # A barely trained model: every vector close to one direction, cosines tied to the last float32
    # decimals. An index ranks in float32; the offline figures rank in float64. Near-ties that order
    # differently must count towards the tolerance, not show up as an unexplained difference.
    rng = np.random.default_rng(5)
    base = rng.normal(size=16)
    gallery = (base + 2e-4 * rng.normal(size=(400, 16))).astype(np.float32)
    queries = (base + 2e-4 * rng.normal(size=(60, 16))).astype(np.float32)
    g_labels = np.array([f"c{c}" for c in np.arange(400) % 5])
    q_labels = np.array([f"c{c}" for c in np.arange(60) % 5])
    ids = [f"item-{i}" for i in range(len(gallery))]
    unit_g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    unit_q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    float32_order = tm.top_k_indices(unit_q @ unit_g.T, ev.search_depth(g_labels))
    float64_order = tm.top_k_indices(
        unit_q.astype(np.float64) @ unit_g.astype(np.float64).T, ev.search_depth(g_labels)
    )
    assert (float32_order != float64_order).any()  # the case this test is about
    hits = [
        ev.RankedHits([ids[j] for j in row], g_labels[row].tolist(), (unit_q[i] @ unit_g[row].T).tolist())
        for i, row in enumerate(float32_order)
    ]
    result = ev.compare(hits, queries, q_labels, ids, gallery, g_labels, trials=50, seed=3)
    for row in result["rows"]:
        assert row["difference"] <= row["tolerance"], row
