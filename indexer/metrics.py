"""Prometheus figures of the index, read from the core at scrape time (no bookkeeping on the hot path)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily

from indexer.core import IndexerCore


class IndexCollector:
    """Items, per-generation vectors, deleted slots, graph memory and the last durable sequence."""

    def __init__(self, core: IndexerCore) -> None:
        self.core = core

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self.core.ready:
            return
        items = GaugeMetricFamily("cbir_indexer_items", "Live items in this shard's catalogue.")
        items.add_metric([], self.core.item_count())
        yield items
        vectors = GaugeMetricFamily(
            "cbir_indexer_generation_vectors",
            "Vectors in a generation's graph.",
            labels=["generation", "state"],
        )
        deleted = GaugeMetricFamily(
            "cbir_indexer_generation_deleted_slots",
            "Graph slots marked deleted and not yet reused or compacted.",
            labels=["generation"],
        )
        memory = GaugeMetricFamily(
            "cbir_indexer_generation_memory_bytes",
            "Estimated resident size of a generation's HNSW graph.",
            labels=["generation"],
        )
        states = {1: "building", 2: "active", 3: "retired", 4: "rejected"}
        for row, count, deleted_slots, memory_bytes in self.core.graph_figures():
            vectors.add_metric([row.name, states.get(row.state, "unknown")], count)
            deleted.add_metric([row.name], deleted_slots)
            memory.add_metric([row.name], memory_bytes)
        yield vectors
        yield deleted
        yield memory
