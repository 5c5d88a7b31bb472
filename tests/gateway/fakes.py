"""In-process fakes of the gateway's dependencies, answering with the real cbir.v1 protos.

FakeEmbedder follows embedder.client.EmbedderClient's interface (docs/architecture.md, Embedder client), FakeIndexer
follows indexer.client.IndexerClient's (docs/architecture.md, Indexer client) with an exact brute-force search, so the core's answers
can be checked exactly.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cbir.errors import Aborted, FailedPrecondition, InvalidInput, NotFound, NotReady
from cbir.v1 import indexer_pb2, types_pb2

DIM = 12


def fake_embedding(image: bytes, version: int) -> np.ndarray:
    """A deterministic embedding: a 2x2 thumbnail, shifted by the version (another space per version)."""
    try:
        pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB").resize((2, 2)), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - as Serving does: any decode failure is INVALID_ARGUMENT
        raise InvalidInput(f"image 0: cannot decode: {exc}") from None
    vector = pixels.ravel() - 128.0 + 40.0 * np.sin(np.arange(DIM) * version)
    return (vector / (np.linalg.norm(vector) or 1.0)).astype(np.float32)


@dataclass
class EmbedResult:
    vectors: np.ndarray
    model_name: str
    model_version: int


class FakeEmbedder:
    def __init__(self, model_name: str = "tiny", versions=(1,)):
        self.model_name = model_name
        self.versions = set(versions)
        self.calls: list[tuple[int, int]] = []  # (number of images, version)
        self.on_embed = None  # hook run before answering (to simulate concurrent activation)
        self.down = False
        self.reject: set[bytes] = set()  # images "the model graph" refuses (Pillow accepted them)
        self.delay = 0.0
        # Set when a call starts; while ``gate`` is set to an unset Event, calls wait for it (tests
        # order threads by these instead of by sleeping).
        self.entered = threading.Event()
        self.gate: threading.Event | None = None
        self.entered_with = 0  # images of the call that set ``entered`` last

    def embed(self, images, *, version=None, version_label=None, timeout=None):
        if self.down:
            raise NotReady("serving at fake:8500 is unreachable")
        if version not in self.versions:
            raise NotReady(
                f"model {self.model_name!r} version {version} is not available "
                f"(available: {sorted(self.versions)})"
            )
        for index, image in enumerate(images):
            if image in self.reject:
                raise InvalidInput(f"image {index}: the model cannot decode it")
        self.entered_with = len(images)
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        self.calls.append((len(images), version))
        if self.on_embed:
            hook, self.on_embed = self.on_embed, None
            hook()
        vectors = np.stack([fake_embedding(image, version) for image in images])
        return EmbedResult(vectors, self.model_name, version)

    def model_versions(self, timeout=None):
        if self.down:
            raise NotReady("serving at fake:8500 is unreachable")
        return {v: "AVAILABLE" for v in self.versions}


def _score(metric, a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


class FakeIndexer:
    """One or more 'shards' (only for shard_count); an exact search over all items of a generation."""

    def __init__(self, shard_count: int = 1):
        self.shard_count = shard_count
        self.items: dict[str, types_pb2.Item] = {}
        self.vectors: dict[str, dict[str, np.ndarray]] = {}  # generation -> id -> vector
        self.generations: dict[str, indexer_pb2.Generation] = {}
        self.active = ""
        self.down = False
        self.knn_calls = 0
        self.lock = threading.Lock()

    # -- setup helpers
    def add_generation(self, name, version, model_name="tiny", activate=True):
        self.generations[name] = indexer_pb2.Generation(
            name=name,
            space=types_pb2.EmbeddingSpace(model_name=model_name, model_version=version),
            metric=types_pb2.METRIC_COSINE,
            dimension=DIM,
        )
        self.vectors[name] = {}
        if activate:
            self.activate(name)

    def activate(self, name):
        for gen in self.generations.values():
            if gen.state == indexer_pb2.GENERATION_STATE_ACTIVE:
                gen.state = indexer_pb2.GENERATION_STATE_RETIRED
        self.generations[name].state = indexer_pb2.GENERATION_STATE_ACTIVE
        self.active = name

    def put(self, generation, item: types_pb2.Item, vector):
        self.items[item.id] = item
        self.vectors[generation][item.id] = np.asarray(vector, dtype=np.float32)
        self.generations[generation].item_count = len(self.vectors[generation])

    # -- the IndexerClient interface
    def _check(self):
        if self.down:
            raise NotReady("indexer shard 0 at fake:50052 is unreachable")

    def active_generation(self, timeout=None):
        self._check()
        if not self.active:
            raise FailedPrecondition("no active generation")
        out = indexer_pb2.Generation()
        out.CopyFrom(self.generations[self.active])
        return out

    def knn(
        self,
        queries,
        k,
        *,
        generation,
        require_active=True,
        filter=None,
        ef=0,
        min_score=None,
        exclude_ids=(),
        timeout=None,
    ):
        self._check()
        self.knn_calls += 1
        if generation not in self.generations:
            raise NotFound(f"generation {generation!r} not found")
        if require_active and generation != self.active:
            raise Aborted(f"generation {generation!r} is no longer active (active: {self.active!r})")
        gen = self.generations[generation]
        response = indexer_pb2.KnnResponse(
            generation=types_pb2.GenerationRef(name=gen.name, space=gen.space, metric=gen.metric)
        )
        for query in np.asarray(queries):
            scored = []
            for item_id, vector in self.vectors[generation].items():
                item = self.items[item_id]
                if item_id in exclude_ids or not _matches(item, filter):
                    continue
                score = _score(gen.metric, query, vector)
                if min_score is not None and score < min_score:
                    continue
                scored.append((score, item_id))
            scored.sort(key=lambda pair: (-pair[0], pair[1]))
            hits = [
                types_pb2.Hit(
                    id=i,
                    score=s,
                    distance=1 - s,
                    uri=self.items[i].uri,
                    label=self.items[i].label,
                    attributes=self.items[i].attributes,
                )
                for s, i in scored[:k]
            ]
            response.results.add().hits.extend(hits)
        return response

    def get(self, ids, *, generation="", include_vectors=False, timeout=None):
        self._check()
        generation = generation or self.active
        if generation not in self.generations:
            raise NotFound(f"generation {generation!r} not found")
        records = []
        for item_id in ids:
            if item_id not in self.items:
                raise NotFound(f"item {item_id!r} not found")
            vector = self.vectors[generation].get(item_id) if include_vectors else None
            records.append(
                indexer_pb2.Record(item=self.items[item_id], vector=[] if vector is None else vector.tolist())
            )
        return records

    def stats(self, timeout=None):
        self._check()
        return [
            indexer_pb2.StatsResponse(
                item_count=len(self.items),
                active_generation=self.active,
                generations=list(self.generations.values()),
                shard_id=s,
                shard_count=self.shard_count,
            )
            for s in range(self.shard_count)
        ]


def _matches(item, flt) -> bool:
    if flt is None:
        return True
    if flt.labels and item.label not in flt.labels:
        return False
    return all(item.attributes.get(c.key) in c.values for c in flt.attributes)
