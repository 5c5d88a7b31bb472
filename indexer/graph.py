"""One generation's HNSW graph over hnswlib, an exact brute-force reference, and graph snapshots.

hnswlib's rules this module enforces (../shared/reference/serving-hnsw-k8s.md):
- adding and querying concurrently is unsafe, and so is resizing: a readers-writer lock lets
  queries run in parallel and gives writes (applied in small batches) exclusive access;
- an existing label is updated in place, but with ``allow_replace_deleted`` a label must not be
  re-added once deleted: labels are never reused, new items take over deleted *slots* instead
  (``replace_deleted=True``);
- capacity is fixed until ``resize_index``; fewer than k results raise, so callers fall back to
  :class:`ExactIndex`.

A graph is a self-contained view for its readers: besides the vectors it holds, per label, the
:class:`~indexer.store.ItemRow` (id, uri, label, attributes) it was last written with. Filters are
evaluated and hits are built from those rows under the same read lock as the search, so an answer never
mixes two states of an item (see "Concurrency" in indexer/README.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np

from cbir.metric import Metric, normalise
from indexer.store import ItemRow

SNAPSHOT_FORMAT = "cbir.hnsw-snapshot.v1"


class RWLock:
    """Many readers or one writer; a waiting writer stops new readers so writes are not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class ExactIndex:
    """Brute-force k-NN over a matrix, with hnswlib's distance definitions. The reference for tests."""

    def __init__(self, metric: int, ids: Sequence[str], vectors: np.ndarray):
        self.metric = Metric(metric)
        self.ids = list(ids)
        self.vectors = np.asarray(vectors, dtype=np.float32)
        if self.vectors.ndim != 2:
            self.vectors = self.vectors.reshape(len(self.ids), -1)
        if self.metric is Metric.COSINE:
            self.vectors = normalise(self.vectors)

    def distances(self, queries: np.ndarray) -> np.ndarray:
        return self.metric.distances(queries, self.vectors, unit_vectors=self.metric is Metric.COSINE)

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """Ids and distances of the k nearest (fewer if fewer items), nearest first."""
        k = min(k, len(self.ids))
        n = len(queries)
        if k == 0:
            return [[] for _ in range(n)], np.zeros((n, 0), np.float32)
        d = self.distances(queries)
        part = (
            np.argpartition(d, k - 1, axis=1)[:, :k]
            if k < d.shape[1]
            else np.tile(np.arange(d.shape[1]), (n, 1))
        )
        rows = np.arange(n)[:, None]
        order = np.argsort(d[rows, part], axis=1, kind="stable")
        best = part[rows, order]
        return [[self.ids[j] for j in r] for r in best], d[rows, best]


@dataclass(frozen=True)
class GraphParams:
    metric: int
    dimension: int
    m: int
    ef_construction: int
    ef_search: int


class HnswGraph:
    """The HNSW graph of one generation: item rows <-> hnswlib labels, guarded by a RW lock."""

    # hnswlib's ef belongs to the index: a search-width override needs the write lock (custom_width).
    exclusive_width = True
    # Never trained (see indexer.partitions.PartitionIndex.retrain).
    needs_training = False
    lists = 0

    def __init__(self, params: GraphParams, capacity: int = 1024):
        self.params = params
        self.lock = RWLock()
        self.index = hnswlib.Index(space=Metric(params.metric).space, dim=params.dimension)
        self.index.init_index(
            max_elements=max(capacity, 16),
            M=params.m,
            ef_construction=params.ef_construction,
            allow_replace_deleted=True,
        )
        self.index.set_ef(params.ef_search)
        self.label_of: dict[str, int] = {}
        # Labels are dense (0, 1, 2, ...), so label -> row is a list (None once deleted). The rows are
        # the catalogue's own objects: a graph adds a reference per item, not a copy.
        self.rows: list[ItemRow | None] = []
        self.next_label = 0
        # The store sequence number up to which the graph reflects the store, and the last one that
        # changed its vectors or membership (what a snapshot holds). The writer sets both under the
        # write lock with the changes they cover (applied_seq alone may move without the lock: a write
        # that does not touch this graph).
        self.applied_seq = 0
        self.changed_seq = 0

    # ------------------------------------------------------------------ reads (hold lock.read())

    def __len__(self) -> int:
        return len(self.label_of)

    @property
    def deleted_slots(self) -> int:
        return int(self.index.element_count) - len(self.label_of)

    @property
    def capacity(self) -> int:
        return int(self.index.max_elements)

    @property
    def slots(self) -> int:
        """Slots in use, deleted ones included (what compaction compares deleted_slots with)."""
        return int(self.index.element_count)

    @property
    def default_width(self) -> int:
        return self.params.ef_search

    @staticmethod
    def width_of(ef: int, probes: int) -> int:
        """The search-width override of a query on this index type: ``ef`` (``probes`` is IVF's)."""
        return ef

    def id_at(self, label: int) -> str | None:
        row = self.rows[label]
        return None if row is None else row.id

    def row_of(self, item_id: str) -> ItemRow | None:
        label = self.label_of.get(item_id)
        return None if label is None else self.rows[label]

    def memory_bytes(self) -> int:
        """Estimate from hnswlib's layout: level-0 block per slot, upper levels for ~1/ln(M) of them."""
        p = self.params
        level0 = p.dimension * 4 + (2 * p.m) * 4 + 4 + 8
        upper = (p.m * 4 + 4) / max(math.log(p.m), 1.0)
        return int(self.capacity * (level0 + 8) + self.index.element_count * upper)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        accept: Callable[[int], bool] | None = None,
        width: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(labels, distances) from hnswlib; raises RuntimeError if fewer than k are found.

        The search width is the index's ef (hnswlib raises it to k itself). It is one setting for
        the whole index, so it stays at the generation's default; ``width`` is not read here: an
        override is set by :meth:`custom_width` around the call.
        """
        if accept is None:
            # hnswlib's thread pool costs more than it saves for a handful of queries.
            found: tuple[np.ndarray, np.ndarray] = self.index.knn_query(
                queries, k=k, num_threads=1 if len(queries) < 8 else -1
            )
            return found
        # hnswlib calls the filter with the GIL held; one thread avoids contention (hnswlib docs).
        found = self.index.knn_query(queries, k=k, num_threads=1, filter=accept)
        return found

    @contextmanager
    def custom_ef(self, ef: int) -> Iterator[None]:
        """Searches with another ef. hnswlib's ef belongs to the index, not to a query, so the caller
        must hold the write lock: the override must not leak into concurrent queries."""
        self.index.set_ef(ef)
        try:
            yield
        finally:
            self.index.set_ef(self.params.ef_search)

    def custom_width(self, width: int) -> AbstractContextManager[None]:
        return self.custom_ef(width)

    def retrain(self) -> bool:
        return False

    def vectors_of(self, ids: Sequence[str]) -> np.ndarray:
        if not ids:
            return np.zeros((0, self.params.dimension), np.float32)
        return np.asarray(
            self.index.get_items([self.label_of[i] for i in ids], return_type="numpy"), np.float32
        )

    # ------------------------------------------------------------------ writes (hold lock.write())

    def reserve(self, new_items: int) -> None:
        """Grows the capacity so that ``new_items`` more ids fit (deleted slots are reused first)."""
        needed = len(self.label_of) + new_items
        if needed > self.index.max_elements:
            # Grow by half: amortised like doubling, with less slack memory in a big index.
            self.index.resize_index(max(needed, self.index.max_elements * 3 // 2))

    def put(self, ids: Sequence[str], vectors: np.ndarray, rows: Sequence[ItemRow] | None = None) -> None:
        """Adds new ids (into deleted slots when there are some) and updates existing ones in place.

        ``rows`` are the items' rows, aligned with ``ids`` (default: rows with the id only).
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        rows = list(rows) if rows is not None else [ItemRow(i) for i in ids]
        new_rows = [j for j, i in enumerate(ids) if i not in self.label_of]
        old_rows = [j for j, i in enumerate(ids) if i in self.label_of]
        if old_rows:
            labels = [self.label_of[ids[j]] for j in old_rows]
            self.index.add_items(vectors[old_rows], labels)
            for j, label in zip(old_rows, labels, strict=True):
                self.rows[label] = rows[j]
        if new_rows:
            self.reserve(len(new_rows))
            labels = list(range(self.next_label, self.next_label + len(new_rows)))
            self.next_label += len(new_rows)
            self.index.add_items(vectors[new_rows], labels, replace_deleted=True)
            for j, label in zip(new_rows, labels, strict=True):
                self.label_of[ids[j]] = label
            self.rows.extend(rows[j] for j in new_rows)

    def set_rows(self, rows: Sequence[ItemRow]) -> None:
        """New metadata for items the graph holds (their vectors unchanged); other rows are ignored."""
        for row in rows:
            label = self.label_of.get(row.id)
            if label is not None:
                self.rows[label] = row

    def remove(self, ids: Sequence[str]) -> None:
        for item_id in ids:
            label = self.label_of.pop(item_id, None)
            if label is not None:
                self.rows[label] = None
                self.index.mark_deleted(label)

    # ------------------------------------------------------------------ snapshots

    def save(self, directory: Path) -> int:
        """Writes graph + label map, then the manifest with their checksums (last, atomically).

        Takes the read lock itself, only while the files are written (queries go on; writers wait);
        fsync and checksums run after it is released. The caller must not hold the lock. Returns the
        ``applied_seq`` the snapshot contains.
        """
        directory.mkdir(parents=True, exist_ok=True)
        graph_path, labels_path, manifest_path = _paths(directory)
        graph_tmp, labels_tmp = str(graph_path) + ".tmp", str(labels_path) + ".tmp.npz"
        with self.lock.read():
            self.index.save_index(graph_tmp)
            ids = list(self.label_of)
            labels = np.array([self.label_of[i] for i in ids], dtype=np.int64)
            seq, next_label = self.applied_seq, self.next_label
        np.savez(labels_tmp, ids=np.array(ids, dtype=str) if ids else np.zeros(0, "U1"), labels=labels)
        for tmp, final in ((graph_tmp, graph_path), (labels_tmp, labels_path)):
            _fsync(tmp)
            os.replace(tmp, final)
        manifest = {
            "format": SNAPSHOT_FORMAT,
            "applied_seq": seq,
            "next_label": next_label,
            "params": self.params.__dict__,
            "count": len(ids),
            "graph_sha256": _sha256(graph_path),
            "labels_sha256": _sha256(labels_path),
        }
        tmp = str(manifest_path) + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(manifest, fh)
        _fsync(tmp)
        os.replace(tmp, manifest_path)
        _fsync_directory(directory)
        return seq

    @classmethod
    def load(
        cls, directory: Path, params: GraphParams, row_of: Callable[[str], ItemRow | None] | None = None
    ) -> HnswGraph:
        """Loads a snapshot; raises SnapshotError if missing, corrupt or made with other parameters.

        ``row_of`` gives each id's current row (default: rows with the id only); an id it does not know
        (deleted since the snapshot) gets an id-only row until the replay of the change log removes it.
        """
        graph_path, labels_path, manifest_path = _paths(directory)
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"no readable snapshot manifest in {directory}: {exc}") from exc
        if manifest.get("format") != SNAPSHOT_FORMAT or manifest.get("params") != params.__dict__:
            raise SnapshotError(f"snapshot in {directory} was made with other parameters")
        for path, key in ((graph_path, "graph_sha256"), (labels_path, "labels_sha256")):
            if not path.exists() or _sha256(path) != manifest.get(key):
                raise SnapshotError(f"snapshot file {path} is missing or its checksum does not match")
        graph = cls.__new__(cls)
        graph.params = params
        graph.lock = RWLock()
        try:
            graph.index = hnswlib.Index(space=Metric(params.metric).space, dim=params.dimension)
            graph.index.load_index(str(graph_path), allow_replace_deleted=True)
            with np.load(labels_path) as data:
                ids = [str(i) for i in data["ids"]]
                labels = [int(x) for x in data["labels"]]
        except (RuntimeError, ValueError, OSError, KeyError) as exc:
            raise SnapshotError(f"snapshot in {directory} cannot be loaded: {exc}") from exc
        if len(ids) != manifest["count"] or graph.index.element_count - graph.index.get_current_count() < 0:
            raise SnapshotError(f"snapshot in {directory} is inconsistent")
        graph.index.set_ef(params.ef_search)
        graph.label_of = dict(zip(ids, labels, strict=True))
        graph.next_label = int(manifest["next_label"])
        graph.rows = [None] * graph.next_label
        lookup = row_of or (lambda _i: None)
        for i, label in zip(ids, labels, strict=True):
            graph.rows[label] = lookup(i) or ItemRow(i)
        graph.applied_seq = graph.changed_seq = int(manifest["applied_seq"])
        return graph

    @staticmethod
    def advance_snapshot(directory: Path, seq: int) -> int:
        """Moves an intact snapshot's sequence forward to ``seq`` (the graph did not change since it
        was saved, so the same files are complete up to ``seq``). Returns ``seq``."""
        manifest_path = _paths(directory)[2]
        manifest = json.loads(manifest_path.read_text())
        if seq > manifest["applied_seq"]:
            manifest["applied_seq"] = seq
            tmp = str(manifest_path) + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(manifest, fh)
            _fsync(tmp)
            os.replace(tmp, manifest_path)
            _fsync_directory(directory)
        return seq


class SnapshotError(Exception):
    """A snapshot cannot be used; the graph is rebuilt from the store instead."""


def remove_snapshot(directory: Path) -> None:
    for path in _paths(directory):
        path.unlink(missing_ok=True)


def _paths(directory: Path) -> tuple[Path, Path, Path]:
    return directory / "hnsw.bin", directory / "labels.npz", directory / "snapshot.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    # The renames above are durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
