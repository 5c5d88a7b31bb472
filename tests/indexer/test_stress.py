"""One real indexer under writers, readers, sub-second snapshots and a compaction, then kill -9.

Writers upsert new items, re-upsert some of their own with another vector and label, delete others, and
once delete a large share of the catalogue (which makes the graph compact in the background) while
snapshots run every 0.2 s. Readers send filtered and unfiltered Knn all along. Nothing here depends on
how fast the machine is: every check holds for whatever amount of work got done.

Checks: every write is answered OK; no hit names an item whose delete was acknowledged before the query
was sent, lacks its metadata, or violates the query's filter; afterwards, and again after kill -9 and a
restart, the store, the catalogue and the graph hold exactly the acknowledged items, every one of them
finds itself by exact search over the graph's vectors, and all but a rare unreachable node (at most 1 in
200) through the HNSW graph.
"""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

from cbir import errors
from cbir.processes import ServiceProcess, wait_for_health, wait_for_port_file
from cbir.v1 import indexer_pb2, types_pb2
from indexer.client import IndexerClient

pytestmark = pytest.mark.slow

DIM = 8
LABELS = ("a", "b", "c")
COLOURS = ("red", "blue")
LOAD_SECONDS = 8.0
BASE = 1600  # enough slots for a compaction (at least 1024)


def _start(data, tmp_path, tag: str) -> tuple[ServiceProcess, str]:
    port_file = tmp_path / f"{tag}.port"
    proc = ServiceProcess(
        [
            "-m", "indexer", "serve", "--data-dir", str(data), "--metrics-port", "-1",
            "--snapshot-interval", "0.2", "--log-format", "text", "--port", "0", "--port-file", str(port_file),
        ],
        tmp_path / f"{tag}.log",
    )  # fmt: skip
    target = f"127.0.0.1:{wait_for_port_file(port_file, proc, 60)}"
    wait_for_health(target, timeout=120, proc=proc)
    return proc, target


def _record(item_id: str, vector: np.ndarray, label: str, colour: str) -> indexer_pb2.Record:
    item = types_pb2.Item(id=item_id, uri=f"file:///{item_id}", label=label, attributes={"colour": colour})
    return indexer_pb2.Record(item=item, vector=vector)


class Model:
    """What the clients were told: live items (vector, label, colour) and acknowledged deletes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: dict[str, tuple[np.ndarray, str, str]] = {}
        self.deleted_at: dict[str, float] = {}  # id -> monotonic time its delete was acknowledged

    def upserted(self, records: list[indexer_pb2.Record]) -> None:
        with self.lock:
            for r in records:
                self.live[r.item.id] = (
                    np.asarray(r.vector, np.float32),
                    r.item.label,
                    r.item.attributes["colour"],
                )

    def deleted(self, ids: list[str]) -> None:
        now = time.monotonic()
        with self.lock:
            for i in ids:
                self.live.pop(i, None)
                self.deleted_at[i] = now


def _write(
    client: IndexerClient, model: Model, w: int, stop: threading.Event, wave: threading.Event, failures: list
):
    rng = np.random.default_rng(100 + w)
    mine: list[str] = [f"base-{j}" for j in range(w, BASE, 3)]
    n, waved = 0, False
    try:
        while not stop.is_set():
            fresh = [
                _record(
                    f"w{w}-{n + j}", rng.normal(size=DIM).astype(np.float32), LABELS[j % 3], COLOURS[j % 2]
                )
                for j in range(20)
            ]
            n += 20
            client.upsert(fresh, batch_size=7)  # several messages per stream
            model.upserted(fresh)
            mine += [r.item.id for r in fresh]
            # Re-upserts: another vector and another label for some live items of this writer.
            again = [mine[int(j)] for j in rng.choice(len(mine), 5, replace=False)]
            changed = [
                _record(
                    i,
                    rng.normal(size=DIM).astype(np.float32),
                    LABELS[int(rng.integers(3))],
                    COLOURS[int(rng.integers(2))],
                )
                for i in again
            ]
            client.upsert(changed)
            model.upserted(changed)
            share = 8
            if wave.is_set() and not waved:  # the delete wave: the graph then compacts
                share, waved = len(mine) * 2 // 5, True
            victims = [mine.pop(int(rng.integers(len(mine)))) for _ in range(min(share, len(mine) - 1))]
            client.delete(victims)
            model.deleted(victims)
    except errors.CbirError as exc:
        failures.append(f"writer {w}: {type(exc).__name__}: {exc.message}")


def _read(client: IndexerClient, model: Model, r: int, stop: threading.Event, violations: list, counts: list):
    rng = np.random.default_rng(200 + r)
    filters = [None, types_pb2.Filter(labels=["a"]), types_pb2.Filter(labels=["b", "c"]),
               types_pb2.Filter(attributes=[types_pb2.AttributeFilter(key="colour", values=["red"])])]  # fmt: skip
    while not stop.is_set():
        flt = filters[int(rng.integers(len(filters)))]
        sent = time.monotonic()
        try:
            answer = client.knn(rng.normal(size=(4, DIM)).astype(np.float32), 10, generation="g", filter=flt)
        except errors.CbirError as exc:
            violations.append(f"reader {r}: {type(exc).__name__}: {exc.message}")
            return
        counts.append(1)
        with model.lock:
            for hits in answer.results:
                for h in hits.hits:
                    gone = model.deleted_at.get(h.id)
                    if gone is not None and gone < sent and h.id not in model.live:
                        violations.append(f"hit {h.id} deleted {sent - gone:.3f}s before the query")
                    if not h.uri or h.label not in LABELS or h.attributes.get("colour") not in COLOURS:
                        violations.append(f"hit {h.id} without its metadata: {h}")
                    if flt is not None and flt.labels and h.label not in flt.labels:
                        violations.append(f"hit {h.id} label {h.label!r} violates {list(flt.labels)}")
                    if flt is not None and flt.attributes and h.attributes.get("colour") != "red":
                        violations.append(f"hit {h.id} colour {h.attributes.get('colour')!r} violates red")


def _check_agreement(target: str, model: Model) -> None:
    """Store (ListItems), catalogue (Stats) and graph (generation count, Knn) hold exactly the live items."""
    with IndexerClient([target], timeout=60) as client:
        stored = {r.item.id: r for r in client.list_items("g", include_vectors=True)}
        assert set(stored) == set(model.live)
        for item_id, (vector, label, colour) in model.live.items():
            record = stored[item_id]
            np.testing.assert_array_equal(np.asarray(record.vector, np.float32), vector)
            assert (record.item.label, record.item.attributes["colour"]) == (label, colour)
        stats = client.stats()[0]
        assert stats.item_count == len(model.live)
        assert client.get_generation("g").item_count == len(model.live)
        # Every live item finds itself, with its metadata, by exact search over the graph's own
        # vectors (a filter on one label matches fewer than --exact-threshold items): the graph holds
        # exactly the acknowledged vector and row of every item.
        for label in LABELS:
            ids = sorted(i for i, (_v, lab, _c) in model.live.items() if lab == label)
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                answer = client.knn(
                    np.stack([model.live[i][0] for i in part]), 3, generation="g",
                    filter=types_pb2.Filter(labels=[label]),
                )  # fmt: skip
                for item_id, hits in zip(part, answer.results, strict=True):
                    top = hits.hits[0]
                    assert top.id == item_id and top.distance < 1e-4, (item_id, hits.hits[:3])
                    assert (top.label, top.attributes["colour"]) == model.live[item_id][1:]
        # Through the HNSW graph itself: hnswlib's updates and slot reuse can leave a rare node that no
        # link leads to any more (seen: 1 of 2,905 items after this churn, while exact search finds
        # it), an approximate-search miss rather than lost data; at most 1 in 200 may miss.
        ids = sorted(model.live)
        misses = []
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            answer = client.knn(np.stack([model.live[i][0] for i in part]), 3, generation="g", ef=2000)
            for item_id, hits in zip(part, answer.results, strict=True):
                top = hits.hits[0]
                if not (top.id == item_id and top.distance < 1e-4):
                    misses.append(item_id)
            for hits in answer.results:
                assert all(h.id in model.live for h in hits.hits)
        assert len(misses) <= len(ids) // 200, (len(misses), len(ids), misses[:10])


def test_writers_readers_snapshots_and_compaction_then_kill_9(tmp_path):
    data = tmp_path / "data"
    model = Model()
    proc, target = _start(data, tmp_path, "first")
    failures: list[str] = []
    violations: list[str] = []
    counts: list[int] = []
    try:
        with IndexerClient([target], timeout=60) as client:
            client.create_generation(
                "g", types_pb2.EmbeddingSpace(model_name="m", model_version=1), types_pb2.METRIC_L2, DIM
            )
            client.activate_generation("g")
            rng = np.random.default_rng(0)
            base = [
                _record(f"base-{j}", rng.normal(size=DIM).astype(np.float32), LABELS[j % 3], COLOURS[j % 2])
                for j in range(BASE)
            ]
            client.upsert(base)
            model.upserted(base)
            stop, wave = threading.Event(), threading.Event()
            threads = [
                threading.Thread(target=_write, args=(client, model, w, stop, wave, failures))
                for w in range(3)
            ] + [
                threading.Thread(target=_read, args=(client, model, r, stop, violations, counts))
                for r in range(2)
            ]
            for t in threads:
                t.start()
            time.sleep(LOAD_SECONDS / 4)
            wave.set()
            time.sleep(LOAD_SECONDS * 3 / 4)
            stop.set()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads)
        assert not failures, failures[:5]
        assert not violations, violations[:10]
        assert counts, "no Knn answered"
        # The delete wave made the graph compact while writes and snapshots went on.
        deadline = time.monotonic() + 120
        while "graph compacted" not in proc.log_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "graph compacted" in proc.log_text()
        assert not re.search(r"Traceback|unhandled error|snapshot failed|compaction failed", proc.log_text())
        _check_agreement(target, model)
        time.sleep(0.5)  # a snapshot or two more (the restart then replays from them)
    finally:
        proc.kill()
        proc.stop()
    proc, target = _start(data, tmp_path, "second")
    try:
        _check_agreement(target, model)
    finally:
        proc.stop()
