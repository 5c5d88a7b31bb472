"""ItemStore migrations: a database made before a column existed opens, its rows read as they meant."""

from __future__ import annotations

import sqlite3

from indexer.core import IndexerConfig, IndexerCore
from indexer.store import HNSW, PARTITIONS, ItemStore

# The generations table as the first release made it (before index_type, lists, probes).
OLD_GENERATIONS = """
CREATE TABLE generations (
    name TEXT PRIMARY KEY, model_name TEXT NOT NULL, model_version INTEGER NOT NULL,
    metric INTEGER NOT NULL, dimension INTEGER NOT NULL, m INTEGER NOT NULL,
    ef_construction INTEGER NOT NULL, ef_search INTEGER NOT NULL, state INTEGER NOT NULL,
    created_at REAL NOT NULL, activated_at REAL
);
INSERT INTO generations VALUES ('old', 'm', 1, 2, 4, 16, 200, 300, 2, 1.0, 2.0);
"""


def test_a_database_without_index_type_opens_and_reads_as_hnsw(tmp_path):
    path = tmp_path / "catalogue.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(OLD_GENERATIONS)
    conn.close()
    store = ItemStore(path)
    (row,) = store.generations()
    assert (row.name, row.index_type, row.lists, row.probes) == ("old", HNSW, 0, 0)
    store.close()
    ItemStore(path).close()  # migrating twice is a no-op
    core = IndexerCore(IndexerConfig(tmp_path))
    core.load()
    try:
        assert core.generation_row("old").index_type == HNSW
        info = core.create_generation("new", "m", 2, 2, 4, index_type=PARTITIONS, lists=8, probes=2)
        assert (info.row.index_type, info.row.lists, info.row.probes, info.partition_lists) == (
            PARTITIONS,
            8,
            2,
            1,
        )
    finally:
        core.close()
    reopened = {r.name: r for r in ItemStore(path).generations()}
    assert reopened["new"].index_type == PARTITIONS and reopened["new"].lists == 8
