"""The search core: validate queries, embed in the active generation's space, ask the shards, never mix spaces.

Knows nothing about gRPC: the servicer (gateway/server.py) converts protos to :class:`Query` and back,
and the shared interceptor maps the domain errors raised here to status codes.

Consistency (docs/architecture.md, Embedding space). A search
1. reads the active generation G from shard 0 (cached for ``generation_ttl`` seconds),
2. embeds image queries with Serving pinned to G's model version (never "latest"),
3. asks every shard for neighbours in G *by name*, with ``require_active`` so shard 0 answers ABORTED
   if G stopped being the active generation in the meantime,
4. on ABORTED (or when the pinned version vanished from Serving because the active generation moved
   on) re-reads the active generation and starts again, at most ``generation_retries`` times.
So every answer is computed in exactly one space, and that space is the one reported.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np

from cbir.errors import (
    Aborted,
    CbirError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    NotReady,
)
from cbir.limits import check_ef, check_filter, check_id, check_k, check_min_score
from cbir.v1 import indexer_pb2, types_pb2
from gateway import metrics
from gateway.coalesce import Coalescer, QueriesRejected
from gateway.images import DecodeBudget, ImageLimits, explain_undecodable, prepare_image


class Embedding(Protocol):
    """What the core reads of embedder.client.EmbedResult."""

    @property
    def vectors(self) -> np.ndarray: ...

    @property
    def model_version(self) -> int: ...


class Embedder(Protocol):
    """What the core needs from embedder.client.EmbedderClient (docs/architecture.md, Embedder client)."""

    def embed(
        self, images: Sequence[bytes], *, version: int | None = None, timeout: float | None = None
    ) -> Embedding: ...

    def model_versions(self, timeout: float | None = None) -> dict[int, str]: ...


class Indexer(Protocol):
    """What the core needs from indexer.client.IndexerClient (docs/architecture.md, Indexer client)."""

    @property
    def shard_count(self) -> int: ...

    def active_generation(self, timeout: float | None = None) -> indexer_pb2.Generation: ...

    def knn(
        self,
        queries: np.ndarray,
        k: int,
        *,
        generation: str,
        require_active: bool = True,
        filter: types_pb2.Filter | None = None,
        ef: int = 0,
        min_score: float | None = None,
        exclude_ids: Sequence[str] = (),
        timeout: float | None = None,
    ) -> indexer_pb2.KnnResponse: ...

    def get(
        self,
        ids: Sequence[str],
        *,
        generation: str = "",
        include_vectors: bool = False,
        timeout: float | None = None,
    ) -> list[indexer_pb2.Record]: ...

    def stats(self, timeout: float | None = None) -> list[indexer_pb2.StatsResponse]: ...


@dataclass(frozen=True)
class SearchLimits:
    """Request limits and retry policy (the gateway's flags)."""

    max_k: int = 1000
    default_k: int = 10
    max_batch: int = 64
    images: ImageLimits = field(default_factory=ImageLimits)
    # Redoing a search after the active generation changed; more than a couple in a row means
    # generations are being activated faster than a search takes, which is an operator problem.
    generation_retries: int = 3
    # How long the active generation read from shard 0 is reused. Staleness is safe (require_active
    # turns it into one retry); it only saves a round trip per search.
    generation_ttl: float = 1.0
    # Upper bound for each dependency call when the caller sent no deadline.
    dependency_timeout: float = 10.0
    # Merge concurrent image searches into shared Serving/Knn calls (gateway/coalesce.py), with at
    # most this many merged batches in flight at once (0 disables merging).
    coalesce_in_flight: int = 1


@dataclass(frozen=True)
class Query:
    """One search: exactly one of ``image`` / ``item_id``; k == 0 means the default."""

    image: bytes | None = None
    item_id: str | None = None
    k: int = 0
    filter: types_pb2.Filter | None = None
    min_score: float | None = None
    ef: int = 0


@dataclass(frozen=True)
class SearchResult:
    hits: list[types_pb2.Hit]
    generation: types_pb2.GenerationRef


@dataclass(frozen=True)
class ServingInfo:
    generation: types_pb2.GenerationRef
    item_count: int
    dimension: int
    shard_count: int
    available_model_versions: list[int]


class Deadline:
    """Absolute deadline of the incoming call; hands each dependency call the time that is left."""

    def __init__(self, seconds: float | None, cap: float, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._end = None if seconds is None else clock() + seconds
        self._cap = cap

    def remaining(self) -> float | None:
        """Seconds left (never negative), or None without a deadline."""
        return None if self._end is None else max(0.0, self._end - self._clock())

    @staticmethod
    def latest(deadlines: Sequence[Deadline]) -> Deadline:
        """The most generous of several deadlines (for work done on behalf of all of them)."""
        if any(d._end is None for d in deadlines):
            return deadlines[[d._end for d in deadlines].index(None)]
        return max(deadlines, key=lambda d: cast(float, d._end))  # none is None here

    def timeout(self, before: str) -> float:
        """Seconds for the next dependency call; DeadlineExceeded if nothing is left."""
        if self._end is None:
            return self._cap
        left = self._end - self._clock()
        if left <= 0.001:
            raise DeadlineExceeded(f"the request's deadline expired before {before}; allow more time")
        return min(left, self._cap)


@dataclass(frozen=True)
class _Prepared(Query):
    """A validated query (k resolved, the image as it will be embedded) and its place in the batch."""

    index: int = 0


def generation_ref(generation: indexer_pb2.Generation) -> types_pb2.GenerationRef:
    return types_pb2.GenerationRef(name=generation.name, space=generation.space, metric=generation.metric)


class SearchCore:
    """Search, batch search and serving info over an embedder factory and a (sharded) indexer client."""

    def __init__(
        self,
        embedder_for: Callable[[str], Embedder],
        indexer: Indexer,
        limits: SearchLimits = SearchLimits(),
        *,
        model_name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._embedder_for = embedder_for
        self._indexer = indexer
        self.limits = limits
        self._model_name = model_name
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, indexer_pb2.Generation] | None = None
        # Shared by every request, so concurrent large decodes cannot together exceed it.
        self._decode_budget = DecodeBudget(limits.images.max_decode_bytes_in_flight)
        self._coalescer = (
            Coalescer(
                self._run_renumbered,
                Deadline.latest,
                max_batch=limits.max_batch,
                max_in_flight=limits.coalesce_in_flight,
            )
            if limits.coalesce_in_flight > 0
            else None
        )

    # ----------------------------------------------------------------------------- public API

    def deadline(self, seconds: float | None) -> Deadline:
        return Deadline(seconds, self.limits.dependency_timeout, self._clock)

    def search(self, query: Query, deadline: Deadline) -> SearchResult:
        prepared = self._validate(query, 0, "", deadline)
        if self._coalescer is not None and prepared.image is not None:
            return self._coalescer.submit(prepared, deadline)
        return self._run([prepared], deadline)[0]

    def batch_search(
        self, queries: Sequence[Query], deadline: Deadline
    ) -> tuple[list[SearchResult], types_pb2.GenerationRef]:
        if not queries:
            raise InvalidInput("BatchSearch needs at least one query")
        if len(queries) > self.limits.max_batch:
            raise InvalidInput(
                f"BatchSearch has {len(queries)} queries, more than the gateway's limit of "
                f"{self.limits.max_batch} (--max-batch); split it"
            )
        prepared = [self._validate(q, i, f"queries[{i}]: ", deadline) for i, q in enumerate(queries)]
        results = self._run(prepared, deadline)
        return results, results[0].generation

    def serving_info(self, deadline: Deadline) -> ServingInfo:
        generation = self._active_generation(deadline, refresh=True)
        stats = self._indexer.stats(timeout=deadline.timeout("reading shard statistics"))
        item_count = sum(
            g.item_count for shard in stats for g in shard.generations if g.name == generation.name
        )
        embedder = self._embedder(generation)
        versions = embedder.model_versions(timeout=deadline.timeout("asking Serving for model versions"))
        available = sorted(v for v, state in versions.items() if str(state).upper().endswith("AVAILABLE"))
        return ServingInfo(
            generation=generation_ref(generation),
            item_count=item_count,
            dimension=generation.dimension,
            shard_count=self._indexer.shard_count,
            available_model_versions=available,
        )

    def active_generation(self, timeout: float) -> indexer_pb2.Generation:
        """The active generation, fresh from shard 0 (used by the health prober)."""
        return self._active_generation(Deadline(timeout, timeout, self._clock), refresh=True)

    # ----------------------------------------------------------------------------- validation

    def _validate(self, query: Query, index: int, where: str, deadline: Deadline) -> _Prepared:
        try:
            return self._validate_one(query, index, deadline)
        except CbirError as exc:
            if not where:
                raise
            # Same status, message naming the offending query of the batch.
            raise type(exc)(where + exc.message) from None

    def _validate_one(self, query: Query, index: int, deadline: Deadline) -> _Prepared:
        limits = self.limits
        k = check_k(query.k, limits.max_k, default=limits.default_k)
        check_ef(query.ef)
        check_min_score(query.min_score)
        _validate_filter(query.filter)
        if (query.image is None) == (query.item_id is None):
            raise InvalidInput("set exactly one of image (encoded bytes) or item_id")
        image = None
        if query.image is not None:
            with metrics.stage("decode"):
                # Header checks only: the model graph decodes the pixels (once; see gateway/images.py).
                prepared = prepare_image(
                    query.image,
                    limits.images,
                    self._decode_budget,
                    timeout=deadline.timeout("decoding the query image"),
                    decode=False,
                )
            if prepared.reencoded:
                metrics.REENCODED_IMAGES.labels(prepared.reason.split(":")[0]).inc()
            image = prepared.data
        else:
            check_id(cast(str, query.item_id), "item_id")  # exactly one of image and item_id is set
        return _Prepared(
            image=image,
            item_id=query.item_id,
            k=k,
            filter=query.filter,
            min_score=query.min_score,
            ef=query.ef,
            index=index,
        )

    # ----------------------------------------------------------------------------- the search loop

    def _run_renumbered(self, prepared: list[_Prepared], deadline: Deadline) -> list[SearchResult]:
        """Runs searches of different callers together (each was validated as query 0)."""
        return self._run([dataclasses.replace(p, index=i) for i, p in enumerate(prepared)], deadline)

    def _run(self, prepared: list[_Prepared], deadline: Deadline) -> list[SearchResult]:
        refresh = False
        for attempt in range(self.limits.generation_retries + 1):
            generation = self._active_generation(deadline, refresh=refresh)
            try:
                return self._search_in(generation, prepared, deadline)
            except _GenerationMoved:
                metrics.GENERATION_RETRIES.inc()
                refresh = True
                if attempt == self.limits.generation_retries:
                    break
        raise Aborted(
            f"the active index generation changed {self.limits.generation_retries + 1} times during this "
            "search; retry"
        )

    def _search_in(
        self, generation: indexer_pb2.Generation, prepared: list[_Prepared], deadline: Deadline
    ) -> list[SearchResult]:
        """All queries answered in ``generation``; raises _GenerationMoved if it stops being active."""
        # Every query's vector in one float32 matrix (row = its index), handed to Knn as it is when one
        # call answers them all.
        vectors = np.empty((len(prepared), generation.dimension), np.float32)
        images = [p for p in prepared if p.image is not None]
        if images:
            try:
                embedded = self._embed(generation, [p.image for p in images if p.image is not None], deadline)
            except InvalidInput as exc:
                raise self._explained(exc, images, deadline, several=len(prepared) > 1) from None
            vectors[[p.index for p in images]] = embedded
        for p in prepared:
            if p.item_id is not None:
                vectors[p.index] = self._stored_vector(generation, p, deadline)

        # One Knn per distinct set of parameters: a batch of similar image queries is one fan-out.
        groups: dict[tuple[object, ...], list[_Prepared]] = {}
        for p in prepared:
            key = (
                p.k,
                p.filter.SerializeToString(deterministic=True) if p.filter is not None else b"",
                p.ef,
                p.min_score,
                p.item_id,  # "more like this" excludes its own id, so it never shares a call
            )
            groups.setdefault(key, []).append(p)
        hits: dict[int, list[types_pb2.Hit]] = {}
        ref = generation_ref(generation)
        for members in groups.values():
            first = members[0]
            rows = [p.index for p in members]
            matrix = vectors if len(rows) == len(vectors) else vectors[rows]
            try:
                with metrics.stage("knn"):
                    response = self._indexer.knn(
                        matrix,
                        first.k,
                        generation=generation.name,
                        require_active=True,
                        filter=first.filter,
                        ef=first.ef,
                        min_score=first.min_score,
                        exclude_ids=(first.item_id,) if first.item_id is not None else (),
                        timeout=deadline.timeout("the neighbour query"),
                    )
            except (Aborted, NotFound):
                # ABORTED: shard 0 says G is no longer active. NOT_FOUND: G was dropped meanwhile.
                raise _GenerationMoved() from None
            answered = response.generation
            if answered.name and (
                answered.name != generation.name
                or answered.space.model_version != generation.space.model_version
            ):
                # Defensive: a shard answered from another space than the one we embedded in.
                raise _GenerationMoved()
            if len(response.results) != len(members):
                raise NotReady(
                    f"the indexer answered {len(response.results)} result lists for {len(members)} queries"
                )
            for p, neighbours in zip(members, response.results, strict=True):
                hits[p.index] = list(neighbours.hits)
        return [SearchResult(hits[p.index], ref) for p in prepared]

    def _explained(
        self, error: InvalidInput, images: list[_Prepared], deadline: Deadline, *, several: bool
    ) -> InvalidInput:
        """Serving rejected an image: Pillow's precise reason (truncated, corrupt) for each image it
        cannot decode either (the first one's in the message), or Serving's own error when Pillow
        decodes them all (the model rejected them for another reason). These decodes share the
        gateway's decode budget like any other."""
        rejected = {}
        for p in images:
            reason = explain_undecodable(
                cast(bytes, p.image),  # ``images`` holds the image queries
                self.limits.images,
                self._decode_budget,
                deadline.timeout("explaining a rejected image"),
            )
            if reason is not None:
                rejected[p.index] = reason
        if not rejected:
            return error
        first = min(rejected)
        return QueriesRejected(
            f"queries[{first}]: {rejected[first]}" if several else rejected[first], rejected
        )

    def _embed(
        self, generation: indexer_pb2.Generation, images: list[bytes], deadline: Deadline
    ) -> np.ndarray:
        version = generation.space.model_version
        embedder = self._embedder(generation)
        try:
            with metrics.stage("embed"):
                result = embedder.embed(
                    images, version=version, timeout=deadline.timeout("embedding the query")
                )
        except NotReady as exc:
            # The pinned version may be gone because a newer generation took over: then redo.
            if self._generation_changed(generation, deadline):
                raise _GenerationMoved() from None
            raise NotReady(
                f"Serving cannot embed with model {generation.space.model_name!r} version {version}, which the "
                f"active index generation {generation.name!r} was built with: {exc.message}"
            ) from None
        if int(result.model_version) != version:
            raise NotReady(
                f"Serving answered with model version {result.model_version} although version {version} was "
                "pinned; refusing to mix embedding spaces"
            )
        vectors = np.asarray(result.vectors, dtype=np.float32)
        if vectors.shape != (len(images), generation.dimension):
            raise FailedPrecondition(
                f"model {generation.space.model_name!r} version {version} returned embeddings of shape "
                f"{vectors.shape}, but generation {generation.name!r} has dimension {generation.dimension}"
            )
        return vectors

    def _stored_vector(
        self, generation: indexer_pb2.Generation, p: _Prepared, deadline: Deadline
    ) -> np.ndarray:
        try:
            with metrics.stage("lookup"):
                records = self._indexer.get(
                    [cast(str, p.item_id)],  # called for the queries by item id
                    generation=generation.name,
                    include_vectors=True,
                    timeout=deadline.timeout("reading the item's stored vector"),
                )
        except NotFound:
            if self._generation_changed(generation, deadline):
                raise _GenerationMoved() from None
            raise NotFound(f"no catalogue item has id {p.item_id!r}") from None
        if not records or records[0].item.id != p.item_id:
            raise NotFound(f"no catalogue item has id {p.item_id!r}")
        vector = np.asarray(records[0].vector, dtype=np.float32)
        if vector.size == 0:
            raise FailedPrecondition(
                f"item {p.item_id!r} has no vector in the active generation {generation.name!r} yet "
                "(it is pending reindexing); search by image instead or retry later"
            )
        return vector

    # ----------------------------------------------------------------------------- generations

    def _active_generation(self, deadline: Deadline, *, refresh: bool) -> indexer_pb2.Generation:
        now = self._clock()
        with self._lock:
            cached = self._cached
        if not refresh and cached is not None and now - cached[0] < self.limits.generation_ttl:
            return cached[1]
        with metrics.stage("generation"):
            generation = self._indexer.active_generation(
                timeout=deadline.timeout("reading the active generation")
            )
        with self._lock:
            self._cached = (self._clock(), generation)
        return generation

    def _generation_changed(self, generation: indexer_pb2.Generation, deadline: Deadline) -> bool:
        try:
            return self._active_generation(deadline, refresh=True).name != generation.name
        except (NotReady, FailedPrecondition):
            return False

    def _embedder(self, generation: indexer_pb2.Generation) -> Embedder:
        name = generation.space.model_name
        if self._model_name and name != self._model_name:
            raise FailedPrecondition(
                f"the active index generation {generation.name!r} was built with model {name!r}, but this "
                f"gateway is configured for model {self._model_name!r} (--model-name); fix the flag or "
                "activate a generation of that model"
            )
        return self._embedder_for(name)


class _GenerationMoved(Exception):
    """Internal: the generation a search started in is no longer the active one; redo it."""


def _validate_filter(flt: types_pb2.Filter | None) -> None:
    if flt is None:
        return
    check_filter(flt.labels, ((condition.key, condition.values) for condition in flt.attributes))
    # The indexer lets an empty label select the unlabelled items; the search API refuses it, as a
    # label filter the caller most likely left empty by mistake.
    if any(not label for label in flt.labels):
        raise InvalidInput("filter.labels contains an empty label")
