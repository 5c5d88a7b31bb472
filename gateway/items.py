"""Catalogue browsing for the search page: a random sample of items, and where an item's image may be read.

Knows nothing about HTTP (gateway/http_api.py adapts it). Two rules keep the image route from becoming
a file server for anything else:
- a file is served only when its real path (symlinks resolved) lies under the configured catalogue
  root and it has an image suffix; a relative uri is read as the reindex CLI read it (relative to the
  working directory), then checked the same way;
- an http(s) uri is a redirect: the gateway never fetches URLs itself.
Everything else, including an item whose uri points elsewhere, is NOT_FOUND, with one message that
does not reveal whether the file exists.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np

from cbir.catalogue import IMAGE_SUFFIXES
from cbir.errors import InvalidInput, NotFound
from cbir.v1 import types_pb2
from gateway.search import Deadline, Indexer

MAX_SAMPLE = 100


@dataclass(frozen=True)
class ImageSource:
    """Exactly one of: a file under the catalogue root, or a URL to redirect to."""

    path: Path | None = None
    url: str | None = None


class CatalogueItems:
    """Random items and item images, read through the (sharded) indexer client."""

    def __init__(self, indexer: Indexer, catalogue_root: str | Path | None, *, seed: int | None = None):
        self._indexer = indexer
        self._root = Path(catalogue_root).resolve() if catalogue_root else None
        self._random = random.Random(seed)

    def sample(self, n: int, deadline: Deadline) -> list[types_pb2.Item]:
        """About ``n`` items near a random direction of the active generation's embedding space.

        One Knn call around a random unit vector: cheap at any catalogue size and spread over the
        whole catalogue (a different region each time), though items in dense regions come up more
        often than others. For the page's "random item", not for statistics.
        """
        if not 1 <= n <= MAX_SAMPLE:
            raise InvalidInput(f"n must be between 1 and {MAX_SAMPLE}, got {n}")
        generation = self._indexer.active_generation(
            timeout=deadline.timeout("reading the active generation")
        )
        direction = np.array([self._random.gauss(0.0, 1.0) for _ in range(generation.dimension)], np.float32)
        direction /= max(float(np.linalg.norm(direction)), 1e-12)
        response = self._indexer.knn(
            direction[None, :],
            n,
            generation=generation.name,
            require_active=False,
            timeout=deadline.timeout("sampling items"),
        )
        hits = response.results[0].hits if response.results else []
        return [
            types_pb2.Item(id=h.id, uri=h.uri, label=h.label, attributes=dict(h.attributes)) for h in hits
        ]

    def image_source(self, item_id: str, deadline: Deadline) -> ImageSource:
        """Where the item's catalogue image may be read from; NotFound for anything not allowed."""
        unavailable = NotFound(f"item {item_id!r} has no catalogue image this gateway may serve")
        try:
            records = self._indexer.get([item_id], timeout=deadline.timeout("reading the item"))
        except (NotFound, InvalidInput):
            raise NotFound(f"no catalogue item has id {item_id!r}") from None
        uri = records[0].item.uri if records else ""
        parts = urlsplit(uri)
        if parts.scheme in ("http", "https") and parts.netloc:
            return ImageSource(url=uri)
        if self._root is None or not uri:
            raise unavailable
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise unavailable
            raw = unquote(parts.path)
        elif parts.scheme and len(parts.scheme) > 1:
            raise unavailable  # another URL scheme (a one-letter "scheme" is a Windows drive)
        else:
            raw = uri
        try:
            path = Path(raw).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):
            raise unavailable from None
        if not path.is_relative_to(self._root) or not path.is_file():
            raise unavailable
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise unavailable
        return ImageSource(path=path)
