"""HnswGraph (slots, deletes, resize, snapshots) and ExactIndex against a plain-loop reference."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cbir.metric import Metric
from indexer.graph import ExactIndex, GraphParams, HnswGraph, RWLock, SnapshotError


def _loop_distance(metric: Metric, a: np.ndarray, b: np.ndarray) -> float:
    if metric is Metric.COSINE:
        return 1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
    if metric is Metric.L2:
        return float(((a - b) ** 2).sum())
    return 1.0 - float(a @ b)


@pytest.mark.parametrize("metric", list(Metric))
def test_exact_index_matches_a_plain_loop(metric):
    rng = np.random.default_rng(metric)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    q = rng.normal(size=(4, 6)).astype(np.float32)
    ids = [f"i{j}" for j in range(50)]
    got_ids, got_d = ExactIndex(metric, ids, x).search(q, 5)
    for qi in range(4):
        ref = sorted((_loop_distance(metric, q[qi], x[j]), ids[j]) for j in range(50))[:5]
        assert got_ids[qi] == [i for _, i in ref]
        np.testing.assert_allclose(got_d[qi], [d for d, _ in ref], rtol=1e-4, atol=1e-4)


def test_exact_index_returns_fewer_when_fewer_items():
    ids, d = ExactIndex(1, ["a", "b"], np.eye(2, dtype=np.float32)).search(np.ones((1, 2), np.float32), 10)
    assert sorted(ids[0]) == ["a", "b"] and d.shape == (1, 2)


def _graph(dim=4, capacity=16) -> HnswGraph:
    return HnswGraph(
        GraphParams(metric=Metric.L2, dimension=dim, m=8, ef_construction=50, ef_search=50), capacity=capacity
    )


def test_updates_in_place_reuses_deleted_slots_and_grows():
    g = _graph(capacity=16)
    x = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    g.put([f"i{j}" for j in range(40)], x)  # more than the initial capacity: resized
    assert len(g) == 40 and g.capacity >= 40
    g.put(["i0"], np.full((1, 4), 1000.0, np.float32))  # update in place: same slot count
    assert g.index.element_count == 40
    np.testing.assert_allclose(g.vectors_of(["i0"])[0], [1000.0] * 4)
    g.remove(["i1", "i2"])
    assert g.deleted_slots == 2 and len(g) == 38
    g.put(["new1", "new2"], np.zeros((2, 4), np.float32))  # take over the two deleted slots
    assert g.index.element_count == 40 and g.deleted_slots == 0
    labels, _ = g.search(np.zeros((1, 4), np.float32), 2)
    assert {g.id_at(int(label)) for label in labels[0]} == {"new1", "new2"}
    assert "i1" not in g.label_of and "i2" not in g.label_of


def test_snapshot_round_trip_and_corruption_is_detected(tmp_path):
    g = _graph()
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    g.put([f"i{j}" for j in range(30)], x)
    g.remove(["i3"])
    g.applied_seq = 77
    g.save(tmp_path)
    loaded = HnswGraph.load(tmp_path, g.params)
    assert loaded.applied_seq == 77 and loaded.label_of == g.label_of and loaded.next_label == g.next_label
    q = x[:5]
    np.testing.assert_array_equal(loaded.search(q, 3)[0], g.search(q, 3)[0])
    with pytest.raises(SnapshotError):
        HnswGraph.load(tmp_path, GraphParams(2, 4, 16, 50, 50))  # other parameters
    data = bytearray((tmp_path / "hnsw.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "hnsw.bin").write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="checksum"):
        HnswGraph.load(tmp_path, g.params)
    (tmp_path / "snapshot.json").unlink()
    with pytest.raises(SnapshotError):
        HnswGraph.load(tmp_path, g.params)


def test_rwlock_readers_share_and_writer_excludes():
    lock = RWLock()
    inside = []
    both_readers = threading.Barrier(2, timeout=5)

    def reader():
        with lock.read():
            both_readers.wait()  # deadlocks (BrokenBarrierError) unless readers overlap
            inside.append("r")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inside == ["r", "r"]
    with lock.write():
        got = []
        t = threading.Thread(target=lambda: got.append(lock.read().__enter__()))
        t.start()
        t.join(0.2)
        assert not got  # a reader waits while the writer holds the lock
    t.join(2)
    assert len(got) == 1
