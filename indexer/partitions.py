"""One generation's partition-scan (IVF-flat) index: k-means lists, contiguous per-list vectors, snapshots.

The alternative to :class:`~indexer.graph.HnswGraph` for queries that are not near catalogue members
(indexer/README.md, "Partition index (IVF)"). It has the graph's interface and guarantees: the same
readers-writer lock rules, rows per label, fewer than k results raise RuntimeError (the caller falls
back to exact search), distances exactly as :class:`~indexer.graph.ExactIndex` computes them, and
snapshots with a manifest, checksums and fsync.

Layout: a coarse quantiser (``lists`` centroids from k-means) assigns each vector to its nearest
centroid; the vectors of one list are stored contiguously in their own block (grown by doubling, a
delete moves the list's last vector into the hole), so a query scans ``probes`` dense blocks. Until the
index first holds :data:`TRAIN_MIN` vectors there is one list and a query scans all of it (exact).

Training runs beside the live index (:meth:`PartitionIndex.retrain`): the sample and the vectors are
copied under the read lock, k-means and the assignment run with no lock held, and only installing the
new lists takes the write lock, re-assigning the few vectors written meanwhile.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbir.limits import MAX_LISTS
from cbir.metric import Metric, normalise
from indexer.graph import RWLock, SnapshotError, _fsync, _fsync_directory, _sha256
from indexer.store import ItemRow

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "cbir.partition-snapshot.v1"
# Below this many vectors a query scans everything exactly (a few thousand dot products cost less
# than ranking centroids would save) and k-means would have too few points per list.
TRAIN_MIN = 4096
# Retrain once the index holds this many times the vectors it was trained on: the lists of a growing
# index stay within sqrt(2) of the automatic count for its size (training costs about twice the last
# one, in the background).
RETRAIN_GROWTH = 2
# Automatic lists: LISTS_PER_SQRT * sqrt(n), at most n / MIN_PER_LIST (k-means needs points per list),
# within [LISTS_MIN, LISTS_MAX]. A query costs about lists (centroids) + probes * n / lists (vectors)
# dot products, least at lists = sqrt(probes * n); fewer, fuller lists need more probes for the same
# recall. Measured in indexer/README.md ("Partition index (IVF)"): ~4,000 lists at 200,000.
LISTS_PER_SQRT = 11.0
MIN_PER_LIST = 16
LISTS_MIN, LISTS_MAX = 16, MAX_LISTS
DEFAULT_PROBES = 32
# k-means: this many sample points per list (at most), this many Lloyd iterations.
SAMPLE_PER_LIST = 32
KMEANS_ITERATIONS = 10
KMEANS_SEED = 0


def auto_lists(n: int) -> int:
    lists = min(LISTS_PER_SQRT * math.sqrt(max(n, 1)), n / MIN_PER_LIST)
    return int(min(LISTS_MAX, max(LISTS_MIN, round(lists))))


@dataclass(frozen=True)
class PartitionParams:
    metric: int
    dimension: int
    lists: int = 0  # 0: automatic (auto_lists of the size at training)
    probes: int = 0  # 0: DEFAULT_PROBES

    @property
    def default_probes(self) -> int:
        return self.probes or DEFAULT_PROBES


class PartitionIndex:
    """The partition index of one generation: item rows <-> labels <-> (list, position), under a RW lock.

    Labels are dense and reused after a delete (nothing outside keeps a label past its lock hold), so
    there are never deleted slots and compaction has nothing to do.
    """

    # A search-width override is a per-query argument here: it needs no exclusive hold of the lock.
    exclusive_width = False

    def __init__(self, params: PartitionParams, capacity: int = 1024):
        self.params = params
        self.lock = RWLock()
        self.metric = Metric(params.metric)
        d = params.dimension
        self.label_of: dict[str, int] = {}
        self.rows: list[ItemRow | None] = []
        self.next_label = 0
        self._free: list[int] = []
        capacity = max(capacity, 16)
        self._list_of = np.full(capacity, -1, np.int32)
        self._pos_of = np.zeros(capacity, np.int64)
        # Untrained: one list, no centroids (a query scans it all).
        self.centroids = np.zeros((0, d), np.float32)
        self._centroid_norms = np.zeros(0, np.float32)
        self.trained_at = 0
        self._blocks: list[np.ndarray] = [np.zeros((16, d), np.float32)]
        self._block_labels: list[np.ndarray] = [np.zeros(16, np.int64)]
        self._block_norms: list[np.ndarray] = [np.zeros(16, np.float32)]
        self._sizes: list[int] = [0]
        # Bumped by every write; per label the count at its last write (retrain re-assigns those
        # written after it copied the vectors).
        self._writes = 0
        self._written_at = np.zeros(capacity, np.int64)
        self.applied_seq = 0
        self.changed_seq = 0

    # ------------------------------------------------------------------ reads (hold lock.read())

    def __len__(self) -> int:
        return len(self.label_of)

    @property
    def deleted_slots(self) -> int:
        return 0

    @property
    def slots(self) -> int:
        return len(self.label_of)

    @property
    def capacity(self) -> int:
        return len(self._list_of)

    @property
    def lists(self) -> int:
        return len(self._blocks)

    @property
    def default_width(self) -> int:
        return self.params.default_probes

    @staticmethod
    def width_of(ef: int, probes: int) -> int:
        """The search-width override of a query on this index type: ``probes`` (``ef`` is HNSW's)."""
        return probes

    @property
    def needs_training(self) -> bool:
        n = len(self.label_of)
        if n < max(TRAIN_MIN, self.params.lists):
            return False
        return self.trained_at == 0 or n >= RETRAIN_GROWTH * self.trained_at

    def id_at(self, label: int) -> str | None:
        row = self.rows[label]
        return None if row is None else row.id

    def row_of(self, item_id: str) -> ItemRow | None:
        label = self.label_of.get(item_id)
        return None if label is None else self.rows[label]

    def memory_bytes(self) -> int:
        """Block capacity (vector, label, norm per place), centroids and the per-label arrays."""
        d = self.params.dimension
        places = sum(len(b) for b in self._blocks)
        return int(places * (4 * d + 8 + 4) + self.centroids.nbytes + self.capacity * (4 + 8 + 8 + 8))

    def search(
        self,
        queries: np.ndarray,
        k: int,
        accept: Callable[[int], bool] | None = None,
        width: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(labels, distances) [n, k], nearest first; raises RuntimeError if fewer than k are found.

        ``width``: lists probed (0: the generation's default). When ``accept`` rejects too many
        candidates the probes are doubled, up to every list, before giving up.
        """
        q = self._prepared(queries)
        k = int(k)
        probes = min(width or self.default_width, self.lists)
        order = self._list_order(q, probes)
        labels = np.empty((len(q), k), np.int64)
        dists = np.empty((len(q), k), np.float32)
        for j in range(len(q)):
            found = self._search_one(q[j], k, accept, order[j], probes)
            if found is None:
                raise RuntimeError(f"the partition index found fewer than {k} results")
            labels[j], dists[j] = found
        return labels, dists

    def _prepared(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.params.dimension)
        return normalise(q) if self.metric is Metric.COSINE else q

    def _list_order(self, q: np.ndarray, probes: int) -> np.ndarray:
        """Per query, the lists nearest first (the first ``probes`` sorted, then the rest unsorted)."""
        if self.lists == 1:
            return np.zeros((len(q), 1), np.int64)
        # L2 to the centroids (the assignment's measure), without the query's own norm.
        d = self._centroid_norms[None, :] - 2.0 * (q @ self.centroids.T)
        if probes < self.lists:
            part = np.argpartition(d, probes - 1, axis=1)
        else:
            part = np.tile(np.arange(self.lists), (len(q), 1))
        rows = np.arange(len(q))[:, None]
        head = part[:, :probes]
        head = head[rows, np.argsort(d[rows, head], axis=1, kind="stable")]
        return np.concatenate([head, part[:, probes:]], axis=1)

    def _search_one(
        self, q: np.ndarray, k: int, accept: Callable[[int], bool] | None, order: np.ndarray, probes: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The k nearest in the first ``probes`` lists of ``order`` (doubling ``probes`` while fewer
        than k pass ``accept``); None if fewer than k in every list."""
        while True:
            lists = order[:probes].tolist()
            found = self._scan(q, k, accept, lists)
            if found is not None or probes >= len(order):
                return found
            probes = min(len(order), probes * 2)

    def _scan(
        self, q: np.ndarray, k: int, accept: Callable[[int], bool] | None, lists: list[int]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        # One query at a time is what matters (a new photo): every list's dot products go straight
        # into one buffer, and labels are looked up only for the winners.
        blocks, sizes = self._blocks, self._sizes
        ends = list(itertools.accumulate(sizes[lst] for lst in lists))
        total = ends[-1] if ends else 0
        if total < k:
            return None
        dots = np.empty(total, np.float32)
        start = 0
        for lst, end in zip(lists, ends, strict=True):
            if end > start:
                np.matmul(blocks[lst][: end - start], q, out=dots[start:end])
            start = end
        if self.metric is Metric.L2:
            # ||x||^2 - 2 x.q: the distance less the query's own norm, which does not change the order.
            norms = np.concatenate([self._block_norms[lst][: sizes[lst]] for lst in lists])
            key = norms - 2.0 * dots
        else:
            key = -dots
        if accept is None:
            best = np.argpartition(key, k - 1)[:k] if k < total else np.arange(total)
            best = best[np.argsort(key[best], kind="stable")]
            labels = self._labels_at(best, lists, ends)
        else:
            # Walk the candidates nearest first, asking the filter only until k pass.
            picked: list[int] = []
            chosen: list[int] = []
            ranked = np.argsort(key, kind="stable")
            step = max(64, 4 * k)  # labels looked up a chunk at a time: most filters pass early
            for at in range(0, total, step):
                part = ranked[at : at + step]
                for j, label in zip(part.tolist(), self._labels_at(part, lists, ends).tolist(), strict=True):
                    if accept(label):
                        picked.append(j)
                        chosen.append(label)
                        if len(picked) == k:
                            break
                if len(picked) == k:
                    break
            else:
                return None
            best, labels = np.array(picked), np.array(chosen, np.int64)
        key = key[best]
        dists = np.maximum(key + float(q @ q), 0.0) if self.metric is Metric.L2 else 1.0 + key
        return labels, dists.astype(np.float32)

    def _labels_at(self, positions: np.ndarray, lists: list[int], ends: list[int]) -> np.ndarray:
        """Labels of positions in the concatenation of ``lists`` (``ends``: where each one ends)."""
        ends_arr = np.asarray(ends)
        which = np.searchsorted(ends_arr, positions, side="right")
        offsets = positions - (ends_arr[which] - np.asarray([self._sizes[lists[w]] for w in which.tolist()]))
        block_labels = self._block_labels
        return np.array(
            [block_labels[lists[w]][o] for w, o in zip(which.tolist(), offsets.tolist(), strict=True)],
            np.int64,
        )

    @contextmanager
    def custom_width(self, width: int) -> Iterator[None]:
        """Nothing to set: the width is passed to :meth:`search` per query."""
        yield

    def vectors_of(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors (unit length for cosine, as hnswlib stores them)."""
        out = np.zeros((len(ids), self.params.dimension), np.float32)
        for j, item_id in enumerate(ids):
            label = self.label_of[item_id]
            out[j] = self._blocks[self._list_of[label]][self._pos_of[label]]
        return out

    # ------------------------------------------------------------------ writes (hold lock.write())

    def reserve(self, new_items: int) -> None:
        """Grows the per-label arrays so that ``new_items`` more ids fit (freed labels are reused first)."""
        needed = self.next_label + max(0, new_items - len(self._free))
        if needed > self.capacity:
            size = max(needed, self.capacity * 3 // 2)
            extra = size - self.capacity
            self._list_of = np.concatenate([self._list_of, np.full(extra, -1, np.int32)])
            self._pos_of = np.concatenate([self._pos_of, np.zeros(extra, np.int64)])
            self._written_at = np.concatenate([self._written_at, np.zeros(extra, np.int64)])

    def put(self, ids: Sequence[str], vectors: np.ndarray, rows: Sequence[ItemRow] | None = None) -> None:
        """Adds new ids and updates existing ones (moved to another list if their nearest one changed)."""
        vectors = self._prepared(vectors)
        rows = list(rows) if rows is not None else [ItemRow(i) for i in ids]
        self.reserve(sum(1 for i in ids if i not in self.label_of))
        targets = self._assign(vectors)
        self._writes += 1
        for j, item_id in enumerate(ids):
            label = self.label_of.get(item_id)
            if label is None:
                label = self._free.pop() if self._free else self._new_label()
                self.label_of[item_id] = label
                self.rows[label] = rows[j]
                self._append(int(targets[j]), label, vectors[j])
            else:
                self.rows[label] = rows[j]
                lst = int(self._list_of[label])
                if lst == targets[j]:
                    self._write_at(lst, int(self._pos_of[label]), label, vectors[j])
                else:
                    self._take_out(label)
                    self._append(int(targets[j]), label, vectors[j])
            self._written_at[label] = self._writes

    def _new_label(self) -> int:
        label = self.next_label
        self.next_label += 1
        self.rows.append(None)
        return label

    def _assign(self, vectors: np.ndarray) -> np.ndarray:
        if self.lists == 1:
            return np.zeros(len(vectors), np.int64)
        return nearest_centroid(vectors, self.centroids, self._centroid_norms)

    def _append(self, lst: int, label: int, vector: np.ndarray) -> None:
        n = self._sizes[lst]
        if n == len(self._blocks[lst]):
            grow = max(16, n)
            self._blocks[lst] = np.concatenate(
                [self._blocks[lst], np.zeros((grow, self.params.dimension), np.float32)]
            )
            self._block_labels[lst] = np.concatenate([self._block_labels[lst], np.zeros(grow, np.int64)])
            self._block_norms[lst] = np.concatenate([self._block_norms[lst], np.zeros(grow, np.float32)])
        self._sizes[lst] = n + 1
        self._write_at(lst, n, label, vector)

    def _write_at(self, lst: int, pos: int, label: int, vector: np.ndarray) -> None:
        self._blocks[lst][pos] = vector
        self._block_labels[lst][pos] = label
        self._block_norms[lst][pos] = float(vector @ vector)
        self._list_of[label] = lst
        self._pos_of[label] = pos

    def _take_out(self, label: int) -> None:
        """Removes a label's vector from its list: the list's last vector moves into the hole."""
        lst, pos = int(self._list_of[label]), int(self._pos_of[label])
        last = self._sizes[lst] - 1
        if pos != last:
            moved = int(self._block_labels[lst][last])
            self._write_at(lst, pos, moved, self._blocks[lst][last])
        self._sizes[lst] = last
        self._list_of[label] = -1

    def set_rows(self, rows: Sequence[ItemRow]) -> None:
        """New metadata for items the index holds (their vectors unchanged); other rows are ignored."""
        for row in rows:
            label = self.label_of.get(row.id)
            if label is not None:
                self.rows[label] = row

    def remove(self, ids: Sequence[str]) -> None:
        self._writes += 1
        for item_id in ids:
            label = self.label_of.pop(item_id, None)
            if label is not None:
                self._take_out(label)
                self.rows[label] = None
                self._written_at[label] = self._writes
                self._free.append(label)

    # ------------------------------------------------------------------ training

    def retrain(self) -> bool:
        """Trains the lists on the current vectors beside the live index; False if nothing to do.

        The caller must not hold the lock: this takes the read lock to copy, none for k-means, and the
        write lock only to install (re-assigning what was written meanwhile).
        """
        started = time.monotonic()
        with self.lock.read():
            if not self.needs_training:
                return False
            labels, vectors = self._all_vectors()
            since = self._writes
        n = len(labels)
        lists = min(self.params.lists or auto_lists(n), n)
        centroids = kmeans(vectors, lists, KMEANS_SEED)
        norms = (centroids * centroids).sum(1)
        assigned = nearest_centroid(vectors, centroids, norms)
        trained = time.monotonic()
        with self.lock.write():
            self._install(centroids, norms, labels, vectors, assigned, since, n)
        log.info(
            "partition index trained",
            extra={
                "vectors": n,
                "lists": lists,
                "train_seconds": round(trained - started, 3),
                "install_seconds": round(time.monotonic() - trained, 3),
            },
        )
        return True

    def _all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        n = [self._sizes[i] for i in range(self.lists)]
        labels = np.concatenate([self._block_labels[i][: n[i]] for i in range(self.lists)])
        vectors = np.concatenate([self._blocks[i][: n[i]] for i in range(self.lists)])
        return labels, vectors

    def _install(
        self,
        centroids: np.ndarray,
        norms: np.ndarray,
        labels: np.ndarray,
        vectors: np.ndarray,
        assigned: np.ndarray,
        since: int,
        trained_on: int,
    ) -> None:
        # Labels written after the copy (new, moved, deleted or re-used) are taken from the live lists.
        held = slice(0, self.next_label)
        new_labels = np.nonzero((self._written_at[held] > since) & (self._list_of[held] >= 0))[0]
        new_vectors = np.zeros((len(new_labels), self.params.dimension), np.float32)
        for j, label in enumerate(new_labels.tolist()):
            new_vectors[j] = self._blocks[self._list_of[label]][self._pos_of[label]]
        unchanged = self._written_at[labels] <= since
        labels, vectors, assigned = labels[unchanged], vectors[unchanged], assigned[unchanged]
        all_labels = np.concatenate([labels, new_labels])
        all_vectors = np.concatenate([vectors, new_vectors])
        all_lists = np.concatenate([assigned, nearest_centroid(new_vectors, centroids, norms)])
        self.centroids, self._centroid_norms = centroids, norms
        self._fill(all_labels, all_vectors, all_lists, len(centroids))
        self.trained_at = trained_on

    def _fill(self, labels: np.ndarray, vectors: np.ndarray, lists: np.ndarray, count: int) -> None:
        """Replaces every block: list ``lists[j]`` holds ``vectors[j]`` (grouped by a stable sort)."""
        order = np.argsort(lists, kind="stable")
        labels, vectors, lists = labels[order], vectors[order], lists[order]
        bounds = np.searchsorted(lists, np.arange(count + 1))
        self._blocks, self._block_labels, self._block_norms, self._sizes = [], [], [], []
        for lst in range(count):
            a, b = int(bounds[lst]), int(bounds[lst + 1])
            places = max(16, 1 << max(0, (b - a - 1)).bit_length())
            block = np.zeros((places, self.params.dimension), np.float32)
            block[: b - a] = vectors[a:b]
            block_labels = np.zeros(places, np.int64)
            block_labels[: b - a] = labels[a:b]
            block_norms = np.zeros(places, np.float32)
            block_norms[: b - a] = (vectors[a:b] * vectors[a:b]).sum(1)
            self._blocks.append(block)
            self._block_labels.append(block_labels)
            self._block_norms.append(block_norms)
            self._sizes.append(b - a)
            self._list_of[labels[a:b]] = lst
            self._pos_of[labels[a:b]] = np.arange(b - a)

    # ------------------------------------------------------------------ snapshots

    def save(self, directory: Path) -> int:
        """Writes lists + labels, then the manifest with their checksum (last, atomically).

        Takes the read lock itself only while copying the arrays (queries go on; writers wait); writing,
        fsync and checksums run after it is released. Returns the ``applied_seq`` the snapshot holds.
        """
        directory.mkdir(parents=True, exist_ok=True)
        data_path, manifest_path = _paths(directory)
        tmp_data = str(data_path) + ".tmp.npz"
        with self.lock.read():
            labels, vectors = self._all_vectors()
            sizes = np.array(self._sizes, np.int64)
            ids = [self.id_at(int(label)) or "" for label in labels.tolist()]
            centroids = self.centroids.copy()
            seq, next_label, trained_at = self.applied_seq, self.next_label, self.trained_at
        np.savez(
            tmp_data,
            centroids=centroids,
            sizes=sizes,
            labels=labels,
            vectors=vectors,
            ids=np.array(ids, dtype=str) if ids else np.zeros(0, "U1"),
        )
        _fsync(tmp_data)
        os.replace(tmp_data, data_path)
        manifest = {
            "format": SNAPSHOT_FORMAT,
            "applied_seq": seq,
            "next_label": next_label,
            "trained_at": trained_at,
            "params": self.params.__dict__,
            "count": len(ids),
            "data_sha256": _sha256(data_path),
        }
        _write_manifest(manifest_path, manifest)
        _fsync_directory(directory)
        return seq

    @classmethod
    def load(
        cls, directory: Path, params: PartitionParams, row_of: Callable[[str], ItemRow | None] | None = None
    ) -> PartitionIndex:
        """Loads a snapshot; raises SnapshotError if missing, corrupt or made with other parameters.

        ``row_of`` as for :meth:`indexer.graph.HnswGraph.load`.
        """
        data_path, manifest_path = _paths(directory)
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"no readable snapshot manifest in {directory}: {exc}") from exc
        if manifest.get("format") != SNAPSHOT_FORMAT or manifest.get("params") != params.__dict__:
            raise SnapshotError(f"snapshot in {directory} was made with other parameters")
        if not data_path.exists() or _sha256(data_path) != manifest.get("data_sha256"):
            raise SnapshotError(f"snapshot file {data_path} is missing or its checksum does not match")
        try:
            with np.load(data_path) as data:
                centroids = np.asarray(data["centroids"], np.float32)
                sizes = np.asarray(data["sizes"], np.int64)
                labels = np.asarray(data["labels"], np.int64)
                vectors = np.asarray(data["vectors"], np.float32)
                ids = [str(i) for i in data["ids"]]
            next_label = int(manifest["next_label"])
            count = int(manifest["count"])
        except (ValueError, OSError, KeyError) as exc:
            raise SnapshotError(f"snapshot in {directory} cannot be loaded: {exc}") from exc
        d = params.dimension
        lists = max(1, len(centroids))
        if (
            len(ids) != count
            or len(labels) != count
            or vectors.shape != (count, d)
            or centroids.shape[1:] != (d,)
            or len(sizes) != lists
            or int(sizes.sum()) != count
            or (count and (labels.min() < 0 or labels.max() >= next_label))
            or len(np.unique(labels)) != count
        ):
            raise SnapshotError(f"snapshot in {directory} is inconsistent")
        index = cls(params, capacity=next_label + 16)
        index.next_label = next_label
        index.rows = [None] * next_label
        lookup = row_of or (lambda _i: None)
        for item_id, label in zip(ids, labels.tolist(), strict=True):
            index.label_of[item_id] = label
            index.rows[label] = lookup(item_id) or ItemRow(item_id)
        index._free = sorted(set(range(next_label)) - set(labels.tolist()), reverse=True)
        index.centroids = centroids
        index._centroid_norms = (centroids * centroids).sum(1)
        index._fill(labels, vectors, np.repeat(np.arange(lists), sizes), lists)
        index.trained_at = int(manifest.get("trained_at", 0))
        index.applied_seq = index.changed_seq = int(manifest["applied_seq"])
        return index

    @staticmethod
    def advance_snapshot(directory: Path, seq: int) -> int:
        """As :meth:`indexer.graph.HnswGraph.advance_snapshot`: the manifest moves forward to ``seq``."""
        manifest_path = _paths(directory)[1]
        manifest = json.loads(manifest_path.read_text())
        if seq > manifest["applied_seq"]:
            manifest["applied_seq"] = seq
            _write_manifest(manifest_path, manifest)
            _fsync_directory(directory)
        return seq


def remove_snapshot(directory: Path) -> None:
    for path in _paths(directory):
        path.unlink(missing_ok=True)


def nearest_centroid(vectors: np.ndarray, centroids: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Index of the L2-nearest centroid of every vector (in chunks: the distance matrix stays small)."""
    out = np.empty(len(vectors), np.int64)
    chunk = max(1, (1 << 24) // max(1, len(centroids)))
    for start in range(0, len(vectors), chunk):
        part = vectors[start : start + chunk]
        out[start : start + chunk] = np.argmin(norms[None, :] - 2.0 * (part @ centroids.T), axis=1)
    return out


def kmeans(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Lloyd's k-means (L2) on a seeded sample of at most SAMPLE_PER_LIST * k vectors: [k, d] centroids.

    Starts from k distinct sample points; a list left empty takes a random sample point again.
    """
    rng = np.random.default_rng(seed)
    n = len(vectors)
    sample = vectors[rng.choice(n, size=min(n, SAMPLE_PER_LIST * k), replace=False)]
    centroids = sample[rng.choice(len(sample), size=k, replace=False)].copy()
    for _ in range(KMEANS_ITERATIONS):
        assigned = nearest_centroid(sample, centroids, (centroids * centroids).sum(1))
        counts = np.bincount(assigned, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assigned, sample)
        empty = counts == 0
        centroids = sums / np.maximum(counts, 1)[:, None]
        if empty.any():
            centroids[empty] = sample[rng.choice(len(sample), size=int(empty.sum()), replace=False)]
    return centroids.astype(np.float32)


def _paths(directory: Path) -> tuple[Path, Path]:
    return directory / "partitions.npz", directory / "partitions.json"


def _write_manifest(path: Path, manifest: dict[str, object]) -> None:
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(manifest, fh)
    _fsync(tmp)
    os.replace(tmp, path)
