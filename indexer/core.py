"""The indexer's core: items, generations and k-NN over the store and the HNSW graphs. No gRPC here.

Write path (one at a time, under ``_write_lock``): validate -> commit to the store (durable) ->
apply to the in-memory graphs in small batches under each graph's write lock -> acknowledge. So a
query never sees a write the store does not have, and after a crash the store replays into the
graphs whatever they missed.

Read path: resolve the generation once (so a whole answer comes from one generation), take the
graph's read lock (queries run in parallel), search HNSW, or search exactly when few items can
match (small index, narrow filter) or HNSW returns fewer than k.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbir.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidInput, NotFound, NotReady
from cbir.sharding import shard_of
from indexer.graph import (
    ExactIndex,
    GraphParams,
    HnswGraph,
    SnapshotError,
    distances_to_scores,
    remove_snapshot,
)
from indexer.store import ACTIVE, BUILDING, RETIRED, GenerationRow, ItemRow, ItemStore

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_ID_BYTES, MAX_URI_BYTES, MAX_LABEL_BYTES = 256, 2048, 256
MAX_ATTRIBUTES, MAX_KEY_BYTES, MAX_VALUE_BYTES = 64, 128, 1024
MAX_DIMENSION = 4096
MAX_EF = 100_000
METRICS = {1: "cosine", 2: "l2", 3: "inner_product"}
# Graph updates are applied in batches this size, releasing the graph's write lock in between so
# queries waiting on a long write get their turn.
APPLY_BATCH = 256


@dataclass(frozen=True)
class IndexerConfig:
    """Tunables of one indexer shard."""

    data_dir: Path
    shard_id: int = 0
    shard_count: int = 1
    max_k: int = 1000
    max_batch: int = 4096
    default_m: int = 16
    default_ef_construction: int = 200
    default_ef_search: int = 300
    # Filtered queries whose matching items are at most this many are answered by exact search.
    exact_threshold: int = 10_000
    # Rebuild a graph once this fraction of its slots are deleted (and it has at least 1024 slots).
    compact_fraction: float = 0.3
    snapshot_interval: float = 60.0


@dataclass(frozen=True)
class ItemFilter:
    """labels: any of (empty = any); attributes: every (key, values) must hold with one of values."""

    labels: tuple[str, ...] = ()
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.labels or self.attributes)

    def matches(self, item: ItemRow | None) -> bool:
        if item is None:
            return False
        if self.labels and item.label not in self.labels:
            return False
        return all(item.attributes.get(key) in values for key, values in self.attributes)


@dataclass(slots=True)
class Hit:
    item: ItemRow
    distance: float
    score: float


@dataclass
class GenerationState:
    """A generation in memory: its stored row and its current graph (swapped whole on rebuild)."""

    row: GenerationRow
    graph: HnswGraph
    directory: Path
    snapshot_seq: int | None = None  # seq of the snapshot on disk; None = no usable snapshot
    compacting: bool = False

    @property
    def name(self) -> str:
        return self.row.name


@dataclass(frozen=True)
class GenerationInfo:
    """A generation with its figures, as answered to callers."""

    row: GenerationRow
    item_count: int
    deleted_slots: int
    pending_count: int
    memory_bytes: int


@dataclass(frozen=True)
class StatsInfo:
    item_count: int
    active_generation: str
    generations: list[GenerationInfo]
    store_bytes: int
    process_rss_bytes: int
    shard_id: int
    shard_count: int
    last_sequence: int


@dataclass
class _Catalogue:
    """Items in memory (for hits and filters), with inverted indexes to size a filter quickly."""

    items: dict[str, ItemRow] = field(default_factory=dict)
    by_label: dict[str, set[str]] = field(default_factory=dict)
    by_attribute: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, item: ItemRow) -> None:
        with self.lock:
            self._unindex(item.id)
            self.items[item.id] = item
            self.by_label.setdefault(item.label, set()).add(item.id)
            for pair in item.attributes.items():
                self.by_attribute.setdefault(pair, set()).add(item.id)

    def remove(self, item_id: str) -> None:
        with self.lock:
            self._unindex(item_id)
            self.items.pop(item_id, None)

    def _unindex(self, item_id: str) -> None:
        old = self.items.get(item_id)
        if old is None:
            return
        self.by_label.get(old.label, set()).discard(item_id)
        for pair in old.attributes.items():
            self.by_attribute.get(pair, set()).discard(item_id)

    def estimate(self, flt: ItemFilter) -> int:
        """An upper bound of how many items match."""
        with self.lock:
            bound = len(self.items)
            if flt.labels:
                bound = min(bound, sum(len(self.by_label.get(label, ())) for label in set(flt.labels)))
            for key, values in flt.attributes:
                bound = min(bound, sum(len(self.by_attribute.get((key, v), ())) for v in set(values)))
            return bound

    def matching(self, flt: ItemFilter) -> set[str]:
        with self.lock:
            result: set[str] | None = None
            if flt.labels:
                result = set().union(*(self.by_label.get(label, set()) for label in flt.labels))
            for key, values in flt.attributes:
                part = set().union(*(self.by_attribute.get((key, v), set()) for v in values))
                result = part if result is None else result & part
            return set(self.items) if result is None else result


class IndexerCore:
    """Items, generations and queries of one indexer shard."""

    def __init__(self, config: IndexerConfig, store: ItemStore | None = None):
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.store = store or ItemStore(self.data_dir / "catalogue.sqlite3")
        self._write_lock = threading.RLock()
        self._catalogue = _Catalogue()
        self._generations: dict[str, GenerationState] = {}
        self._active: str | None = None
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._snapshot_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._pending_cache: dict[str, tuple[int, int]] = {}

    # ================================================================== lifecycle

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def load(self) -> None:
        """Loads the catalogue and every graph (snapshot + replay, or rebuild). Blocks until done."""
        started = time.monotonic()
        for item in self.store.all_items():
            self._catalogue.put(item)
        active = self.store.get_meta("active")
        for row in self.store.generations():
            self._generations[row.name] = self._load_generation(row)
        self._active = active if active in self._generations else None
        self._ready.set()
        log.info(
            "index loaded",
            extra={
                "items": len(self._catalogue.items),
                "generations": len(self._generations),
                "active": self._active,
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    def start_background(self) -> None:
        """Periodic snapshots (and change-log pruning) until close()."""
        thread = threading.Thread(target=self._snapshot_loop, name="indexer-snapshots", daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self, snapshot: bool = True) -> None:
        self._closed.set()
        for thread in self._threads:
            thread.join(timeout=30)
        if snapshot and self.ready:
            self.snapshot_all()
        self.store.close()

    def _generation_dir(self, name: str) -> Path:
        return self.data_dir / "generations" / name

    def _params(self, row: GenerationRow) -> GraphParams:
        return GraphParams(row.metric, row.dimension, row.m, row.ef_construction, row.ef_search)

    def _load_generation(self, row: GenerationRow) -> GenerationState:
        directory = self._generation_dir(row.name)
        snapshot_seq: int | None = None
        try:
            graph = HnswGraph.load(directory, self._params(row))
            snapshot_seq = graph.applied_seq
            log.info(
                "snapshot loaded",
                extra={"generation": row.name, "seq": graph.applied_seq, "count": len(graph)},
            )
        except SnapshotError as exc:
            log.warning("rebuilding graph from the store", extra={"generation": row.name, "reason": str(exc)})
            graph = self._build_from_store(row)
        self._catch_up(row.name, graph)
        return GenerationState(row, graph, directory, snapshot_seq)

    def _build_from_store(self, row: GenerationRow) -> HnswGraph:
        count = self.store.vector_count(row.name)
        graph = HnswGraph(self._params(row), capacity=int(count * 1.1) + 1024)
        seq, batches = self.store.generation_snapshot(row.name)
        for ids, vectors in batches:
            graph.put(ids, vectors)
        graph.applied_seq = seq
        return graph

    def _catch_up(self, name: str, graph: HnswGraph) -> None:
        """Replays every change after ``graph.applied_seq`` (idempotent: applies current state)."""
        last, ids = self.store.changed_since(name, graph.applied_seq)
        if ids:
            current = self.store.get_vectors(name, ids)
            for start in range(0, len(ids), APPLY_BATCH):
                part = ids[start : start + APPLY_BATCH]
                present = [i for i in part if i in current]
                with graph.lock.write():
                    graph.remove([i for i in part if i not in current])
                    if present:
                        graph.put(present, np.stack([current[i][0] for i in present]))
        graph.applied_seq = max(graph.applied_seq, last)

    def _check_ready(self) -> None:
        if not self._ready.is_set():
            raise NotReady("the index is still loading; retry shortly")

    # ================================================================== snapshots, compaction

    def snapshot_all(self) -> None:
        with self._snapshot_lock:
            for gen in list(self._generations.values()):
                graph = gen.graph
                if gen.snapshot_seq is not None and graph.applied_seq <= gen.snapshot_seq:
                    continue
                with graph.lock.read():
                    if gen.name not in self._generations:
                        continue
                    graph.save(gen.directory)
                    gen.snapshot_seq = graph.applied_seq
            seqs = [g.snapshot_seq for g in self._generations.values() if g.snapshot_seq is not None]
            if seqs and len(seqs) == len(self._generations):
                self.store.prune_changes(min(seqs))

    def _snapshot_loop(self) -> None:
        while not self._closed.wait(self.config.snapshot_interval):
            try:
                self.snapshot_all()
            except Exception:  # noqa: BLE001 - a failed snapshot is retried; the store stays the truth
                log.exception("snapshot failed")

    def _maybe_compact(self, gen: GenerationState) -> None:
        graph = gen.graph
        slots = graph.index.element_count
        if gen.compacting or slots < 1024 or graph.deleted_slots <= self.config.compact_fraction * slots:
            return
        gen.compacting = True
        thread = threading.Thread(target=self._compact, args=(gen,), name=f"compact-{gen.name}", daemon=True)
        thread.start()

    def _compact(self, gen: GenerationState) -> None:
        """Builds a fresh graph from the store beside the live one, catches it up, swaps it in."""
        try:
            fresh = self._build_from_store(gen.row)
            with self._write_lock:
                if self._generations.get(gen.name) is not gen:
                    return
                self._catch_up(gen.name, fresh)
                gen.graph = fresh
                gen.snapshot_seq = None
            log.info("graph compacted", extra={"generation": gen.name, "count": len(fresh)})
        except Exception:  # noqa: BLE001 - the old graph keeps serving; compaction is retried later
            log.exception("compaction failed", extra={"generation": gen.name})
        finally:
            gen.compacting = False

    # ================================================================== generations

    def _resolve(self, name: str) -> GenerationState:
        if name:
            gen = self._generations.get(name)
            if gen is None:
                known = ", ".join(sorted(self._generations)) or "none"
                raise NotFound(f"generation {name!r} does not exist (known: {known})")
            return gen
        active = self._active
        if active is None:
            raise FailedPrecondition(
                "no generation is active and the request names none; create and "
                "activate one (e.g. with `python -m indexer reindex`)"
            )
        return self._generations[active]

    def active_name(self) -> str | None:
        return self._active

    def generation_row(self, name: str = "") -> GenerationRow:
        """The generation a request naming ``name`` (empty: the active one) would use."""
        self._check_ready()
        return self._resolve(name).row

    def graph_figures(self) -> list[tuple[GenerationRow, int, int, int]]:
        """(row, vectors, deleted slots, memory bytes) per generation; cheap (no store access)."""
        return [
            (g.row, len(g.graph), g.graph.deleted_slots, g.graph.memory_bytes())
            for g in list(self._generations.values())
        ]

    def item_count(self) -> int:
        return len(self._catalogue.items)

    def create_generation(
        self,
        name: str,
        model_name: str,
        model_version: int,
        metric: int,
        dimension: int,
        m: int = 0,
        ef_construction: int = 0,
        ef_search: int = 0,
    ) -> GenerationInfo:
        self._check_ready()
        if not NAME_RE.match(name or ""):
            raise InvalidInput(f"generation name {name!r} must be 1..128 characters of [A-Za-z0-9._-]")
        if not model_name:
            raise InvalidInput("space.model_name is required")
        if model_version < 1:
            raise InvalidInput(f"space.model_version must be >= 1, got {model_version}")
        if metric not in METRICS:
            raise InvalidInput("metric must be METRIC_COSINE, METRIC_L2 or METRIC_INNER_PRODUCT")
        if not 1 <= dimension <= MAX_DIMENSION:
            raise InvalidInput(f"dimension must be 1..{MAX_DIMENSION}, got {dimension}")
        for label, value, lo, hi in (
            ("params.m", m, 2, 256),
            ("params.ef_construction", ef_construction, 1, MAX_EF),
            ("params.ef_search", ef_search, 1, MAX_EF),
        ):
            if value and not lo <= value <= hi:
                raise InvalidInput(f"{label} must be 0 (server default) or {lo}..{hi}, got {value}")
        c = self.config
        row = GenerationRow(
            name,
            model_name,
            int(model_version),
            int(metric),
            int(dimension),
            m or c.default_m,
            ef_construction or c.default_ef_construction,
            ef_search or c.default_ef_search,
            BUILDING,
            time.time(),
            None,
        )
        with self._write_lock:
            if name in self._generations:
                raise AlreadyExists(f"generation {name!r} already exists")
            directory = self._generation_dir(name)
            shutil.rmtree(directory, ignore_errors=True)  # leftovers of a dropped namesake
            self.store.create_generation(row)
            self._pending_cache.pop(name, None)
            graph = HnswGraph(self._params(row))
            graph.applied_seq = self.store.last_sequence()
            self._generations[name] = GenerationState(row, graph, directory)
        return self._info(self._generations[name])

    def get_generation(self, name: str = "") -> GenerationInfo:
        self._check_ready()
        if not name and self._active is None:
            raise NotFound("no generation is active")
        return self._info(self._resolve(name))

    def list_generations(self) -> list[GenerationInfo]:
        self._check_ready()
        gens = sorted(self._generations.values(), key=lambda g: (g.row.created_at, g.name), reverse=True)
        return [self._info(g) for g in gens]

    def activate_generation(
        self, name: str, allow_pending: bool = False, expected_active: str = ""
    ) -> GenerationInfo:
        self._check_ready()
        with self._write_lock:
            gen = self._resolve(name) if name else None
            if gen is None:
                raise InvalidInput("name of the generation to activate is required")
            if expected_active and expected_active != (self._active or ""):
                raise Aborted(
                    f"expected {expected_active!r} to be active but it is {self._active or 'none'!r}"
                )
            if self._active == name:
                return self._info(gen)
            pending = self.store.pending_count(name)
            if pending and not allow_pending:
                raise FailedPrecondition(
                    f"generation {name!r} has {pending} pending items (changed since their vector was "
                    "written); upsert them (see ListPending) or pass allow_pending"
                )
            previous = self._active
            now = time.time()
            self.store.activate(name, previous, now)
            if previous:
                old = self._generations[previous]
                old.row = _replace(old.row, state=RETIRED)
            gen.row = _replace(gen.row, state=ACTIVE, activated_at=now)
            self._active = name
        log.info("generation activated", extra={"generation": name, "previous": previous, "pending": pending})
        return self._info(gen)

    def drop_generation(self, name: str) -> None:
        self._check_ready()
        with self._write_lock:
            gen = self._resolve(name)
            if name == self._active:
                raise FailedPrecondition(
                    f"generation {name!r} is active; activate another one before dropping it"
                )
            self.store.drop_generation(name)
            del self._generations[name]
            self._pending_cache.pop(name, None)
            with self._snapshot_lock:
                remove_snapshot(gen.directory)
                shutil.rmtree(gen.directory, ignore_errors=True)

    def list_pending(
        self, generation: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ItemRow], str, int]:
        self._check_ready()
        if not generation:
            raise InvalidInput("generation is required")
        self._resolve(generation)
        size = page_size or 1000
        if not 1 <= size <= 10_000:
            raise InvalidInput(f"page_size must be 0..10000, got {page_size}")
        after = _decode_token(page_token)
        items = self.store.pending_page(generation, after, size + 1)
        more = len(items) > size
        items = items[:size]
        token = _encode_token(items[-1].id) if more else ""
        return items, token, self.store.pending_count(generation)

    def list_items(
        self, generation: str = "", page_size: int = 0, page_token: str = "", include_vectors: bool = False
    ):
        """(items with vectors or None, next token, generation row): one page in id order."""
        self._check_ready()
        gen = self._resolve(generation)
        size = page_size or 1000
        if not 1 <= size <= 10_000:
            raise InvalidInput(f"page_size must be 0..10000, got {page_size}")
        rows = self.store.items_page(gen.name, _decode_token(page_token), size + 1, include_vectors)
        more = len(rows) > size
        rows = rows[:size]
        return rows, (_encode_token(rows[-1][0].id) if more else ""), gen.row

    def _pending_count(self, name: str) -> int:
        # Counting is a join over the whole catalogue; the answer only changes with a write, so it
        # is cached per (generation, last sequence number) for GetGeneration/Stats callers.
        seq = self.store.last_sequence()
        cached = self._pending_cache.get(name)
        if cached is not None and cached[0] == seq:
            return cached[1]
        count = self.store.pending_count(name)
        self._pending_cache[name] = (seq, count)
        return count

    def _info(self, gen: GenerationState) -> GenerationInfo:
        graph = gen.graph
        return GenerationInfo(
            gen.row, len(graph), graph.deleted_slots, self._pending_count(gen.name), graph.memory_bytes()
        )

    # ================================================================== items

    def validate_item(self, item: ItemRow, where: str) -> None:
        check_item(item, where, self.config.shard_id, self.config.shard_count)

    def _check_ids(self, ids: Sequence[str]) -> None:
        """A non-empty list of valid ids within the batch limit (Delete and Get)."""
        if not ids:
            raise InvalidInput("ids must not be empty")
        self.check_batch(len(ids), "ids")
        for j, item_id in enumerate(ids):
            _check_id(item_id, f"ids[{j}]")

    def check_batch(self, n: int, what: str) -> None:
        if n > self.config.max_batch:
            raise InvalidInput(f"at most {self.config.max_batch} {what} per message (--max-batch), got {n}")

    def upsert(
        self,
        generation: str,
        records: Sequence[tuple[ItemRow, Sequence[float] | np.ndarray]],
        *,
        offset: int = 0,
    ) -> GenerationRow:
        """Validates and durably writes one message of records; returns the generation written."""
        self._check_ready()
        self.check_batch(len(records), "records")
        gen = self._resolve(generation)
        dim = gen.row.dimension
        cleaned: dict[str, tuple[ItemRow, np.ndarray]] = {}
        for j, (item, values) in enumerate(records):
            where = f"record {offset + j} (id {item.id[:64]!r})"
            self.validate_item(item, where)
            vector = np.asarray(values, dtype=np.float32)
            if vector.shape != (dim,):
                raise InvalidInput(
                    f"{where}: vector has {vector.size} values, generation {gen.name!r} "
                    f"expects dimension {dim}"
                )
            if not np.isfinite(vector).all():
                raise InvalidInput(f"{where}: vector contains NaN or infinite values")
            if gen.row.metric == 1 and not np.any(vector):
                raise InvalidInput(f"{where}: a zero vector has no cosine similarity")
            cleaned.pop(item.id, None)  # the last record of an id wins, in order
            cleaned[item.id] = (item, vector)
        if not cleaned:
            return gen.row
        with self._write_lock:
            if self._resolve(generation) is not gen:
                # The active generation changed (or this one was dropped and re-created) since the
                # records were validated against it: its dimension may differ.
                raise Aborted(f"generation {gen.name!r} stopped being the target during the write; retry")
            written = self.store.upsert(
                gen.name, list(cleaned.values()), bump_unchanged=(gen.name == self._active)
            )
            for w in written:
                self._catalogue.put(w.item)
            ids = [w.item.id for w in written]
            vectors = np.stack([v for _, v in cleaned.values()])
            graph = gen.graph
            for start in range(0, len(ids), APPLY_BATCH):
                with graph.lock.write():
                    graph.put(ids[start : start + APPLY_BATCH], vectors[start : start + APPLY_BATCH])
            graph.applied_seq = max(graph.applied_seq, written[-1].seq)
        return gen.row

    def delete(self, ids: Sequence[str], allow_missing: bool = False) -> tuple[int, list[str]]:
        self._check_ready()
        self._check_ids(ids)
        unique = list(dict.fromkeys(ids))
        with self._write_lock:
            missing = [i for i in unique if i not in self._catalogue.items]
            if missing and not allow_missing:
                raise NotFound(
                    f"{len(missing)} ids do not exist, nothing deleted (first: {missing[0]!r}); "
                    "pass allow_missing to delete the others"
                )
            present = [i for i in unique if i in self._catalogue.items]
            if not present:
                return 0, missing
            seq = self.store.delete(present)
            for gen in self._generations.values():
                graph = gen.graph
                for start in range(0, len(present), APPLY_BATCH):
                    with graph.lock.write():
                        graph.remove(present[start : start + APPLY_BATCH])
                graph.applied_seq = max(graph.applied_seq, seq)
                self._maybe_compact(gen)
            for item_id in present:
                self._catalogue.remove(item_id)
        return len(present), missing

    def get(self, ids: Sequence[str], generation: str = "", include_vectors: bool = False):
        """(items with vectors or None, generation row or None) in the order asked."""
        self._check_ready()
        self._check_ids(ids)
        gen = self._resolve(generation) if (generation or include_vectors or self._active) else None
        items = self.store.get_items(ids)
        missing = [i for i in ids if i not in items]
        if missing:
            raise NotFound(f"{len(missing)} of {len(ids)} ids do not exist (first: {missing[0]!r})")
        vectors = self.store.get_vectors(gen.name, ids) if (include_vectors and gen) else {}
        out = [(items[i], vectors[i][0] if i in vectors else None) for i in ids]
        return out, (gen.row if gen else None)

    # ================================================================== queries

    def knn(
        self,
        queries: np.ndarray | Sequence[Sequence[float]],
        k: int,
        *,
        generation: str = "",
        require_active: bool = False,
        item_filter: ItemFilter | None = None,
        ef: int = 0,
        min_score: float | None = None,
        exclude_ids: Sequence[str] = (),
    ) -> tuple[list[list[Hit]], GenerationRow]:
        self._check_ready()
        gen = self._resolve(generation)
        if require_active and generation and generation != self._active:
            raise Aborted(
                f"generation {generation!r} is no longer the active one "
                f"(active: {self._active or 'none'}); retry with the active generation"
            )
        if not 1 <= k <= self.config.max_k:
            raise InvalidInput(f"k must be 1..{self.config.max_k}, got {k}")
        if not 0 <= ef <= MAX_EF:
            raise InvalidInput(f"ef must be 0..{MAX_EF}, got {ef}")
        if min_score is not None and math.isnan(min_score):
            raise InvalidInput("min_score must not be NaN")
        q = _as_queries(queries, gen.row.dimension)
        self.check_batch(len(q), "queries")
        flt = item_filter or ItemFilter()
        _check_filter(flt)
        graph = gen.graph
        if ef and ef != gen.row.ef_search:
            # A search-width override is rare: it runs alone on the graph (see HnswGraph.custom_ef).
            with graph.lock.write(), graph.custom_ef(ef):
                ids, dists = self._search(gen, graph, q, k, flt, set(exclude_ids))
        else:
            with graph.lock.read():
                ids, dists = self._search(gen, graph, q, k, flt, set(exclude_ids))
        dists = np.asarray(dists, np.float32).reshape(len(q), -1)
        if gen.row.metric != 3:
            # Float rounding can give an item a distance of -1e-7 to itself; distances are >= 0.
            dists = np.maximum(dists, 0.0)
        score_rows = distances_to_scores(gen.row.metric, dists).tolist()
        items = self._catalogue.items
        results: list[list[Hit]] = []
        for row_ids, row_dists, row_scores in zip(ids, dists.tolist(), score_rows, strict=True):
            results.append(
                [
                    Hit(items.get(i) or ItemRow(i), d, sc)
                    for i, d, sc in zip(row_ids, row_dists, row_scores, strict=False)
                    if min_score is None or sc >= min_score
                ]
            )
        return results, gen.row

    def _search(
        self,
        gen: GenerationState,
        graph: HnswGraph,
        q: np.ndarray,
        k: int,
        flt: ItemFilter,
        exclude: set[str],
    ):
        live = len(graph)
        if live == 0:
            return [[] for _ in q], np.zeros((len(q), 0), np.float32)
        excluded_labels = {graph.label_of[i] for i in exclude if i in graph.label_of}
        if not flt:
            if live - len(excluded_labels) <= max(k, 256):
                return self._exact(gen, graph, q, k, [i for i in graph.label_of if i not in exclude])
            accept = None
            if excluded_labels:
                accept = lambda label: label not in excluded_labels  # noqa: E731
            return self._hnsw_or_exact(
                gen, graph, q, k, accept, lambda: [i for i in graph.label_of if i not in exclude]
            )
        if self._catalogue.estimate(flt) <= self.config.exact_threshold:
            return self._exact(gen, graph, q, k, self._candidates(graph, flt, exclude))
        items, id_of = self._catalogue.items, graph.id_of

        def accept(label: int) -> bool:
            item_id = id_of[label]
            return item_id is not None and label not in excluded_labels and flt.matches(items.get(item_id))

        return self._hnsw_or_exact(gen, graph, q, k, accept, lambda: self._candidates(graph, flt, exclude))

    def _candidates(self, graph: HnswGraph, flt: ItemFilter, exclude: set[str]) -> list[str]:
        return [i for i in self._catalogue.matching(flt) if i in graph.label_of and i not in exclude]

    def _hnsw_or_exact(
        self, gen, graph, q, k, accept: Callable[[int], bool] | None, candidates: Callable[[], list[str]]
    ):
        try:
            labels, dists = graph.search(q, k, accept)
        except RuntimeError:
            # hnswlib found fewer than k (deletes, a narrow filter): answer exactly instead.
            return self._exact(gen, graph, q, k, candidates())
        id_of = graph.id_of
        return [[id_of[label] for label in row] for row in labels.tolist()], dists

    def _exact(self, gen: GenerationState, graph: HnswGraph, q: np.ndarray, k: int, ids: list[str]):
        index = ExactIndex(gen.row.metric, ids, graph.vectors_of(ids))
        return index.search(q, k)

    # ================================================================== stats

    def stats(self) -> StatsInfo:
        self._check_ready()
        return StatsInfo(
            item_count=len(self._catalogue.items),
            active_generation=self._active or "",
            generations=self.list_generations(),
            store_bytes=self.store.size_bytes(),
            process_rss_bytes=_rss_bytes(),
            shard_id=self.config.shard_id,
            shard_count=self.config.shard_count,
            last_sequence=self.store.last_sequence(),
        )


# ====================================================================== helpers


def _replace(row: GenerationRow, **changes) -> GenerationRow:
    return GenerationRow(**{**row.__dict__, **changes})


def check_item(item: ItemRow, where: str, shard_id: int = 0, shard_count: int = 1) -> None:
    """Raises InvalidInput (bad fields) or FailedPrecondition (another shard's id) for one item."""
    _check_id(item.id, where)
    _check_text(item.uri, MAX_URI_BYTES, f"{where}: uri")
    _check_text(item.label, MAX_LABEL_BYTES, f"{where}: label")
    if len(item.attributes) > MAX_ATTRIBUTES:
        raise InvalidInput(f"{where}: at most {MAX_ATTRIBUTES} attributes, got {len(item.attributes)}")
    for key, value in item.attributes.items():
        if not key:
            raise InvalidInput(f"{where}: attribute keys must not be empty")
        _check_text(key, MAX_KEY_BYTES, f"{where}: attribute key {key[:40]!r}")
        _check_text(value, MAX_VALUE_BYTES, f"{where}: attribute {key[:40]!r} value")
    if shard_count > 1:
        owner = shard_of(item.id, shard_count)
        if owner != shard_id:
            raise FailedPrecondition(
                f"{where}: id {item.id!r} belongs to shard {owner} of {shard_count}, this is shard {shard_id}"
            )


def _check_id(item_id: str, where: str) -> None:
    size = len(item_id.encode("utf-8"))
    if not 1 <= size <= MAX_ID_BYTES:
        raise InvalidInput(f"{where}: id must be 1..{MAX_ID_BYTES} bytes of UTF-8, got {size} bytes")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in item_id):
        raise InvalidInput(f"{where}: id {item_id[:64]!r} contains control characters")


def _check_text(text: str, limit: int, where: str) -> None:
    size = len(text.encode("utf-8"))
    if size > limit:
        raise InvalidInput(f"{where} is {size} bytes, at most {limit} allowed")


def _check_filter(flt: ItemFilter) -> None:
    for j, (key, values) in enumerate(flt.attributes):
        if not key:
            raise InvalidInput(f"filter.attributes[{j}].key must not be empty")
        if not values:
            raise InvalidInput(f"filter.attributes[{j}] ({key!r}) needs at least one value")


def _as_queries(queries, dim: int) -> np.ndarray:
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


def _encode_token(last_id: str) -> str:
    return last_id.encode("utf-8").hex()


def _decode_token(token: str) -> str:
    if not token:
        return ""
    try:
        return bytes.fromhex(token).decode("utf-8")
    except ValueError as exc:
        raise InvalidInput("page_token is not a token returned by this service") from exc


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * (4096)
    except (OSError, ValueError, IndexError):
        return 0
