"""IndexerService servicer (a thin proto <-> core adapter) and the function that wires and starts it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import cast

import grpc
import numpy as np
import prometheus_client
from google.protobuf.timestamp_pb2 import Timestamp

from cbir.errors import CbirError, InvalidInput
from cbir.server import RunningServer, ServerOptions, start_server
from cbir.v1 import indexer_pb2, indexer_pb2_grpc, types_pb2
from indexer.core import GenerationInfo, IndexerCore, ItemFilter
from indexer.metrics import IndexCollector
from indexer.queries import Hit, PackedVectors
from indexer.store import GenerationRow, ItemRow, RolloutRow

log = logging.getLogger(__name__)

SERVICE_NAME = "cbir.v1.IndexerService"


# ---------------------------------------------------------------------- conversions


def item_from_proto(item: types_pb2.Item) -> ItemRow:
    return ItemRow(item.id, item.uri, item.label, dict(item.attributes))


def item_to_proto(item: ItemRow) -> types_pb2.Item:
    return types_pb2.Item(id=item.id, uri=item.uri, label=item.label, attributes=item.attributes)


def filter_from_proto(flt: types_pb2.Filter) -> ItemFilter:
    return ItemFilter(tuple(flt.labels), tuple((a.key, tuple(a.values)) for a in flt.attributes))


# The rows hold the proto enums' numbers; the stubs type those enums as int subclasses, hence the casts.


def generation_ref(row: GenerationRow | None) -> types_pb2.GenerationRef:
    if row is None:
        return types_pb2.GenerationRef()
    return types_pb2.GenerationRef(
        name=row.name,
        space=types_pb2.EmbeddingSpace(model_name=row.model_name, model_version=row.model_version),
        metric=cast(types_pb2.Metric, row.metric),
    )


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _seconds(ts: Timestamp, present: bool) -> float | None:
    return ts.ToNanoseconds() / 1e9 if present else None


def rollout_to_proto(row: RolloutRow) -> indexer_pb2.RolloutDecision:
    return indexer_pb2.RolloutDecision(
        model_name=row.model_name,
        model_version=row.model_version,
        generation=row.generation,
        verdict=cast(indexer_pb2.RolloutVerdict, row.verdict),
        reason=row.reason,
        candidate_metrics=row.candidate_metrics,
        active_generation=row.active_generation,
        active_model_version=row.active_model_version,
        active_metrics=row.active_metrics,
        evaluation_queries=row.evaluation_queries,
        started_at=_timestamp(row.started_at),
        decided_at=_timestamp(row.decided_at),
        activated_at=_timestamp(row.activated_at),
        reindex_seconds=row.reindex_seconds,
        evaluation_seconds=row.evaluation_seconds,
        activation_seconds=row.activation_seconds,
    )


def rollout_from_proto(d: indexer_pb2.RolloutDecision) -> RolloutRow:
    return RolloutRow(
        model_name=d.model_name,
        model_version=d.model_version,
        generation=d.generation,
        verdict=d.verdict,
        reason=d.reason,
        candidate_metrics=dict(d.candidate_metrics),
        active_generation=d.active_generation,
        active_model_version=d.active_model_version,
        active_metrics=dict(d.active_metrics),
        evaluation_queries=d.evaluation_queries,
        started_at=_seconds(d.started_at, d.HasField("started_at")),
        decided_at=_seconds(d.decided_at, d.HasField("decided_at")),
        activated_at=_seconds(d.activated_at, d.HasField("activated_at")),
        reindex_seconds=d.reindex_seconds,
        evaluation_seconds=d.evaluation_seconds,
        activation_seconds=d.activation_seconds,
    )


def generation_to_proto(info: GenerationInfo) -> indexer_pb2.Generation:
    row = info.row
    return indexer_pb2.Generation(
        name=row.name,
        space=types_pb2.EmbeddingSpace(model_name=row.model_name, model_version=row.model_version),
        metric=cast(types_pb2.Metric, row.metric),
        dimension=row.dimension,
        state=cast(indexer_pb2.GenerationState, row.state),
        item_count=info.item_count,
        deleted_slots=info.deleted_slots,
        pending_count=info.pending_count,
        memory_bytes=info.memory_bytes,
        params=indexer_pb2.HnswParams(m=row.m, ef_construction=row.ef_construction, ef_search=row.ef_search),
        created_at=_timestamp(row.created_at),
        activated_at=_timestamp(row.activated_at),
        rollout=rollout_to_proto(info.rollout) if info.rollout else None,
        index_type=cast(indexer_pb2.IndexType, row.index_type),
        partition_params=indexer_pb2.PartitionParams(lists=row.lists, probes=row.probes),
        partition_lists=info.partition_lists,
    )


_NO_FILTER = ItemFilter()


def knn_queries(request: indexer_pb2.KnnRequest) -> list[np.ndarray] | PackedVectors:
    """The request's query vectors, packed or one message per vector (never both)."""
    if request.packed_queries:
        if request.queries:
            raise InvalidInput("set queries or packed_queries, not both")
        return PackedVectors(request.packed_queries)
    return [np.asarray(q.values, np.float32) for q in request.queries]


def knn_response(results: Sequence[Sequence[Hit]], row: GenerationRow) -> indexer_pb2.KnnResponse:
    """Hits written straight into the response (building a Hit, then Neighbors, then the response
    from them copies every hit twice)."""
    response = indexer_pb2.KnnResponse()
    for hits in results:
        out = response.results.add().hits
        for hit in hits:
            item = hit.item
            message = out.add(
                id=item.id, score=hit.score, distance=hit.distance, uri=item.uri, label=item.label
            )
            if item.attributes:  # filling an empty map costs as much as the rest of the hit
                message.attributes.update(item.attributes)
    if row is not None:
        response.generation.CopyFrom(generation_ref(row))
    return response


# ---------------------------------------------------------------------- servicer


class IndexerServicer(indexer_pb2_grpc.IndexerServiceServicer):
    """Converts requests for :class:`IndexerCore` and its answers back; no logic of its own."""

    def __init__(self, core: IndexerCore) -> None:
        self.core = core

    def Upsert(
        self, request_iterator: Iterator[indexer_pb2.UpsertRequest], context: grpc.ServicerContext
    ) -> indexer_pb2.UpsertResponse:
        written, generation, row = 0, None, None
        for message in request_iterator:
            if generation is None:
                generation = message.generation
            elif message.generation != generation:
                raise InvalidInput(
                    f"every message of an Upsert stream must name the same generation "
                    f"({generation!r} then {message.generation!r}); {written} records were written"
                )
            records = [(item_from_proto(r.item), r.vector) for r in message.records]
            try:
                row = self.core.upsert(generation, records, offset=written)
            except CbirError as exc:
                if written:
                    exc.message += f" ({written} records of earlier messages were written)"
                raise
            written += len(records)
        if row is None:
            row = self.core.generation_row(generation or "")
        return indexer_pb2.UpsertResponse(upserted=written, generation=generation_ref(row))

    def Delete(
        self, request: indexer_pb2.DeleteRequest, context: grpc.ServicerContext
    ) -> indexer_pb2.DeleteResponse:
        deleted, missing = self.core.delete(list(request.ids), request.allow_missing)
        return indexer_pb2.DeleteResponse(deleted=deleted, not_found=missing)

    def Get(self, request: indexer_pb2.GetRequest, context: grpc.ServicerContext) -> indexer_pb2.GetResponse:
        found, row = self.core.get(list(request.ids), request.generation, request.include_vectors)
        return indexer_pb2.GetResponse(
            records=[
                indexer_pb2.Record(item=item_to_proto(item), vector=[] if vec is None else vec.tolist())
                for item, vec in found
            ],
            generation=generation_ref(row),
        )

    def Knn(self, request: indexer_pb2.KnnRequest, context: grpc.ServicerContext) -> indexer_pb2.KnnResponse:
        results, row = self.core.knn(
            knn_queries(request),
            request.k,
            generation=request.generation,
            require_active=request.require_active,
            item_filter=filter_from_proto(request.filter) if request.HasField("filter") else _NO_FILTER,
            ef=request.ef,
            probes=request.probes,
            min_score=request.min_score if request.HasField("min_score") else None,
            exclude_ids=request.exclude_ids,
        )
        return knn_response(results, row)

    def Stats(
        self, request: indexer_pb2.StatsRequest, context: grpc.ServicerContext
    ) -> indexer_pb2.StatsResponse:
        s = self.core.stats()
        return indexer_pb2.StatsResponse(
            item_count=s.item_count,
            active_generation=s.active_generation,
            generations=[generation_to_proto(g) for g in s.generations],
            store_bytes=s.store_bytes,
            process_rss_bytes=s.process_rss_bytes,
            shard_id=s.shard_id,
            shard_count=s.shard_count,
            last_sequence=s.last_sequence,
        )

    def CreateGeneration(
        self, request: indexer_pb2.CreateGenerationRequest, context: grpc.ServicerContext
    ) -> indexer_pb2.Generation:
        p = request.params
        return generation_to_proto(
            self.core.create_generation(
                request.name,
                request.space.model_name,
                request.space.model_version,
                request.metric,
                request.dimension,
                p.m,
                p.ef_construction,
                p.ef_search,
                request.index_type,
                request.partition_params.lists,
                request.partition_params.probes,
            )
        )

    def GetGeneration(
        self, request: indexer_pb2.GetGenerationRequest, context: grpc.ServicerContext
    ) -> indexer_pb2.Generation:
        return generation_to_proto(self.core.get_generation(request.name))

    def ListGenerations(
        self, request: indexer_pb2.ListGenerationsRequest, context: grpc.ServicerContext
    ) -> indexer_pb2.ListGenerationsResponse:
        return indexer_pb2.ListGenerationsResponse(
            generations=[generation_to_proto(g) for g in self.core.list_generations()]
        )

    def ListPending(
        self, request: indexer_pb2.ListPendingRequest, context: grpc.ServicerContext
    ) -> indexer_pb2.ListPendingResponse:
        items, token, total = self.core.list_pending(
            request.generation, request.page_size, request.page_token
        )
        return indexer_pb2.ListPendingResponse(
            items=[item_to_proto(i) for i in items], next_page_token=token, total=total
        )

    def ListItems(
        self, request: indexer_pb2.ListItemsRequest, context: grpc.ServicerContext
    ) -> indexer_pb2.ListItemsResponse:
        rows, token, row = self.core.list_items(
            request.generation, request.page_size, request.page_token, request.include_vectors
        )
        return indexer_pb2.ListItemsResponse(
            records=[
                indexer_pb2.Record(item=item_to_proto(item), vector=[] if vec is None else vec.tolist())
                for item, vec in rows
            ],
            next_page_token=token,
            generation=generation_ref(row),
        )

    def ActivateGeneration(
        self, request: indexer_pb2.ActivateGenerationRequest, context: grpc.ServicerContext
    ) -> indexer_pb2.Generation:
        return generation_to_proto(
            self.core.activate_generation(request.name, request.allow_pending, request.expected_active)
        )

    def DropGeneration(
        self, request: indexer_pb2.DropGenerationRequest, context: grpc.ServicerContext
    ) -> indexer_pb2.DropGenerationResponse:
        self.core.drop_generation(request.name)
        return indexer_pb2.DropGenerationResponse()

    def RecordRollout(
        self, request: indexer_pb2.RecordRolloutRequest, context: grpc.ServicerContext
    ) -> indexer_pb2.RolloutDecision:
        return rollout_to_proto(self.core.record_rollout(rollout_from_proto(request.decision)))

    def ListRollouts(
        self, request: indexer_pb2.ListRolloutsRequest, context: grpc.ServicerContext
    ) -> indexer_pb2.ListRolloutsResponse:
        return indexer_pb2.ListRolloutsResponse(
            decisions=[rollout_to_proto(r) for r in self.core.list_rollouts(request.model_name)]
        )


# ---------------------------------------------------------------------- wiring


def serve(options: ServerOptions, core: IndexerCore) -> RunningServer:
    """Starts the server NOT_SERVING, loads the index in the background, then reports SERVING."""
    running = start_server(
        options,
        [(indexer_pb2_grpc.add_IndexerServiceServicer_to_server, IndexerServicer(core))],
        [SERVICE_NAME],
        serving=False,
    )
    collector = IndexCollector(core)
    prometheus_client.REGISTRY.register(collector)
    running.on_stop.append(lambda: prometheus_client.REGISTRY.unregister(collector))

    # Memory that no longer agrees with the store is never served from (IndexerCore._fatal).
    core.on_fatal.append(lambda _reason: running.set_serving(False))

    def load() -> None:
        try:
            core.load()
        except Exception:  # noqa: BLE001 - stay NOT_SERVING and say why; a broken index never answers
            log.exception("loading the index failed; staying NOT_SERVING")
            return
        core.start_background()
        running.set_serving(True)

    threading.Thread(target=load, name="indexer-load", daemon=True).start()
    # Snapshot on the way out so the next start loads instead of replaying or rebuilding.
    running.on_stop.append(core.close)
    return running
