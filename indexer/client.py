"""Multi-shard client of IndexerService, used by the gateway and the reindex CLI.

``targets[i]`` is shard i. Items are routed by ``cbir.sharding.shard_of``; queries fan out to every
shard by generation name and the top k are merged by score. Shard 0 is the authority on which
generation is active; activation goes shards n-1..1 first and shard 0 last, so the gateway (which
reads the active generation from shard 0) switches only once every shard can answer it.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence
from concurrent import futures
from typing import Any, cast

import grpc
import numpy as np
from google.protobuf.message import Message

from cbir import errors
from cbir.channels import open_channel
from cbir.defaults import MAX_MESSAGE_BYTES
from cbir.sharding import shard_of
from cbir.tls import ClientTLS
from cbir.v1 import indexer_pb2, indexer_pb2_grpc, types_pb2


class IndexerClient:
    """One channel per shard; every call raises cbir.errors domain errors, never grpc.RpcError."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        tls: ClientTLS | None = None,
        timeout: float = 10.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ):
        if isinstance(targets, str):
            targets = [targets]
        if not targets:
            raise errors.InvalidInput("at least one indexer target is required")
        self.targets = list(targets)
        self.timeout = timeout
        self._channels = [open_channel(t, tls=tls, max_message_bytes=max_message_bytes) for t in self.targets]
        self._stubs = [indexer_pb2_grpc.IndexerServiceStub(c) for c in self._channels]
        self._pool = futures.ThreadPoolExecutor(
            max_workers=max(1, len(self.targets)), thread_name_prefix="indexer-client"
        )
        # Shards answering Knn from packed float32 vectors (False once one turned out older).
        self._packed = [True] * len(self.targets)

    @property
    def shard_count(self) -> int:
        return len(self.targets)

    def __enter__(self) -> IndexerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for channel in self._channels:
            channel.close()

    # ------------------------------------------------------------------ plumbing

    # The stub's methods are looked up by name, so the answer's type is the caller's to state.
    def _call(self, shard: int, method: str, request: Message, timeout: float | None) -> Any:
        try:
            return getattr(self._stubs[shard], method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise self._error(shard, exc) from None

    def _error(self, shard: int, exc: grpc.RpcError) -> errors.CbirError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else str(exc)) or f"{code.name} without details"
        where = (
            f"indexer shard {shard} ({self.targets[shard]})"
            if self.shard_count > 1
            else f"indexer {self.targets[shard]}"
        )
        if code == grpc.StatusCode.UNAVAILABLE:
            return errors.NotReady(f"{where} is unavailable: {details}")
        return errors.error_for(code, f"{where}: {details}" if self.shard_count > 1 else details)

    def _all(self, method: str, request: Message, timeout: float | None) -> list[Any]:
        """The answers of every shard. Raises the first shard's error only once every call has ended,
        so no call is still running behind an error (e.g. a CreateGeneration that another worker raced:
        when AlreadyExists comes back, every shard has the generation)."""
        calls = [self._pool.submit(self._call, s, method, request, timeout) for s in range(self.shard_count)]
        futures.wait(calls)
        return [c.result() for c in calls]

    # ------------------------------------------------------------------ queries

    def active_generation(self, timeout: float | None = None) -> indexer_pb2.Generation:
        try:
            active: indexer_pb2.Generation = self._call(
                0, "GetGeneration", indexer_pb2.GetGenerationRequest(), timeout
            )
            return active
        except errors.NotFound as exc:
            raise errors.FailedPrecondition(f"no generation is active: {exc.message}") from None

    def knn(
        self,
        queries: np.ndarray,
        k: int,
        *,
        generation: str,
        require_active: bool = True,
        filter: types_pb2.Filter | None = None,
        ef: int = 0,
        probes: int = 0,
        min_score: float | None = None,
        exclude_ids: Sequence[str] = (),
        timeout: float | None = None,
    ) -> indexer_pb2.KnnResponse:
        q = np.asarray(queries, dtype="<f4")
        if q.ndim == 1:
            q = q[None, :]
        base: dict[str, Any] = dict(k=k, ef=ef, probes=probes, generation=generation, exclude_ids=exclude_ids)
        if filter is not None:
            base["filter"] = filter
        if min_score is not None:
            base["min_score"] = min_score
        packed = np.ascontiguousarray(q).tobytes()

        def ask(shard: int) -> indexer_pb2.KnnResponse:
            # Only shard 0 knows for sure which generation is active; the others answer by name.
            active = require_active and shard == 0
            if self._packed[shard]:
                request = indexer_pb2.KnnRequest(packed_queries=packed, require_active=active, **base)
                try:
                    return cast(indexer_pb2.KnnResponse, self._call(shard, "Knn", request, timeout))
                except errors.InvalidInput as exc:
                    if "at least one query vector" not in exc.message:
                        raise
                    self._packed[shard] = False  # an indexer older than packed_queries
            vectors = [indexer_pb2.Vector(values=row) for row in q.tolist()]
            request = indexer_pb2.KnnRequest(queries=vectors, require_active=active, **base)
            return cast(indexer_pb2.KnnResponse, self._call(shard, "Knn", request, timeout))

        if self.shard_count == 1:
            return ask(0)
        answers = [c.result() for c in [self._pool.submit(ask, s) for s in range(self.shard_count)]]
        merged = indexer_pb2.KnnResponse(generation=answers[0].generation)
        for qi in range(len(q)):
            hits = heapq.nlargest(k, (h for a in answers for h in a.results[qi].hits), key=lambda h: h.score)
            merged.results.add().hits.extend(hits)
        return merged

    def get(
        self,
        ids: Sequence[str],
        *,
        generation: str = "",
        include_vectors: bool = False,
        timeout: float | None = None,
    ) -> list[indexer_pb2.Record]:
        by_shard: dict[int, list[str]] = {}
        for item_id in ids:
            by_shard.setdefault(shard_of(item_id, self.shard_count), []).append(item_id)
        calls = {
            s: self._pool.submit(
                self._call,
                s,
                "Get",
                indexer_pb2.GetRequest(ids=part, generation=generation, include_vectors=include_vectors),
                timeout,
            )
            for s, part in by_shard.items()
        }
        found = {r.item.id: r for c in calls.values() for r in c.result().records}
        return [found[i] for i in ids]

    def stats(self, timeout: float | None = None) -> list[indexer_pb2.StatsResponse]:
        return self._all("Stats", indexer_pb2.StatsRequest(), timeout)

    def list_generations(self, timeout: float | None = None) -> list[indexer_pb2.Generation]:
        """Shard 0's generations (every shard has the same ones when managed through this client)."""
        return list(
            self._call(0, "ListGenerations", indexer_pb2.ListGenerationsRequest(), timeout).generations
        )

    def get_generation(
        self, name: str = "", *, shard: int = 0, timeout: float | None = None
    ) -> indexer_pb2.Generation:
        generation: indexer_pb2.Generation = self._call(
            shard, "GetGeneration", indexer_pb2.GetGenerationRequest(name=name), timeout
        )
        return generation

    def list_pending(
        self, generation: str, *, page_size: int = 1000, timeout: float | None = None
    ) -> Iterator[types_pb2.Item]:
        for shard in range(self.shard_count):
            token = ""
            while True:
                page = self._call(
                    shard,
                    "ListPending",
                    indexer_pb2.ListPendingRequest(
                        generation=generation, page_size=page_size, page_token=token
                    ),
                    timeout,
                )
                yield from page.items
                token = page.next_page_token
                if not token:
                    break

    def list_items(
        self,
        generation: str = "",
        *,
        include_vectors: bool = False,
        page_size: int = 1000,
        timeout: float | None = None,
    ) -> Iterator[indexer_pb2.Record]:
        """Every item with a vector in the generation, shard by shard, each shard in id order."""
        for shard in range(self.shard_count):
            token = ""
            while True:
                page = self._call(
                    shard,
                    "ListItems",
                    indexer_pb2.ListItemsRequest(
                        generation=generation,
                        page_size=page_size,
                        page_token=token,
                        include_vectors=include_vectors,
                    ),
                    timeout,
                )
                yield from page.records
                token = page.next_page_token
                if not token:
                    break

    def pending_count(self, generation: str, timeout: float | None = None) -> int:
        return sum(
            self.get_generation(generation, shard=s, timeout=timeout).pending_count
            for s in range(self.shard_count)
        )

    # ------------------------------------------------------------------ writes

    def upsert(
        self,
        records: Iterable[indexer_pb2.Record],
        *,
        generation: str = "",
        batch_size: int = 256,
        timeout: float | None = None,
    ) -> int:
        """Streams records to their shards in batches; returns how many were written (all durable)."""
        per_shard: list[list[indexer_pb2.Record]] = [[] for _ in range(self.shard_count)]
        for record in records:
            per_shard[shard_of(record.item.id, self.shard_count)].append(record)

        def stream(shard: int) -> int:
            part = per_shard[shard]
            if not part:
                return 0

            def messages() -> Iterator[indexer_pb2.UpsertRequest]:
                for start in range(0, len(part), batch_size):
                    yield indexer_pb2.UpsertRequest(
                        generation=generation, records=part[start : start + batch_size]
                    )

            try:
                answer = self._stubs[shard].Upsert(
                    messages(), timeout=timeout or max(self.timeout, len(part) / 500)
                )
            except grpc.RpcError as exc:
                raise self._error(shard, exc) from None
            return int(answer.upserted)

        return sum(f.result() for f in [self._pool.submit(stream, s) for s in range(self.shard_count)])

    def delete(self, ids: Sequence[str], *, allow_missing: bool = False, timeout: float | None = None) -> int:
        by_shard: dict[int, list[str]] = {}
        for item_id in ids:
            by_shard.setdefault(shard_of(item_id, self.shard_count), []).append(item_id)
        if not allow_missing and len(by_shard) > 1:
            # Check every shard first so a missing id on one shard deletes nothing anywhere.
            self.get(ids, timeout=timeout)
        return sum(
            self._call(
                s, "Delete", indexer_pb2.DeleteRequest(ids=part, allow_missing=allow_missing), timeout
            ).deleted
            for s, part in by_shard.items()
        )

    def create_generation(
        self,
        name: str,
        space: types_pb2.EmbeddingSpace,
        metric: int,
        dimension: int,
        params: indexer_pb2.HnswParams | None = None,
        timeout: float | None = None,
        *,
        index_type: int = 0,
        partition_params: indexer_pb2.PartitionParams | None = None,
    ) -> indexer_pb2.Generation:
        """Creates the generation on every shard; ``index_type`` 0 is each server's --index-type."""
        request = indexer_pb2.CreateGenerationRequest(
            # The proto enums are ints at run time; their stubs type them as int subclasses.
            name=name,
            space=space,
            metric=cast(types_pb2.Metric, metric),
            dimension=dimension,
            params=params,
            index_type=cast(indexer_pb2.IndexType, index_type),
            partition_params=partition_params,
        )
        created: indexer_pb2.Generation = self._all("CreateGeneration", request, timeout)[0]
        return created

    def activate_generation(
        self,
        name: str,
        *,
        allow_pending: bool = False,
        expected_active: str = "",
        timeout: float | None = None,
    ) -> indexer_pb2.Generation:
        """Activates ``name`` on shards n-1..1, then 0. Safe to repeat after a failure part-way.

        With ``expected_active``, each shard switches only from that generation (compare-and-swap,
        ABORTED otherwise); a shard already on ``name`` (an earlier, interrupted attempt) is left as is.
        """
        answer: indexer_pb2.Generation | None = None
        for shard in reversed(range(self.shard_count)):
            request = indexer_pb2.ActivateGenerationRequest(
                name=name, allow_pending=allow_pending, expected_active=expected_active
            )
            try:
                answer = self._call(shard, "ActivateGeneration", request, timeout)
            except errors.Aborted:
                current = self.get_generation(name, shard=shard, timeout=timeout)
                if current.state != indexer_pb2.GENERATION_STATE_ACTIVE:
                    raise
                answer = current
        return cast(indexer_pb2.Generation, answer)  # set by the last shard (there is at least one)

    def record_rollout(
        self, decision: indexer_pb2.RolloutDecision, timeout: float | None = None
    ) -> indexer_pb2.RolloutDecision:
        """Records a rollout decision on shards n-1..1, then 0 (shard 0, which lists them, last)."""
        answer: indexer_pb2.RolloutDecision | None = None
        for shard in reversed(range(self.shard_count)):
            answer = self._call(
                shard, "RecordRollout", indexer_pb2.RecordRolloutRequest(decision=decision), timeout
            )
        return cast(indexer_pb2.RolloutDecision, answer)  # as in activate_generation

    def list_rollouts(
        self, model_name: str = "", timeout: float | None = None
    ) -> list[indexer_pb2.RolloutDecision]:
        """Shard 0's rollout decisions, newest model version first."""
        request = indexer_pb2.ListRolloutsRequest(model_name=model_name)
        return list(self._call(0, "ListRollouts", request, timeout).decisions)

    def drop_generation(self, name: str, timeout: float | None = None) -> None:
        self._all("DropGeneration", indexer_pb2.DropGenerationRequest(name=name), timeout)
