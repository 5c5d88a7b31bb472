"""The indexer's core: items, generations and k-NN over the store and the HNSW graphs. No gRPC here.

The pieces, each with one job: :mod:`indexer.store` (SQLite, the truth), :mod:`indexer.catalogue`
(items in memory and their inverted indexes), :mod:`indexer.graph` (one generation's HNSW graph and its
snapshots), :mod:`indexer.queries` (k-NN over one graph), :mod:`indexer.maintenance` (snapshots,
change-log pruning, compaction). This module owns the state they share and the rules for changing it
(indexer/README.md, "Concurrency"):

- One writer at a time (``_write_lock``) for everything derived from the store: requests (Upsert,
  Delete, generations) and background work (pruning, a compaction's swap) alike. A write commits to the
  store first, then applies to the catalogue and every graph before the lock is released, so at every
  release the memory equals the store. Capacity is reserved before the commit, so nothing but a bug can
  fail after it; if something does, the core stops answering (UNAVAILABLE) until a restart rebuilds it
  from the store, rather than answer from memory that disagrees with the store.
- Readers take one graph's read lock and build their whole answer under it (indexer/queries.py).
- Lock order: ``_snapshot_lock`` -> ``_write_lock`` -> a graph's lock -> the catalogue's -> the store's.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cbir.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidInput, NotFound, NotReady
from cbir.limits import (
    MAX_DIMENSION,
    MAX_EF,
    MAX_LISTS,
    check_batch,
    check_ef,
    check_filter,
    check_id,
    check_item_fields,
    check_k,
    check_min_score,
    check_probes,
)
from cbir.metric import Metric
from cbir.sharding import shard_of
from indexer import maintenance
from indexer.catalogue import Catalogue, ItemFilter
from indexer.graph import SnapshotError
from indexer.indexes import GenerationIndex, load_index, new_index, remove_snapshots
from indexer.queries import Hit, KnnQuery, PackedVectors, as_queries, search
from indexer.store import (
    ACTIVE,
    BUILDING,
    HNSW,
    PARTITIONS,
    REJECTED,
    RETIRED,
    VERDICT_PASSED,
    VERDICT_REJECTED,
    GenerationRow,
    ItemRow,
    ItemStore,
    RolloutRow,
)

__all__ = ["GenerationInfo", "Hit", "IndexerConfig", "IndexerCore", "ItemFilter", "StatsInfo", "check_item"]

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
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
    # Index type of a generation created without one (store.HNSW or store.PARTITIONS).
    default_index_type: int = HNSW
    # Filtered queries whose matching items are at most this many are answered by exact search.
    exact_threshold: int = 10_000
    # Unfiltered queries over at most max(k, this many) items are answered by exact search.
    exact_below: int = 256
    # Rebuild a graph once this fraction of its slots are deleted (and it has at least min slots).
    compact_fraction: float = 0.3
    compact_min_slots: int = 1024
    # Slots of a new generation's graph (it grows by half when full).
    initial_capacity: int = 1024
    snapshot_interval: float = 60.0
    # Train partition indexes in a background thread (False: inline, in the write that made it needed;
    # deterministic, for tests).
    train_in_background: bool = True


@dataclass
class GenerationState:
    """A generation in memory: its stored row, its current graph (swapped whole by a compaction) and
    what its snapshot on disk holds."""

    row: GenerationRow
    graph: GenerationIndex
    directory: Path
    # Sequence number the snapshot on disk is complete up to (None: no usable snapshot on disk), and
    # the graph object it was saved from (a compaction swaps in another one).
    disk_seq: int | None = None
    saved_graph: GenerationIndex | None = None
    # A compaction or a partition training runs (one background rebuild at a time).
    compacting: bool = False
    dropped: bool = False

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def metric(self) -> Metric:
        return Metric(self.row.metric)


@dataclass(frozen=True)
class GenerationInfo:
    """A generation with its figures, as answered to callers."""

    row: GenerationRow
    item_count: int
    deleted_slots: int
    pending_count: int
    memory_bytes: int
    rollout: RolloutRow | None = None
    partition_lists: int = 0  # lists the partition index holds now (0: HNSW)


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


class IndexerCore:
    """Items, generations and queries of one indexer shard."""

    def __init__(self, config: IndexerConfig, store: ItemStore | None = None):
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.store = store or ItemStore(self.data_dir / "catalogue.sqlite3")
        self.catalogue = Catalogue()
        self.log_holds = maintenance.LogHolds()
        self._write_lock = threading.RLock()
        self._snapshot_lock = threading.Lock()
        self._generations: dict[str, GenerationState] = {}
        self._active: str | None = None
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pending_cache: dict[str, tuple[int, int]] = {}
        self._broken: str | None = None
        # Called once if the memory stops agreeing with the store (the server reports NOT_SERVING).
        self.on_fatal: list[Callable[[str], None]] = []

    # ================================================================== lifecycle

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._broken is None

    def load(self) -> None:
        """Loads the catalogue and every graph (snapshot + replay, or rebuild). Blocks until done."""
        started = time.monotonic()
        self.catalogue.put(self.store.all_items())
        active = self.store.get_meta("active")
        pruned = self.store.pruned_through()
        for row in self.store.generations():
            self._generations[row.name] = self._load_generation(row, pruned)
        self._active = active if active in self._generations else None
        self._ready.set()
        for gen in list(self._generations.values()):
            self._maybe_train(gen)  # one that grew by the replay of the change log
        log.info(
            "index loaded",
            extra={
                "items": len(self.catalogue),
                "generations": len(self._generations),
                "active": self._active,
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    def start_background(self) -> None:
        """Periodic snapshots (and change-log pruning) until close()."""
        thread = threading.Thread(
            target=maintenance.run_periodically,
            args=(self._closed, self.config.snapshot_interval, self.snapshot_all, "snapshot"),
            name="indexer-snapshots",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)

    def close(self, snapshot: bool = True) -> None:
        self._closed.set()
        for thread in self._threads:
            thread.join(timeout=30)
        if snapshot and self.ready:
            self.snapshot_all()
        self.store.close()

    def snapshot_all(self) -> None:
        maintenance.snapshot_all(self)

    def _generation_dir(self, name: str) -> Path:
        return self.data_dir / "generations" / name

    def _load_generation(self, row: GenerationRow, pruned_through: int) -> GenerationState:
        directory = self._generation_dir(row.name)
        try:
            graph = load_index(row, directory, self.catalogue.get)
            if graph.applied_seq < pruned_through:
                raise SnapshotError(
                    f"snapshot at sequence {graph.applied_seq} is older than the change log, which "
                    f"starts after {pruned_through}"
                )
            disk_seq: int | None = graph.applied_seq
            log.info(
                "snapshot loaded",
                extra={"generation": row.name, "seq": graph.applied_seq, "count": len(graph)},
            )
        except SnapshotError as exc:
            log.warning("rebuilding graph from the store", extra={"generation": row.name, "reason": str(exc)})
            graph, disk_seq = self.build_from_store(row), None
        self.catch_up(row.name, graph)
        return GenerationState(row, graph, directory, disk_seq, graph if disk_seq is not None else None)

    def build_from_store(self, row: GenerationRow) -> GenerationIndex:
        """An index of every vector of the generation, read in one transaction; rows from the catalogue
        (re-linked by whoever makes the graph live, see maintenance.Compaction.finish). A partition
        index is trained here, before anyone else sees it."""
        count = self.store.vector_count(row.name)
        graph = new_index(row, capacity=int(count * 1.1) + self.config.initial_capacity)
        seq, batches = self.store.generation_snapshot(row.name)
        items = self.catalogue.items
        for ids, vectors in batches:
            graph.put(ids, vectors, [items.get(i) or ItemRow(i) for i in ids])
        graph.retrain()
        graph.applied_seq = graph.changed_seq = seq
        return graph

    def catch_up(self, name: str, graph: GenerationIndex) -> None:
        """Replays every change after ``graph.applied_seq`` (idempotent: applies the current state)."""
        last, ids = self.store.changed_since(name, graph.applied_seq)
        if ids:
            current = self.store.get_vectors(name, ids)
            items = self.catalogue.items
            for start in range(0, len(ids), APPLY_BATCH):
                part = ids[start : start + APPLY_BATCH]
                present = [i for i in part if i in current]
                with graph.lock.write():
                    graph.remove([i for i in part if i not in current])
                    if present:
                        graph.put(
                            present,
                            np.stack([current[i][0] for i in present]),
                            [items.get(i) or ItemRow(i) for i in present],
                        )
                    graph.changed_seq = max(graph.changed_seq, last)
        graph.applied_seq = max(graph.applied_seq, last)

    def _check_ready(self) -> None:
        if self._broken is not None:
            raise NotReady(
                f"the index stopped serving after an internal failure ({self._broken}); restart it"
            )
        if not self._ready.is_set():
            raise NotReady("the index is still loading; retry shortly")

    def _fatal(self, what: str) -> None:
        """The memory may disagree with the store: stop answering; a restart rebuilds from the store."""
        log.critical(
            "in-memory index no longer matches the store; refusing requests until restarted",
            extra={"error": what},
            exc_info=True,
        )
        self._broken = what
        for callback in self.on_fatal:
            callback(what)

    # ================================================================== compaction

    def _maybe_train(self, gen: GenerationState) -> None:
        """Starts a partition index's (re)training in the background once it has grown enough."""
        if gen.compacting or not gen.graph.needs_training:
            return
        gen.compacting = True
        training = maintenance.Training(gen)
        if not self.config.train_in_background:
            training.run()
            return
        thread = threading.Thread(target=training.run, name=f"train-{gen.name}", daemon=True)
        thread.start()

    def _maybe_compact(self, gen: GenerationState) -> None:
        graph = gen.graph
        slots = graph.slots
        c = self.config
        if gen.compacting or slots < c.compact_min_slots or graph.deleted_slots <= c.compact_fraction * slots:
            return
        gen.compacting = True
        compaction = maintenance.Compaction(self, gen)
        thread = threading.Thread(target=compaction.run, name=f"compact-{gen.name}", daemon=True)
        thread.start()

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
        return len(self.catalogue)

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
        index_type: int = 0,
        lists: int = 0,
        probes: int = 0,
    ) -> GenerationInfo:
        """A new generation; ``index_type`` 0 is the configured default, ``lists``/``probes`` 0 automatic."""
        self._check_ready()
        if not NAME_RE.match(name or ""):
            raise InvalidInput(f"generation name {name!r} must be 1..128 characters of [A-Za-z0-9._-]")
        if not model_name:
            raise InvalidInput("space.model_name is required")
        if model_version < 1:
            raise InvalidInput(f"space.model_version must be >= 1, got {model_version}")
        metric = Metric.from_value(metric)
        if not 1 <= dimension <= MAX_DIMENSION:
            raise InvalidInput(f"dimension must be 1..{MAX_DIMENSION}, got {dimension}")
        for label, value, lo, hi in (
            ("params.m", m, 2, 256),
            ("params.ef_construction", ef_construction, 1, MAX_EF),
            ("params.ef_search", ef_search, 1, MAX_EF),
        ):
            if value and not lo <= value <= hi:
                raise InvalidInput(f"{label} must be 0 (server default) or {lo}..{hi}, got {value}")
        index_type = index_type or self.config.default_index_type
        if index_type not in (HNSW, PARTITIONS):
            raise InvalidInput(
                f"index_type must be INDEX_TYPE_HNSW or INDEX_TYPE_PARTITIONS, got {index_type}"
            )
        for label, value in (("partition_params.lists", lists), ("partition_params.probes", probes)):
            if not 0 <= value <= MAX_LISTS:
                raise InvalidInput(f"{label} must be 0 (automatic) or 1..{MAX_LISTS}, got {value}")
            if value and index_type != PARTITIONS:
                raise InvalidInput(f"{label} applies to INDEX_TYPE_PARTITIONS generations only")
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
            index_type,
            lists,
            probes,
        )
        with self._write_lock:
            self._check_ready()
            if name in self._generations:
                raise AlreadyExists(f"generation {name!r} already exists")
            directory = self._generation_dir(name)
            shutil.rmtree(directory, ignore_errors=True)  # leftovers of a dropped namesake
            self.store.create_generation(row)
            self._pending_cache.pop(name, None)
            graph = new_index(row, capacity=c.initial_capacity)
            graph.applied_seq = graph.changed_seq = self.store.last_sequence()
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
            self._check_ready()
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
                old.row = replace(old.row, state=RETIRED)
            gen.row = replace(gen.row, state=ACTIVE, activated_at=now)
            self._active = name
        log.info("generation activated", extra={"generation": name, "previous": previous, "pending": pending})
        return self._info(gen)

    def drop_generation(self, name: str) -> None:
        self._check_ready()
        with self._write_lock:
            self._check_ready()
            gen = self._resolve(name)
            if name == self._active:
                raise FailedPrecondition(
                    f"generation {name!r} is active; activate another one before dropping it"
                )
            self.store.drop_generation(name)
            del self._generations[name]
            gen.dropped = True
            self._pending_cache.pop(name, None)
        # After the write lock (lock order): a snapshot of it that is running finishes first.
        with self._snapshot_lock:
            if name not in self._generations:
                remove_snapshots(gen.directory)
                shutil.rmtree(gen.directory, ignore_errors=True)

    def list_pending(
        self, generation: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ItemRow], str, int]:
        self._check_ready()
        if not generation:
            raise InvalidInput("generation is required")
        self._resolve(generation)
        size = _page_size(page_size)
        items = self.store.pending_page(generation, _decode_token(page_token), size + 1)
        more = len(items) > size
        items = items[:size]
        token = _encode_token(items[-1].id) if more else ""
        return items, token, self.store.pending_count(generation)

    def list_items(
        self, generation: str = "", page_size: int = 0, page_token: str = "", include_vectors: bool = False
    ) -> tuple[list[tuple[ItemRow, np.ndarray | None]], str, GenerationRow]:
        """(items with vectors or None, next token, generation row): one page in id order."""
        self._check_ready()
        gen = self._resolve(generation)
        size = _page_size(page_size)
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
            gen.row,
            len(graph),
            graph.deleted_slots,
            self._pending_count(gen.name),
            graph.memory_bytes(),
            self.store.rollout_of(gen.name),
            graph.lists,
        )

    # ================================================================== rollout decisions

    def record_rollout(self, row: RolloutRow) -> RolloutRow:
        """Stores the decision about a model version; a REJECTED one also rejects its generation."""
        self._check_ready()
        if not row.model_name:
            raise InvalidInput("decision.model_name is required")
        if row.model_version < 1:
            raise InvalidInput(f"decision.model_version must be >= 1, got {row.model_version}")
        if row.verdict not in (VERDICT_PASSED, VERDICT_REJECTED):
            raise InvalidInput("decision.verdict must be ROLLOUT_VERDICT_PASSED or ROLLOUT_VERDICT_REJECTED")
        if not row.generation:
            raise InvalidInput("decision.generation is required")
        for which, figures in (
            ("candidate_metrics", row.candidate_metrics),
            ("active_metrics", row.active_metrics),
        ):
            for name, value in figures.items():
                if not name or not math.isfinite(value):
                    raise InvalidInput(
                        f"decision.{which}: {name!r} = {value} (names non-empty, values finite)"
                    )
        with self._write_lock:
            gen = self._resolve(row.generation)
            reject = row.verdict == VERDICT_REJECTED
            if reject and gen.name == self._active:
                raise FailedPrecondition(
                    f"generation {gen.name!r} is active; activate another one before rejecting it"
                )
            self.store.record_rollout(row, reject_generation=reject)
            if reject:
                gen.row = replace(gen.row, state=REJECTED)
        log.info(
            "rollout decision recorded",
            extra={"generation": row.generation, "model_version": row.model_version, "verdict": row.verdict},
        )
        return row

    def list_rollouts(self, model_name: str = "") -> list[RolloutRow]:
        self._check_ready()
        return self.store.rollouts(model_name)

    # ================================================================== writes

    def validate_item(self, item: ItemRow, where: str) -> None:
        check_item(item, where, self.config.shard_id, self.config.shard_count)

    def _check_ids(self, ids: Sequence[str]) -> None:
        """A non-empty list of valid ids within the batch limit (Delete and Get)."""
        if not ids:
            raise InvalidInput("ids must not be empty")
        self.check_batch(len(ids), "ids")
        for j, item_id in enumerate(ids):
            check_id(item_id, f"ids[{j}]: id")

    def check_batch(self, n: int, what: str) -> None:
        check_batch(n, self.config.max_batch, what)

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
        cleaned = self._validated(gen, records, offset)
        if not cleaned:
            return gen.row
        with self._write_lock:
            self._check_ready()
            if self._resolve(generation) is not gen:
                # The active generation changed (or this one was dropped and re-created) since the
                # records were validated against it: its dimension may differ.
                raise Aborted(f"generation {gen.name!r} stopped being the target during the write; retry")
            graph = gen.graph
            with graph.lock.write():
                # Capacity first: after the commit, applying the write must not be able to fail.
                graph.reserve(sum(1 for i in cleaned if i not in graph.label_of))
            written = self.store.upsert(
                gen.name, list(cleaned.values()), bump_unchanged=(gen.name == self._active)
            )
            vectors = np.stack([v for _, v in cleaned.values()])
            # An item written unchanged (same content and revision, e.g. by a reindex) keeps the
            # catalogue's row object, which every graph shares.
            rows = [self._shared_row(w.item) for w in written]
            self._apply(self._apply_upsert, gen, rows, vectors, written[-1].seq)
        return gen.row

    def _validated(
        self,
        gen: GenerationState,
        records: Sequence[tuple[ItemRow, Sequence[float] | np.ndarray]],
        offset: int,
    ) -> dict[str, tuple[ItemRow, np.ndarray]]:
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
            if gen.metric is Metric.COSINE and not np.any(vector):
                raise InvalidInput(f"{where}: a zero vector has no cosine similarity")
            cleaned.pop(item.id, None)  # the last record of an id wins, in order
            cleaned[item.id] = (item, vector)
        return cleaned

    def _shared_row(self, row: ItemRow) -> ItemRow:
        current = self.catalogue.get(row.id)
        return current if current == row else row

    def _apply(self, change: Callable[..., None], *args: Any) -> None:
        """Applies a committed write to memory; a failure here means memory != store (see _fatal)."""
        try:
            change(*args)
        except Exception as exc:
            self._fatal(f"{type(exc).__name__}: {exc}")
            # The write is durable and will be served after the restart: acknowledge it.

    def _apply_upsert(self, gen: GenerationState, rows: list[ItemRow], vectors: np.ndarray, seq: int) -> None:
        self.catalogue.stage(rows)
        ids = [r.id for r in rows]
        graph = gen.graph
        for start in range(0, len(ids), APPLY_BATCH):
            end = start + APPLY_BATCH
            with graph.lock.write():
                graph.put(ids[start:end], vectors[start:end], rows[start:end])
                graph.changed_seq = seq
                if end >= len(ids):
                    graph.applied_seq = seq
        self._maybe_train(gen)
        for other in self._generations.values():
            if other is gen:
                continue
            changed = [r for r in rows if (old := other.graph.row_of(r.id)) is not None and old is not r]
            if changed:
                with other.graph.lock.write():
                    other.graph.set_rows(changed)
            other.graph.applied_seq = seq
        self.catalogue.put(rows)

    def delete(self, ids: Sequence[str], allow_missing: bool = False) -> tuple[int, list[str]]:
        self._check_ready()
        self._check_ids(ids)
        unique = list(dict.fromkeys(ids))
        with self._write_lock:
            self._check_ready()
            missing = [i for i in unique if i not in self.catalogue]
            if missing and not allow_missing:
                raise NotFound(
                    f"{len(missing)} ids do not exist, nothing deleted (first: {missing[0]!r}); "
                    "pass allow_missing to delete the others"
                )
            present = [i for i in unique if i in self.catalogue]
            if not present:
                return 0, missing
            seq = self.store.delete(present)
            self._apply(self._apply_delete, present, seq)
            for gen in self._generations.values():
                self._maybe_compact(gen)
        return len(present), missing

    def _apply_delete(self, ids: list[str], seq: int) -> None:
        for gen in self._generations.values():
            graph = gen.graph
            held = [i for i in ids if i in graph.label_of]
            for start in range(0, len(held), APPLY_BATCH):
                with graph.lock.write():
                    graph.remove(held[start : start + APPLY_BATCH])
                    graph.changed_seq = seq
            graph.applied_seq = seq
        self.catalogue.remove(ids)

    def get(
        self, ids: Sequence[str], generation: str = "", include_vectors: bool = False
    ) -> tuple[list[tuple[ItemRow, np.ndarray | None]], GenerationRow | None]:
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
        queries: np.ndarray | Sequence[np.ndarray | Sequence[float]] | PackedVectors,
        k: int,
        *,
        generation: str = "",
        require_active: bool = False,
        item_filter: ItemFilter | None = None,
        ef: int = 0,
        probes: int = 0,
        min_score: float | None = None,
        exclude_ids: Sequence[str] = (),
    ) -> tuple[list[list[Hit]], GenerationRow]:
        """``ef`` overrides an HNSW generation's search width, ``probes`` a partition one's; each
        index type ignores the other's (a client need not know the active generation's type)."""
        self._check_ready()
        gen = self._resolve(generation)
        if require_active and generation and generation != self._active:
            raise Aborted(
                f"generation {generation!r} is no longer the active one "
                f"(active: {self._active or 'none'}); retry with the active generation"
            )
        check_k(k, self.config.max_k)
        check_ef(ef)
        check_probes(probes)
        check_min_score(min_score)
        q = as_queries(queries, gen.row.dimension)
        self.check_batch(len(q), "queries")
        flt = item_filter or ItemFilter()
        check_filter(flt.labels, flt.attributes)
        query = KnnQuery(q, k, flt, ef, min_score, frozenset(exclude_ids), probes)
        c = self.config
        hits = search(gen.graph, gen.metric, query, self.catalogue, c.exact_threshold, c.exact_below)
        return hits, gen.row

    # ================================================================== stats

    def stats(self) -> StatsInfo:
        self._check_ready()
        return StatsInfo(
            item_count=len(self.catalogue),
            active_generation=self._active or "",
            generations=self.list_generations(),
            store_bytes=self.store.size_bytes(),
            process_rss_bytes=_rss_bytes(),
            shard_id=self.config.shard_id,
            shard_count=self.config.shard_count,
            last_sequence=self.store.last_sequence(),
        )


# ====================================================================== helpers


def check_item(item: ItemRow, where: str, shard_id: int = 0, shard_count: int = 1) -> None:
    """Raises InvalidInput (bad fields) or FailedPrecondition (another shard's id) for one item."""
    check_item_fields(item.id, item.uri, item.label, item.attributes, where)
    if shard_count > 1:
        owner = shard_of(item.id, shard_count)
        if owner != shard_id:
            raise FailedPrecondition(
                f"{where}: id {item.id!r} belongs to shard {owner} of {shard_count}, this is shard {shard_id}"
            )


def _page_size(page_size: int) -> int:
    size = page_size or 1000
    if not 1 <= size <= 10_000:
        raise InvalidInput(f"page_size must be 0..10000, got {page_size}")
    return size


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
