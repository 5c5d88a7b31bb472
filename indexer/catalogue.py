"""The catalogue in memory: every item of the store, with inverted indexes that size and list a filter.

Only the writer changes it (under the core's write lock); queries read it concurrently through its own
mutex. It is the *candidate source* for filtered exact searches, never the source of a hit's metadata:
a hit's id, label, uri and attributes come from the graph that found it (see indexer/graph.py).

While a write is being applied, the inverted indexes hold the item under both its old and its new
label and attributes (:meth:`stage` adds the new entries before the graphs change, :meth:`put` drops the
old ones after), so the candidates of a filter are a superset of what matches in any graph at any
moment; the query engine rechecks every candidate against its graph's own row.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from indexer.store import ItemRow


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


class Catalogue:
    """Items by id, and ids by label and by (attribute key, value)."""

    def __init__(self) -> None:
        self.items: dict[str, ItemRow] = {}
        self._by_label: dict[str, set[str]] = {}
        self._by_attribute: dict[tuple[str, str], set[str]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.items

    def get(self, item_id: str) -> ItemRow | None:
        return self.items.get(item_id)

    # ------------------------------------------------------------------ writer side

    def stage(self, rows: Iterable[ItemRow]) -> None:
        """Indexes the new rows' label and attributes, keeping the old ones (step 1 of a write)."""
        with self._lock:
            for row in rows:
                self._index(row)

    def put(self, rows: Iterable[ItemRow]) -> None:
        """Makes ``rows`` the items' current rows and forgets their old index entries (step 2)."""
        with self._lock:
            for row in rows:
                old = self.items.get(row.id)
                if old is not None and old is not row:
                    self._unindex(old, keep=row)
                self.items[row.id] = row
                self._index(row)

    def remove(self, ids: Iterable[str]) -> None:
        with self._lock:
            for item_id in ids:
                old = self.items.pop(item_id, None)
                if old is not None:
                    self._unindex(old)

    def _index(self, row: ItemRow) -> None:
        self._by_label.setdefault(row.label, set()).add(row.id)
        for pair in row.attributes.items():
            self._by_attribute.setdefault(pair, set()).add(row.id)

    def _unindex(self, old: ItemRow, keep: ItemRow | None = None) -> None:
        if keep is None or keep.label != old.label:
            _discard(self._by_label, old.label, old.id)
        for pair in old.attributes.items():
            if keep is None or keep.attributes.get(pair[0]) != pair[1]:
                _discard(self._by_attribute, pair, old.id)

    # ------------------------------------------------------------------ reader side

    def estimate(self, flt: ItemFilter) -> int:
        """An upper bound of how many items match."""
        with self._lock:
            bound = len(self.items)
            if flt.labels:
                bound = min(bound, sum(len(self._by_label.get(label, ())) for label in set(flt.labels)))
            for key, values in flt.attributes:
                bound = min(bound, sum(len(self._by_attribute.get((key, v), ())) for v in set(values)))
            return bound

    def candidates(self, flt: ItemFilter) -> set[str]:
        """Every id that may match (a superset while a write is applied; see the module docstring)."""
        with self._lock:
            result: set[str] | None = None
            if flt.labels:
                result = set().union(*(self._by_label.get(label, ()) for label in flt.labels))
            for key, values in flt.attributes:
                part = set().union(*(self._by_attribute.get((key, v), ()) for v in values))
                result = part if result is None else result & part
            return set(self.items) if result is None else result


K = TypeVar("K")


def _discard(index: dict[K, set[str]], key: K, item_id: str) -> None:
    ids = index.get(key)
    if ids is not None:
        ids.discard(item_id)
        if not ids:
            del index[key]
