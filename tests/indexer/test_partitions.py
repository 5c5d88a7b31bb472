"""PartitionIndex (IVF-flat) against ExactIndex: writes, training, filters, snapshots, concurrency."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from cbir.metric import Metric
from indexer import partitions
from indexer.graph import ExactIndex, SnapshotError
from indexer.partitions import PartitionIndex, PartitionParams, kmeans


def _clustered(rng: np.random.Generator, n: int, dim: int, centres: int = 40) -> np.ndarray:
    c = rng.normal(size=(centres, dim)) * 3
    return (c[rng.integers(0, centres, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def _embedding_like(rng: np.random.Generator, n: int, dim: int, centres: int = 40) -> np.ndarray:
    """Clusters of low intrinsic dimension (4) plus a little noise, as embeddings of a class are."""
    c = rng.normal(size=(centres, dim)) * 2
    bases = rng.normal(size=(centres, 4, dim)) / 2
    which = rng.integers(0, centres, n)
    z = rng.normal(size=(n, 4))
    noise = 0.1 * rng.normal(size=(n, dim))
    return (c[which] + np.einsum("ni,nid->nd", z, bases[which]) + noise).astype(np.float32)


def _ids(n: int, prefix: str = "i") -> list[str]:
    return [f"{prefix}{j}" for j in range(n)]


def _recall(index: PartitionIndex, exact: ExactIndex, q: np.ndarray, k: int, width: int = 0) -> float:
    labels, _ = index.search(q, k, width=width)
    truth, _ = exact.search(q, k)
    found = [{index.id_at(int(label)) for label in row} for row in labels]
    return float(np.mean([len(f & set(t)) / k for f, t in zip(found, truth, strict=True)]))


@pytest.fixture
def small_train(monkeypatch):
    """Training from 256 vectors, so the tests stay small."""
    monkeypatch.setattr(partitions, "TRAIN_MIN", 256)


@pytest.mark.parametrize("metric", list(Metric))
def test_untrained_index_is_exact_with_exact_index_distances(metric):
    rng = np.random.default_rng(int(metric))
    x = rng.normal(size=(100, 8)).astype(np.float32)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    index = PartitionIndex(PartitionParams(int(metric), 8))
    index.put(_ids(100), x)
    assert index.lists == 1 and not index.needs_training
    labels, dists = index.search(q, 7)
    want_ids, want_d = ExactIndex(metric, _ids(100), x).search(q, 7)
    assert [[index.id_at(int(label)) for label in row] for row in labels] == want_ids
    np.testing.assert_allclose(dists, want_d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", list(Metric))
def test_trained_index_with_every_list_probed_equals_exact(metric, small_train):
    rng = np.random.default_rng(10 + int(metric))
    x = _clustered(rng, 2000, 16)
    q = _clustered(rng, 20, 16)
    index = PartitionIndex(PartitionParams(int(metric), 16, lists=32))
    index.put(_ids(2000), x)
    assert index.needs_training and index.retrain()
    assert index.lists == 32 and index.trained_at == 2000 and not index.needs_training
    labels, dists = index.search(q, 10, width=32)
    want_ids, want_d = ExactIndex(metric, _ids(2000), x).search(q, 10)
    assert [[index.id_at(int(label)) for label in row] for row in labels] == want_ids
    np.testing.assert_allclose(dists, want_d, rtol=1e-4, atol=1e-4)


def test_recall_on_clustered_data_with_default_probes(small_train):
    rng = np.random.default_rng(3)
    x = _embedding_like(rng, 20_000, 32)
    q = _embedding_like(np.random.default_rng(30), 50, 32)  # other clusters: the hard case
    index = PartitionIndex(PartitionParams(int(Metric.COSINE), 32))
    index.put(_ids(20_000), x)
    index.retrain()
    assert index.lists == partitions.auto_lists(20_000)
    exact = ExactIndex(Metric.COSINE, _ids(20_000), x)
    assert _recall(index, exact, q, 10) >= 0.95
    assert _recall(index, exact, q, 10, width=1) < _recall(index, exact, q, 10, width=64)


def test_updates_move_between_lists_and_removes_swap(small_train):
    rng = np.random.default_rng(4)
    x = _clustered(rng, 1000, 8)
    index = PartitionIndex(PartitionParams(int(Metric.L2), 8, lists=16, probes=16))
    index.put(_ids(1000), x)
    index.retrain()
    far = x[500] * 0 + 50.0  # far from every cluster: lands in another list
    index.put(["i0"], far[None, :])
    np.testing.assert_allclose(index.vectors_of(["i0"])[0], far)
    index.remove(["i1", "i2", "missing"])
    assert len(index) == 999 - 1 and index.deleted_slots == 0
    index.put(["new"], x[1:2])  # takes a freed label
    assert index.next_label == 1000
    live = [i for i in _ids(1000) if i not in ("i1", "i2")] + ["new"]
    exact = ExactIndex(Metric.L2, live, index.vectors_of(live))
    labels, dists = index.search(x[:5], 10)
    want_ids, want_d = exact.search(x[:5], 10)
    assert [[index.id_at(int(label)) for label in row] for row in labels] == want_ids
    np.testing.assert_allclose(dists, want_d, rtol=1e-4, atol=1e-3)
    # Every label is where the lists say it is.
    for item_id, label in index.label_of.items():
        lst, pos = index._list_of[label], index._pos_of[label]
        assert index._block_labels[lst][pos] == label and pos < index._sizes[lst], item_id


def test_filters_widen_then_raise_when_fewer_than_k_pass(small_train):
    rng = np.random.default_rng(5)
    x = _clustered(rng, 2000, 8)
    index = PartitionIndex(PartitionParams(int(Metric.L2), 8, lists=32, probes=1))
    index.put(_ids(2000), x)
    index.retrain()
    wanted = {index.label_of[f"i{j}"] for j in range(0, 2000, 97)}  # spread over the lists
    labels, _ = index.search(x[:1], 10, accept=lambda label: label in wanted)
    assert set(labels[0].tolist()) <= wanted and len(labels[0]) == 10
    exact = ExactIndex(Metric.L2, [index.id_at(lab) for lab in wanted], x[[lab for lab in wanted]])
    # Approximate, as a filtered HNSW search is: most of the filtered exact answer, the nearest first.
    found = [index.id_at(int(label)) for label in labels[0]]
    want = exact.search(x[:1], 10)[0][0]
    assert found[0] == want[0] and len(set(found) & set(want)) >= 7
    with pytest.raises(RuntimeError):
        index.search(x[:1], 10, accept=lambda label: label < 3)


def test_snapshot_round_trip_and_corruption(tmp_path, small_train):
    rng = np.random.default_rng(6)
    x = _clustered(rng, 1500, 8)
    index = PartitionIndex(PartitionParams(int(Metric.COSINE), 8))
    index.put(_ids(1500), x)
    index.retrain()
    index.remove(["i3"])
    index.applied_seq = 42
    assert index.save(tmp_path) == 42
    loaded = PartitionIndex.load(tmp_path, index.params)
    assert len(loaded) == len(index) and loaded.lists == index.lists and loaded.applied_seq == 42
    assert not loaded.needs_training
    q = x[:10]
    for a, b in zip(index.search(q, 5), loaded.search(q, 5), strict=True):
        np.testing.assert_array_equal(a, b)
    loaded.put(["another"], x[:1])  # the freed label is reused after a load too
    assert loaded.next_label == index.next_label
    assert PartitionIndex.advance_snapshot(tmp_path, 50) == 50
    assert PartitionIndex.load(tmp_path, index.params).applied_seq == 50
    with pytest.raises(SnapshotError):
        PartitionIndex.load(tmp_path, PartitionParams(int(Metric.COSINE), 8, lists=7))
    data = tmp_path / "partitions.npz"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(SnapshotError, match="checksum"):
        PartitionIndex.load(tmp_path, index.params)
    (tmp_path / "partitions.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(SnapshotError):
        PartitionIndex.load(tmp_path, index.params)


def test_retrain_at_growth_keeps_results_right(small_train):
    rng = np.random.default_rng(7)
    x = _clustered(rng, 1200, 8)
    index = PartitionIndex(PartitionParams(int(Metric.L2), 8))
    index.put(_ids(300), x[:300])
    index.retrain()
    first = index.lists
    index.put(_ids(1200)[300:], x[300:])
    assert index.needs_training  # 4x the size it was trained at
    index.retrain()
    assert index.trained_at == 1200 and index.lists > first
    exact = ExactIndex(Metric.L2, _ids(1200), x)
    assert _recall(index, exact, x[:20], 10, width=index.lists) == 1.0


def test_writes_during_training_are_reassigned(small_train, monkeypatch):
    """A write between the copy and the install (here: inside k-means) is not lost or duplicated."""
    rng = np.random.default_rng(8)
    x = _clustered(rng, 1000, 8)
    index = PartitionIndex(PartitionParams(int(Metric.L2), 8, lists=16))
    index.put(_ids(1000), x)
    real_kmeans = partitions.kmeans

    def kmeans_while_writing(vectors, k, seed):
        with index.lock.write():
            index.remove(["i0", "i1"])
            index.put(["i2", "late"], np.full((2, 8), 9.0, np.float32))
        return real_kmeans(vectors, k, seed)

    monkeypatch.setattr(partitions, "kmeans", kmeans_while_writing)
    index.retrain()
    assert len(index) == 999 and sum(index._sizes) == 999
    np.testing.assert_allclose(index.vectors_of(["i2", "late"]), np.full((2, 8), 9.0))
    labels, _ = index.search(np.full((1, 8), 9.0, np.float32), 2, width=16)
    assert {index.id_at(int(label)) for label in labels[0]} == {"i2", "late"}


def test_kmeans_is_seeded_and_deterministic():
    x = _clustered(np.random.default_rng(9), 500, 4, centres=5)
    np.testing.assert_array_equal(kmeans(x, 5, 0), kmeans(x, 5, 0))


def test_searches_during_writes_under_the_lock(small_train):
    rng = np.random.default_rng(11)
    x = _clustered(rng, 3000, 8)
    index = PartitionIndex(PartitionParams(int(Metric.L2), 8, lists=16, probes=16))
    index.put(_ids(1000), x[:1000])
    index.retrain()
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                with index.lock.read():
                    labels, dists = index.search(x[:3], 5)
                    assert all(index.id_at(int(label)) is not None for label in labels.ravel())
                    assert np.all(np.diff(dists, axis=1) >= 0)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for start in range(1000, 3000, 100):
        with index.lock.write():
            index.put(_ids(3000)[start : start + 100], x[start : start + 100])
            index.remove([f"i{start - 1000}"])
    index.retrain()  # takes the locks itself, with readers running
    done.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(index) == 3000 - 20
