"""Background work on the graphs: snapshots, change-log pruning and compaction, under the writer's rules.

Background work is not special: it changes shared state only the way a request does (see
"Concurrency" in indexer/README.md).

- A **snapshot** saves a graph under its read lock (queries go on) and records the sequence number
  the files contain; it changes no shared state but the generation's note of what is on disk.
- **Pruning** is a write: under the core's write lock it deletes change-log rows that no reader of the
  log can need any more: rows up to the oldest snapshot on disk (a restart replays what follows it)
  and, while a compaction runs, up to the sequence its fresh graph started from (its catch-up reads
  what follows). A generation with no snapshot on disk needs no rows: a restart rebuilds it from the
  vectors in the store.
- A **compaction** builds a fresh graph from the store beside the live one, catches it up from the
  change log without blocking writers, then, under the write lock, catches up the last few changes,
  re-links every row to the catalogue's current row and swaps the fresh graph in. Its steps are
  methods so that tests can interleave other work between them.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from indexer.indexes import GenerationIndex

if TYPE_CHECKING:
    from indexer.core import GenerationState, IndexerCore

log = logging.getLogger(__name__)


class LogHolds:
    """Sequence numbers below which the change log must be kept (one per running compaction)."""

    def __init__(self) -> None:
        self._holds: dict[int, int] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def add(self, seq: int) -> int:
        with self._lock:
            token = next(self._ids)
            self._holds[token] = seq
            return token

    def release(self, token: int) -> None:
        with self._lock:
            self._holds.pop(token, None)

    def floor(self) -> int | None:
        with self._lock:
            return min(self._holds.values(), default=None)


class Compaction:
    """Rebuilds one generation's graph without its deleted slots: start -> build -> catch_up -> finish."""

    def __init__(self, core: IndexerCore, gen: GenerationState):
        self.core = core
        self.gen = gen
        self.fresh: GenerationIndex | None = None
        self._hold: int | None = None

    def start(self) -> None:
        """Keeps the change log from the current sequence on (under the write lock, so no write is in
        between the number and the hold)."""
        with self.core._write_lock:
            self._hold = self.core.log_holds.add(self.core.store.last_sequence())

    def build(self) -> None:
        """The fresh graph from the store's vectors, read in one transaction (no lock held)."""
        self.fresh = self.core.build_from_store(self.gen.row)

    def catch_up(self) -> None:
        """Applies what changed since the build, while writers go on (the fresh graph is private)."""
        assert self.fresh is not None
        self.core.catch_up(self.gen.name, self.fresh)

    def finish(self) -> bool:
        """Under the write lock: last catch-up, rows re-linked, swap. False if the generation is gone."""
        assert self.fresh is not None
        core, gen, fresh = self.core, self.gen, self.fresh
        try:
            with core._write_lock:
                if core._generations.get(gen.name) is not gen:
                    return False
                core.catch_up(gen.name, fresh)
                # Rows read outside the lock may predate a write being applied then; under the lock
                # the catalogue equals the store, so every row is made the catalogue's own.
                items = core.catalogue.items
                fresh.rows = [None if row is None else items.get(row.id, row) for row in fresh.rows]
                gen.graph = fresh
            log.info("graph compacted", extra={"generation": gen.name, "count": len(fresh)})
            return True
        finally:
            self.release()

    def release(self) -> None:
        if self._hold is not None:
            self.core.log_holds.release(self._hold)
            self._hold = None

    def run(self) -> None:
        try:
            self.start()
            self.build()
            self.catch_up()
            self.finish()
        except Exception:  # noqa: BLE001 - the old graph keeps serving; compaction is retried later
            log.exception("compaction failed", extra={"generation": self.gen.name})
        finally:
            self.release()
            self.gen.compacting = False


class Training:
    """(Re)trains a partition index's lists beside the live index (PartitionIndex.retrain holds the
    read lock to copy, no lock for k-means, the write lock to install). Not the core's write lock:
    writers go on, and what they write meanwhile is re-assigned when the new lists are installed."""

    def __init__(self, gen: GenerationState):
        self.gen = gen

    def run(self) -> None:
        try:
            self.gen.graph.retrain()
        except Exception:  # noqa: BLE001 - the old lists keep serving; training is retried later
            log.exception("partition training failed", extra={"generation": self.gen.name})
        finally:
            self.gen.compacting = False


def snapshot_all(core: IndexerCore) -> None:
    """Saves every graph that changed since its last snapshot, then prunes the change log.

    A graph whose content did not change since its snapshot (only later writes to other generations
    passed) keeps its files; its manifest is moved forward to the sequence the graph is complete up to,
    so the log can be pruned past it without rewriting the graph.
    """
    with core._snapshot_lock:
        for gen in list(core._generations.values()):
            graph = gen.graph
            if gen.dropped:
                continue
            with graph.lock.read():
                changed, applied = graph.changed_seq, graph.applied_seq
            if gen.saved_graph is graph and gen.disk_seq is not None and changed <= gen.disk_seq:
                if applied > gen.disk_seq:
                    gen.disk_seq = graph.advance_snapshot(gen.directory, applied)
                continue
            gen.disk_seq = graph.save(gen.directory)
            gen.saved_graph = graph
        prune(core)


def prune(core: IndexerCore) -> None:
    """Deletes the change-log rows nobody can need (see the module docstring); a write."""
    with core._write_lock:
        floor = min(
            [core.store.last_sequence()]
            + [g.disk_seq for g in core._generations.values() if g.disk_seq is not None]
            + [h for h in (core.log_holds.floor(),) if h is not None]
        )
        if floor > core.store.pruned_through():
            core.store.prune_changes(floor)


def run_periodically(closed: threading.Event, interval: float, job: Callable[[], None], what: str) -> None:
    """Runs ``job`` every ``interval`` seconds until ``closed`` is set; a failure is logged and retried."""
    while not closed.wait(interval):
        try:
            job()
        except Exception:  # noqa: BLE001 - retried at the next interval; the store stays the truth
            log.exception(f"{what} failed")
