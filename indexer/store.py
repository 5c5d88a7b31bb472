"""The item store: SQLite as the durable source of truth for items, generations and vectors.

Layout (one database file, WAL journal, ``synchronous=FULL`` so a commit is on disk when it returns):

- ``items``: the catalogue shared by all generations; ``revision`` is the sequence number of the
  item's last change.
- ``vectors``: one vector per (generation, item), a float32 blob, with the item ``revision`` it
  reflects. A vector older than its item is *pending* (the item changed since it was embedded).
- ``changes``: the change log. Every write appends one row per item (``generation`` NULL for a
  delete, which touches every generation); its ``seq`` is the global sequence number. HNSW
  snapshots record the last ``seq`` they contain and a restart replays the rows after it.
- ``generations`` and ``meta`` (the active generation).
- ``rollouts``: the rollout controller's decision per (model name, model version); kept when the
  generation it names is dropped (the history of what was tried).

Every public write method runs in one transaction: all of it is durable, or none of it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar, cast

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    uri TEXT NOT NULL,
    label TEXT NOT NULL,
    attributes TEXT NOT NULL,
    revision INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS generations (
    name TEXT PRIMARY KEY,
    model_name TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    metric INTEGER NOT NULL,
    dimension INTEGER NOT NULL,
    m INTEGER NOT NULL,
    ef_construction INTEGER NOT NULL,
    ef_search INTEGER NOT NULL,
    state INTEGER NOT NULL,
    created_at REAL NOT NULL,
    activated_at REAL,
    index_type INTEGER NOT NULL DEFAULT 1,
    lists INTEGER NOT NULL DEFAULT 0,
    probes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS vectors (
    generation TEXT NOT NULL,
    id TEXT NOT NULL,
    vector BLOB NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (generation, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    generation TEXT,
    id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    model_name TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    generation TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (model_name, model_version)
);
CREATE INDEX IF NOT EXISTS rollouts_by_generation ON rollouts (generation);
"""

# Columns added after the first release: (table, column, definition). A database made before them
# gets them with their DEFAULT, which is what its rows meant (e.g. every old generation is HNSW).
MIGRATIONS = (
    ("generations", "index_type", "INTEGER NOT NULL DEFAULT 1"),
    ("generations", "lists", "INTEGER NOT NULL DEFAULT 0"),
    ("generations", "probes", "INTEGER NOT NULL DEFAULT 0"),
)

# Index types, numerically equal to indexer_pb2.IndexType.
HNSW, PARTITIONS = 1, 2
# Generation states, numerically equal to indexer_pb2.GenerationState (the core converts nothing).
BUILDING, ACTIVE, RETIRED, REJECTED = 1, 2, 3, 4
# Rollout verdicts, numerically equal to indexer_pb2.RolloutVerdict.
VERDICT_PASSED, VERDICT_REJECTED = 1, 2


@dataclass(frozen=True, slots=True)
class ItemRow:
    """A catalogue item as stored (slots: one is kept in memory per item)."""

    id: str
    uri: str = ""
    label: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    revision: int = 0

    def same_content(self, other: ItemRow) -> bool:
        return (self.uri, self.label, self.attributes) == (other.uri, other.label, other.attributes)


@dataclass(frozen=True)
class GenerationRow:
    """A generation as stored."""

    name: str
    model_name: str
    model_version: int
    metric: int
    dimension: int
    m: int
    ef_construction: int
    ef_search: int
    state: int
    created_at: float
    activated_at: float | None = None
    index_type: int = HNSW
    # Partition index parameters as requested (0: automatic lists / default probes).
    lists: int = 0
    probes: int = 0


@dataclass(frozen=True)
class RolloutRow:
    """A rollout decision as stored (the fields of indexer.proto's RolloutDecision; times in epoch seconds)."""

    model_name: str
    model_version: int
    generation: str
    verdict: int
    reason: str = ""
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    active_generation: str = ""
    active_model_version: int = 0
    active_metrics: dict[str, float] = field(default_factory=dict)
    evaluation_queries: int = 0
    started_at: float | None = None
    decided_at: float | None = None
    activated_at: float | None = None
    reindex_seconds: float = 0.0
    evaluation_seconds: float = 0.0
    activation_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RolloutRow:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class WrittenItem:
    """What an upsert did to one item: its new row, and whether its content changed."""

    item: ItemRow
    seq: int


class ItemStore:
    """SQLite-backed store.

    Thread-safe: write transactions run on one connection and are serialised by the store's own lock,
    so no caller can interleave two transactions on it; every thread reads through its own connection
    (WAL: readers see the last commit and never block the writer).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._connect()
        self._writer.executescript(SCHEMA)
        self._migrate()
        self._local = threading.local()
        self._lock = threading.Lock()

    def _migrate(self) -> None:
        for table, column, definition in MIGRATIONS:
            present = {row[1] for row in self._writer.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self._writer.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsync'ed at every commit, so an acknowledged write survives power loss.
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _reader(self) -> sqlite3.Connection:
        # One read connection per thread: WAL readers never block the writer or each other. Their
        # page caches are kept small: there is one per RPC thread, and reads are rare (Get, counts).
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA cache_size=-512")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        with self._lock:  # never under a transaction of another thread
            self._writer.close()

    # ------------------------------------------------------------------ reads

    def last_sequence(self, conn: sqlite3.Connection | None = None) -> int:
        row = (
            (conn or self._reader())
            .execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'")
            .fetchone()
        )
        return int(row[0]) if row else 0

    def all_items(self) -> Iterator[ItemRow]:
        for row in self._reader().execute("SELECT id, uri, label, attributes, revision FROM items"):
            yield ItemRow(row[0], row[1], row[2], json.loads(row[3]), row[4])

    def get_items(self, ids: Sequence[str]) -> dict[str, ItemRow]:
        return _items_in(self._reader(), ids)

    def get_vectors(self, generation: str, ids: Sequence[str]) -> dict[str, tuple[np.ndarray, int]]:
        found: dict[str, tuple[np.ndarray, int]] = {}
        conn = self._reader()
        for chunk in _chunks(list(ids), 500):
            marks = ",".join("?" * len(chunk))
            for row in conn.execute(
                f"SELECT id, vector, revision FROM vectors WHERE generation = ? AND id IN ({marks})",
                [generation, *chunk],
            ):
                found[row[0]] = (np.frombuffer(row[1], dtype=np.float32), row[2])
        return found

    def generation_snapshot(
        self, generation: str, batch: int = 10_000
    ) -> tuple[int, Iterator[tuple[list[str], np.ndarray]]]:
        """The last sequence and every vector of a generation, read in ONE consistent transaction.

        The iterator must be consumed fully (it ends the transaction).
        """
        conn = self._connect()
        conn.execute("BEGIN")
        seq = self.last_sequence(conn)

        def rows() -> Iterator[tuple[list[str], np.ndarray]]:
            try:
                cursor = conn.execute("SELECT id, vector FROM vectors WHERE generation = ?", (generation,))
                while True:
                    part = cursor.fetchmany(batch)
                    if not part:
                        return
                    ids = [r[0] for r in part]
                    yield (
                        ids,
                        np.frombuffer(b"".join(r[1] for r in part), dtype=np.float32).reshape(len(ids), -1),
                    )
            finally:
                conn.execute("COMMIT")
                conn.close()

        return seq, rows()

    def changed_since(self, generation: str, seq: int) -> tuple[int, list[str]]:
        """Ids whose vector in ``generation`` (or whose existence) changed after ``seq``; and the last
        seq, read in one transaction."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            last = self.last_sequence(conn)
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT id FROM changes WHERE seq > ? AND (generation = ? OR generation IS NULL)",
                    (seq, generation),
                )
            ]
        finally:
            conn.execute("COMMIT")
        return last, ids

    def pruned_through(self) -> int:
        """Change-log rows up to this sequence number have been pruned (0: none)."""
        value = self.get_meta("pruned_through")
        return int(value) if value else 0

    def generations(self) -> list[GenerationRow]:
        rows = (
            self._reader()
            .execute(
                "SELECT name, model_name, model_version, metric, dimension, m, ef_construction, ef_search,"
                " state, created_at, activated_at, index_type, lists, probes FROM generations ORDER BY created_at DESC, name DESC"
            )
            .fetchall()
        )
        return [GenerationRow(*r) for r in rows]

    # sqlite3 rows are untyped: the counts are read into annotated names.
    def item_count(self) -> int:
        count: int = self._reader().execute("SELECT COUNT(*) FROM items").fetchone()[0]
        return count

    def vector_count(self, generation: str) -> int:
        count: int = (
            self._reader()
            .execute("SELECT COUNT(*) FROM vectors WHERE generation = ?", (generation,))
            .fetchone()[0]
        )
        return count

    def pending_count(self, generation: str) -> int:
        count: int = (
            self._reader()
            .execute(
                "SELECT COUNT(*) FROM items i LEFT JOIN vectors v ON v.generation = ? AND v.id = i.id"
                " WHERE v.id IS NULL OR v.revision < i.revision",
                (generation,),
            )
            .fetchone()[0]
        )
        return count

    def pending_page(self, generation: str, after: str, limit: int) -> list[ItemRow]:
        rows = (
            self._reader()
            .execute(
                "SELECT i.id, i.uri, i.label, i.attributes, i.revision FROM items i"
                " LEFT JOIN vectors v ON v.generation = ? AND v.id = i.id"
                " WHERE (v.id IS NULL OR v.revision < i.revision) AND i.id > ? ORDER BY i.id LIMIT ?",
                (generation, after, limit),
            )
            .fetchall()
        )
        return [ItemRow(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]

    def items_page(
        self, generation: str, after: str, limit: int, include_vectors: bool
    ) -> list[tuple[ItemRow, np.ndarray | None]]:
        """Items with a vector in ``generation``, in id order, after id ``after``."""
        rows = (
            self._reader()
            .execute(
                "SELECT i.id, i.uri, i.label, i.attributes, i.revision, v.vector FROM vectors v"
                " JOIN items i ON i.id = v.id WHERE v.generation = ? AND v.id > ? ORDER BY v.id LIMIT ?",
                (generation, after, limit),
            )
            .fetchall()
        )
        return [
            (
                ItemRow(r[0], r[1], r[2], json.loads(r[3]), r[4]),
                np.frombuffer(r[5], dtype=np.float32) if include_vectors else None,
            )
            for r in rows
        ]

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                total += p.stat().st_size
        return total

    def rollouts(self, model_name: str = "") -> list[RolloutRow]:
        """Recorded rollout decisions (of one model, or all), newest model version first."""
        rows = (
            self._reader()
            .execute(
                "SELECT record FROM rollouts WHERE ? = '' OR model_name = ?"
                " ORDER BY model_version DESC, model_name",
                (model_name, model_name),
            )
            .fetchall()
        )
        return [RolloutRow.from_json(r[0]) for r in rows]

    def rollout_of(self, generation: str) -> RolloutRow | None:
        """The latest decision naming ``generation``, if any."""
        row = (
            self._reader()
            .execute(
                "SELECT record FROM rollouts WHERE generation = ? ORDER BY model_version DESC LIMIT 1",
                (generation,),
            )
            .fetchone()
        )
        return RolloutRow.from_json(row[0]) if row else None

    def get_meta(self, key: str) -> str | None:
        row = self._reader().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------ writes

    def _transaction(self) -> _Transaction:
        return _Transaction(self._writer, self._lock)

    def upsert(
        self,
        generation: str,
        records: Sequence[tuple[ItemRow, np.ndarray]],
        *,
        bump_unchanged: bool,
    ) -> list[WrittenItem]:
        """Writes items and their vectors in ``generation`` in one transaction.

        An item's revision moves to a new sequence number when it is new, its content changed, or
        ``bump_unchanged`` (a write to the active generation is a change of the item: other
        generations' vectors of it become pending). Otherwise the vector is stamped with the
        item's current revision, so reindexing an unchanged item leaves other generations current.
        """
        written: list[WrittenItem] = []
        with self._transaction() as conn:
            existing = _items_in(conn, [item.id for item, _ in records])
            for item, vector in records:
                cur = conn.execute(
                    "INSERT INTO changes (generation, id) VALUES (?, ?)", (generation, item.id)
                )
                seq = cast(int, cur.lastrowid)  # an INSERT sets it
                old = existing.get(item.id)
                if old is None or bump_unchanged or not old.same_content(item):
                    revision = seq
                    conn.execute(
                        "INSERT INTO items (id, uri, label, attributes, revision) VALUES (?, ?, ?, ?, ?)"
                        " ON CONFLICT(id) DO UPDATE SET uri = excluded.uri, label = excluded.label,"
                        " attributes = excluded.attributes, revision = excluded.revision",
                        (
                            item.id,
                            item.uri,
                            item.label,
                            json.dumps(item.attributes, sort_keys=True),
                            revision,
                        ),
                    )
                else:
                    revision = old.revision
                conn.execute(
                    "INSERT OR REPLACE INTO vectors (generation, id, vector, revision) VALUES (?, ?, ?, ?)",
                    (generation, item.id, np.ascontiguousarray(vector, dtype=np.float32).tobytes(), revision),
                )
                row = ItemRow(item.id, item.uri, item.label, dict(item.attributes), revision)
                existing[item.id] = row
                written.append(WrittenItem(row, seq))
        return written

    def delete(self, ids: Sequence[str]) -> int:
        """Removes items and all their vectors; returns the last sequence number written."""
        with self._transaction() as conn:
            seq = 0
            for item_id in ids:
                seq = cast(
                    int,  # an INSERT sets lastrowid
                    conn.execute(
                        "INSERT INTO changes (generation, id) VALUES (NULL, ?)", (item_id,)
                    ).lastrowid,
                )
                conn.execute("DELETE FROM items WHERE id = ?", (item_id,))
                conn.execute("DELETE FROM vectors WHERE id = ?", (item_id,))
        return seq

    def create_generation(self, row: GenerationRow) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO generations (name, model_name, model_version, metric, dimension, m,"
                " ef_construction, ef_search, state, created_at, activated_at, index_type, lists, probes)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.name,
                    row.model_name,
                    row.model_version,
                    row.metric,
                    row.dimension,
                    row.m,
                    row.ef_construction,
                    row.ef_search,
                    row.state,
                    row.created_at,
                    row.activated_at,
                    row.index_type,
                    row.lists,
                    row.probes,
                ),
            )

    def activate(self, name: str, previous: str | None, when: float) -> None:
        with self._transaction() as conn:
            if previous:
                conn.execute("UPDATE generations SET state = ? WHERE name = ?", (RETIRED, previous))
            conn.execute(
                "UPDATE generations SET state = ?, activated_at = ? WHERE name = ?", (ACTIVE, when, name)
            )
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('active', ?)", (name,))

    def drop_generation(self, name: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM vectors WHERE generation = ?", (name,))
            conn.execute("DELETE FROM changes WHERE generation = ?", (name,))
            conn.execute("DELETE FROM generations WHERE name = ?", (name,))

    def record_rollout(self, row: RolloutRow, *, reject_generation: bool) -> None:
        """Writes (replaces) the decision about ``row``'s model version; optionally marks its generation REJECTED."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO rollouts (model_name, model_version, generation, record)"
                " VALUES (?, ?, ?, ?)",
                (row.model_name, row.model_version, row.generation, row.to_json()),
            )
            if reject_generation:
                conn.execute("UPDATE generations SET state = ? WHERE name = ?", (REJECTED, row.generation))

    def prune_changes(self, up_to: int) -> None:
        """Forgets change-log rows up to ``up_to``; remembers how far, so that a snapshot older than
        that is rebuilt from the vectors instead of replayed from a log that no longer has its rows."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM changes WHERE seq <= ?", (up_to,))
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('pruned_through', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                (str(up_to),),
            )


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on error) on the writer connection, holding the lock."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock):
        self.conn = conn
        self.lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                try:
                    self.conn.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT leaves the transaction open (e.g. SQLITE_BUSY): undo it, so the
                    # write is either whole or absent and the connection is usable again.
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
            elif self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        finally:
            self.lock.release()


def _items_in(conn: sqlite3.Connection, ids: Sequence[str]) -> dict[str, ItemRow]:
    found: dict[str, ItemRow] = {}
    for chunk in _chunks(list(ids), 500):
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(
            f"SELECT id, uri, label, attributes, revision FROM items WHERE id IN ({marks})", chunk
        ):
            found[row[0]] = ItemRow(row[0], row[1], row[2], json.loads(row[3]), row[4])
    return found


T = TypeVar("T")


def _chunks(values: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
