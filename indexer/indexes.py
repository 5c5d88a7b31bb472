"""The index types a generation can have (HNSW graph, partition scan) and the one place that picks one.

Both classes have the same interface and guarantees (indexer/graph.py's module docstring); the rest
of the indexer holds a :data:`GenerationIndex` and does not ask which it is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from indexer import graph, partitions
from indexer.graph import GraphParams, HnswGraph
from indexer.partitions import PartitionIndex, PartitionParams
from indexer.store import HNSW, PARTITIONS, GenerationRow, ItemRow

GenerationIndex = HnswGraph | PartitionIndex

# The spellings of --index-type, and back.
INDEX_TYPE_NAMES = {"hnsw": HNSW, "partitions": PARTITIONS}


def index_type_name(index_type: int) -> str:
    return {v: k for k, v in INDEX_TYPE_NAMES.items()}[index_type]


def new_index(row: GenerationRow, capacity: int) -> GenerationIndex:
    if row.index_type == PARTITIONS:
        return PartitionIndex(_partition_params(row), capacity)
    return HnswGraph(_graph_params(row), capacity)


def load_index(
    row: GenerationRow, directory: Path, row_of: Callable[[str], ItemRow | None]
) -> GenerationIndex:
    """The generation's snapshot; SnapshotError if it has none usable (see each class's ``load``)."""
    if row.index_type == PARTITIONS:
        return PartitionIndex.load(directory, _partition_params(row), row_of)
    return HnswGraph.load(directory, _graph_params(row), row_of)


def remove_snapshots(directory: Path) -> None:
    graph.remove_snapshot(directory)
    partitions.remove_snapshot(directory)


def _graph_params(row: GenerationRow) -> GraphParams:
    return GraphParams(row.metric, row.dimension, row.m, row.ef_construction, row.ef_search)


def _partition_params(row: GenerationRow) -> PartitionParams:
    return PartitionParams(row.metric, row.dimension, row.lists, row.probes)
