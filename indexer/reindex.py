"""`python -m indexer reindex`: embed a catalogue through Serving into a new generation, check it, activate it.

Steps:
1. read and validate the catalogue (cbir.catalogue: folders, the original CSV layout, or a manifest);
2. embed the first batch to learn the model version that answers, then PIN that version for every
   later batch (a version rolled out mid-run must not mix two embedding spaces in one generation);
3. create the generation stamped with (model name, that version), or resume an existing one: items
   that already have a current vector there (same uri/label/attributes, not pending) are skipped;
4. stream the rest: a thread pool reads image files for the next batches while Serving embeds the
   current one, and upserts (routed by shard) overlap with the next embedding;
5. drain ListPending (items changed by writes to the active generation during the build, or in the
   index but not in this catalogue): embed them from their uri and upsert them;
6. check (no pending, counts match, sampled items find themselves first) and activate.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbir.errors import CbirError, FailedPrecondition, InvalidInput, NotFound
from cbir.logs import configure_cli_logging
from cbir.v1 import indexer_pb2, types_pb2
from indexer.core import check_item
from indexer.store import ItemRow

log = logging.getLogger(__name__)

METRIC_NAMES = {
    "cosine": types_pb2.METRIC_COSINE,
    "l2": types_pb2.METRIC_L2,
    "ip": types_pb2.METRIC_INNER_PRODUCT,
}


def add_parser(sub, client_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "reindex",
        help="Embed a catalogue through Serving into a new generation and activate it.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    client_flags(p)
    p.add_argument("catalogue", help="Catalogue: a folder, the original data_dir, or a .csv/.jsonl manifest.")
    p.add_argument("--layout", default="auto", choices=["auto", "folders", "original", "manifest"])
    p.add_argument(
        "--dataset", default=None, help="Dataset of the original layout (bags, bags_40, bags_40_v2, cub)."
    )
    p.add_argument("--split", default=None, help="Only this split (train/validation/test).")
    p.add_argument(
        "--serving", default="127.0.0.1:8500", help="TF Serving (or local model server) gRPC address."
    )
    p.add_argument(
        "--model", required=False, default=None, help="Served model name (required unless --dry-run)."
    )
    p.add_argument(
        "--model-version",
        type=int,
        default=None,
        help="Model version to use (default: the latest served; pinned for the whole run).",
    )
    p.add_argument("--signature", default="serving_default", help="Serving signature taking encoded images.")
    p.add_argument(
        "--generation",
        default=None,
        help="Generation name (default <model>-v<version>-<UTC time>); an existing one is resumed.",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="Resume the newest building generation of this model version (or --generation).",
    )
    p.add_argument("--metric", default="cosine", choices=sorted(METRIC_NAMES))
    p.add_argument("--hnsw-m", type=int, default=0, help="HNSW M (0: the server default).")
    p.add_argument("--hnsw-ef-construction", type=int, default=0)
    p.add_argument("--hnsw-ef-search", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="Images per Predict call.")
    p.add_argument("--readers", type=int, default=4, help="Threads reading image files ahead of Serving.")
    p.add_argument("--prefetch", type=int, default=4, help="Batches read ahead of the one being embedded.")
    p.add_argument("--serving-timeout", type=float, default=60.0, help="Seconds per Predict call.")
    p.add_argument("--check-samples", type=int, default=20, help="Items queried to check the generation.")
    p.add_argument("--no-activate", action="store_true", help="Build and check, but do not activate.")
    p.add_argument("--allow-pending", action="store_true", help="Activate even if items stay pending.")
    p.add_argument("--dry-run", action="store_true", help="Read and validate the catalogue, write nothing.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")


@dataclass
class ReindexReport:
    generation: str
    model_version: int
    catalogue_items: int
    embedded: int
    skipped: int
    pending_embedded: int
    failed: list[tuple[str, str]]
    seconds: float
    stream_seconds: float
    activated: bool

    @property
    def items_per_second(self) -> float:
        """End to end, including creating, draining and checking the generation."""
        done = self.embedded + self.pending_embedded
        return done / self.seconds if self.seconds > 0 else 0.0

    @property
    def stream_items_per_second(self) -> float:
        """While streaming images through Serving into the index."""
        done = self.embedded + self.pending_embedded
        return done / self.stream_seconds if self.stream_seconds > 0 else 0.0


def entry_items(entries) -> list[ItemRow]:
    """Catalogue entries -> items, validated, duplicate ids refused (naming both paths)."""
    seen: dict[str, str] = {}
    items = []
    for n, entry in enumerate(entries):
        attributes = {str(k): str(v) for k, v in dict(entry.attributes).items()}
        if entry.split and "split" not in attributes:
            attributes["split"] = entry.split
        item = ItemRow(entry.id, str(entry.path), entry.label or "", attributes)
        check_item(item, f"catalogue entry {n} ({entry.path})")
        if item.id in seen:
            raise InvalidInput(f"catalogue id {item.id!r} appears twice ({seen[item.id]} and {entry.path})")
        seen[item.id] = str(entry.path)
        items.append(item)
    return items


def _record(item: ItemRow, vector: np.ndarray) -> indexer_pb2.Record:
    return indexer_pb2.Record(
        item=types_pb2.Item(id=item.id, uri=item.uri, label=item.label, attributes=item.attributes),
        vector=vector,
    )


class Pipeline:
    """Reads images ahead in a thread pool, embeds batch by batch at a pinned version, upserts behind."""

    def __init__(
        self, embedder, client, *, batch_size: int, readers: int, prefetch: int, timeout: float, progress=None
    ):
        self.embedder = embedder
        self.client = client
        self.batch_size = batch_size
        self.readers = max(1, readers)
        self.prefetch = max(1, prefetch)
        self.timeout = timeout
        self.progress = progress
        self.version: int | None = None
        self.failed: list[tuple[str, str]] = []
        # Time spent streaming (read -> embed -> upsert), without the set-up, drain and check.
        self.stream_seconds = 0.0

    def embed(self, images: Sequence[bytes]) -> tuple[np.ndarray, int]:
        result = self.embedder.embed(images, version=self.version, timeout=self.timeout)
        if self.version is None:
            self.version = int(result.model_version)
        elif int(result.model_version) != self.version:
            raise FailedPrecondition(
                f"Serving answered with model version {result.model_version}, not the pinned {self.version}"
            )
        return np.asarray(result.vectors, dtype=np.float32), int(result.model_version)

    def embed_items(self, items: Sequence[ItemRow], images: Sequence[bytes | None]):
        """Vectors for the items whose image could be read and embedded; bad ones are recorded."""
        keep = [j for j, img in enumerate(images) if img is not None]
        if not keep:
            return [], np.zeros((0, 0), np.float32)
        try:
            vectors, _ = self.embed([images[j] for j in keep])
            return [items[j] for j in keep], vectors
        except InvalidInput:
            # One bad image fails the whole Predict: embed one by one to name it and keep the rest.
            good, rows = [], []
            for j in keep:
                try:
                    vec, _ = self.embed([images[j]])
                except InvalidInput as exc:
                    self.failed.append((items[j].id, exc.message))
                    continue
                good.append(items[j])
                rows.append(vec[0])
            return good, (np.stack(rows) if rows else np.zeros((0, 0), np.float32))

    def read(self, items: Sequence[ItemRow]) -> list[bytes | None]:
        from cbir.catalogue import read_image_bytes

        out: list[bytes | None] = []
        for item in items:
            try:
                out.append(read_image_bytes(item.uri))
            except InvalidInput as exc:
                self.failed.append((item.id, exc.message))
                out.append(None)
        return out

    def run(self, items: Sequence[ItemRow], generation: Callable[[int, int], str]) -> int:
        """Embeds and upserts ``items``; ``generation(dim, version)`` names (creates) the target."""
        batches = [items[s : s + self.batch_size] for s in range(0, len(items), self.batch_size)]
        written = 0
        started = time.monotonic()
        with (
            futures.ThreadPoolExecutor(self.readers, thread_name_prefix="reindex-read") as reader,
            futures.ThreadPoolExecutor(1, thread_name_prefix="reindex-upsert") as writer,
        ):
            reads = [reader.submit(self.read, b) for b in batches[: self.prefetch]]
            upsert: futures.Future | None = None
            name = None
            for n, batch in enumerate(batches):
                images = reads[n].result()
                if n + self.prefetch < len(batches):
                    reads.append(reader.submit(self.read, batches[n + self.prefetch]))
                good, vectors = self.embed_items(batch, images)
                if good:
                    if name is None:
                        name = generation(vectors.shape[1], self.version)
                    records = [_record(item, vec) for item, vec in zip(good, vectors, strict=True)]
                    if upsert is not None:
                        written += upsert.result()
                    upsert = writer.submit(self.client.upsert, records, generation=name)
                if self.progress is not None:
                    self.progress.update(len(batch))
            if upsert is not None:
                written += upsert.result()
        self.stream_seconds += time.monotonic() - started
        return written


def run(args, make_client) -> int:
    """The reindex command; returns the exit code."""
    configure_cli_logging("INFO", "%(message)s")
    from cbir.catalogue import read_catalogue

    try:
        entries = read_catalogue(args.catalogue, layout=args.layout, split=args.split, dataset=args.dataset)
        items = entry_items(entries)
        if not items:
            raise InvalidInput(f"the catalogue {args.catalogue} has no images")
        if args.dry_run:
            return _dry_run(items, args)
        if not args.model:
            raise InvalidInput("--model is required (the served model name)")
        if args.batch_size < 1:
            raise InvalidInput("--batch-size must be >= 1")
        report = reindex(items, args, make_client)
    except CbirError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(
        f"generation {report.generation} (model {args.model} version {report.model_version}): "
        f"{report.catalogue_items} catalogue items, {report.embedded} embedded, {report.skipped} already "
        f"current, {report.pending_embedded} pending embedded, {len(report.failed)} failed, "
        f"{report.stream_items_per_second:.1f} items/s streaming, {report.items_per_second:.1f} items/s end to end; "
        f"{'activated' if report.activated else 'not activated'}"
    )
    for item_id, why in report.failed[:20]:
        print(f"  failed {item_id}: {why}", file=sys.stderr)
    return 1 if report.failed else 0


def _dry_run(items: list[ItemRow], args) -> int:
    from cbir.sharding import shard_of

    missing = [i for i in items if not Path(i.uri).is_file()]
    labels = {i.label for i in items}
    shards = len([t for t in args.indexer.split(",") if t.strip()])
    per_shard = [0] * shards
    for i in items:
        per_shard[shard_of(i.id, shards)] += 1
    print(
        f"catalogue {args.catalogue}: {len(items)} items, {len(labels)} labels, "
        f"{len(missing)} missing image files; per shard: {per_shard}. Dry run: nothing written."
    )
    for i in missing[:20]:
        print(f"  missing {i.id}: {i.uri}", file=sys.stderr)
    return 1 if missing else 0


def _find_generation(client, args) -> indexer_pb2.Generation | None:
    """The generation to resume, if any."""
    if args.generation:
        try:
            return client.get_generation(args.generation)
        except NotFound:
            if args.resume:
                raise
            return None
    if not args.resume:
        return None
    candidates = [
        g
        for g in client.list_generations()
        if g.state == indexer_pb2.GENERATION_STATE_BUILDING
        and g.space.model_name == args.model
        and (args.model_version is None or g.space.model_version == args.model_version)
    ]
    if not candidates:
        raise NotFound(f"--resume: no building generation of model {args.model!r} to resume")
    return candidates[0]


def reindex(items: list[ItemRow], args, make_client) -> ReindexReport:
    from embedder.client import EmbedderClient

    started = time.monotonic()
    with (
        make_client(args) as client,
        EmbedderClient(
            args.serving, args.model, signature_name=args.signature, timeout=args.serving_timeout
        ) as embedder,
    ):
        existing = _find_generation(client, args)
        pipeline = Pipeline(
            embedder,
            client,
            batch_size=args.batch_size,
            readers=args.readers,
            prefetch=args.prefetch,
            timeout=args.serving_timeout,
        )
        skipped = 0
        todo = items
        if existing is not None:
            if existing.state != indexer_pb2.GENERATION_STATE_BUILDING and not args.generation:
                raise FailedPrecondition(f"generation {existing.name!r} is not building")
            if args.model_version is not None and existing.space.model_version != args.model_version:
                raise FailedPrecondition(
                    f"generation {existing.name!r} was built with version "
                    f"{existing.space.model_version}, not {args.model_version}"
                )
            pipeline.version = int(existing.space.model_version)
            todo = _still_to_do(client, existing.name, items)
            skipped = len(items) - len(todo)
            print(
                f"resuming generation {existing.name}: {skipped} items already current, {len(todo)} to embed"
            )
        elif args.model_version is not None:
            pipeline.version = args.model_version
        name_box: list[str] = [existing.name] if existing is not None else []

        def generation(dim: int, version: int) -> str:
            if not name_box:
                name = (
                    args.generation
                    or f"{args.model}-v{version}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
                )
                params = indexer_pb2.HnswParams(
                    m=args.hnsw_m, ef_construction=args.hnsw_ef_construction, ef_search=args.hnsw_ef_search
                )
                client.create_generation(
                    name,
                    types_pb2.EmbeddingSpace(model_name=args.model, model_version=version),
                    METRIC_NAMES[args.metric],
                    dim,
                    params,
                )
                print(f"created generation {name} (model {args.model} version {version}, dim {dim})")
                name_box.append(name)
            return name_box[0]

        progress = None
        if not args.no_progress and todo:
            from tqdm import tqdm

            progress = tqdm(total=len(todo), unit="img", desc="embedding", file=sys.stderr, smoothing=0.1)
        pipeline.progress = progress
        try:
            embedded = pipeline.run(todo, generation)
        finally:
            if progress is not None:
                progress.close()
        if not name_box:
            raise FailedPrecondition("no image could be embedded; nothing was written")
        name = name_box[0]
        pending_embedded = _drain_pending(client, pipeline, name)
        _check(client, name, args.check_samples, args.allow_pending)
        activated = False
        if not args.no_activate and not pipeline.failed:
            client.activate_generation(name, allow_pending=args.allow_pending)
            activated = True
        elif pipeline.failed:
            print(
                f"not activating: {len(pipeline.failed)} images failed; fix them and run again to resume "
                f"(--generation {name})",
                file=sys.stderr,
            )
        return ReindexReport(
            name,
            pipeline.version or 0,
            len(items),
            embedded,
            skipped,
            pending_embedded,
            pipeline.failed,
            time.monotonic() - started,
            pipeline.stream_seconds,
            activated,
        )


def _still_to_do(client, generation: str, items: list[ItemRow]) -> list[ItemRow]:
    """Items without a current vector in the generation (missing, pending, or changed in the catalogue)."""
    have = {r.item.id: r.item for r in client.list_items(generation)}
    pending = {i.id for i in client.list_pending(generation)}
    todo = []
    for item in items:
        stored = have.get(item.id)
        if (
            stored is None
            or item.id in pending
            or stored.uri != item.uri
            or stored.label != item.label
            or dict(stored.attributes) != item.attributes
        ):
            todo.append(item)
    return todo


def _drain_pending(client, pipeline: Pipeline, generation: str, rounds: int = 5) -> int:
    """Embeds items pending in the generation from their uri until none are left (or no progress)."""
    done = 0
    for _ in range(rounds):
        pending = [ItemRow(i.id, i.uri, i.label, dict(i.attributes)) for i in client.list_pending(generation)]
        pending = [i for i in pending if i.id not in {f for f, _ in pipeline.failed}]
        if not pending:
            break
        print(f"embedding {len(pending)} pending items of {generation}")
        done += pipeline.run(pending, lambda _dim, _version: generation)
    return done


def _check(client, generation: str, samples: int, allow_pending: bool = False) -> None:
    """Counts match across shards, nothing pending, and sampled items are their own nearest neighbour."""
    gens = [client.get_generation(generation, shard=s) for s in range(client.shard_count)]
    stats = client.stats()
    in_generation = sum(g.item_count for g in gens)
    catalogue = sum(s.item_count for s in stats)
    pending = sum(g.pending_count for g in gens)
    print(f"check: {in_generation} vectors for {catalogue} catalogue items, {pending} pending")
    if (pending or in_generation != catalogue) and not allow_pending:
        raise FailedPrecondition(
            f"check failed: generation {generation} has {in_generation} vectors for {catalogue} "
            f"catalogue items ({pending} pending); run again to resume, or pass --allow-pending"
        )
    if samples <= 0 or in_generation == 0:
        return
    records = []
    for record in client.list_items(generation, include_vectors=True, page_size=max(samples, 1)):
        records.append(record)
        if len(records) >= samples:
            break
    answer = client.knn(
        np.array([list(r.vector) for r in records], np.float32),
        1,
        generation=generation,
        require_active=False,
    )
    for record, neighbours in zip(records, answer.results, strict=True):
        top = neighbours.hits[0] if neighbours.hits else None
        # A duplicate image may tie with the item itself; the score must still be the best possible.
        if top is None or (
            top.id != record.item.id and top.score < _self_score(record, answer.generation.metric) - 1e-4
        ):
            raise FailedPrecondition(
                f"check failed: item {record.item.id!r} does not find itself first in "
                f"{generation} (got {top.id if top else 'nothing'!r})"
            )


def _self_score(record: indexer_pb2.Record, metric: int) -> float:
    v = np.asarray(record.vector, np.float32)
    if metric == types_pb2.METRIC_L2:
        return 1.0
    if metric == types_pb2.METRIC_INNER_PRODUCT:
        return float(v @ v)
    return 1.0


def export(client, generation: str, output: Path) -> int:
    """Writes ids, labels, uris and vectors of a generation to an .npz (plus the space it came from)."""
    gen = client.get_generation(generation) if generation else client.active_generation()
    ids, labels, uris, vectors = [], [], [], []
    for record in client.list_items(gen.name, include_vectors=True):
        ids.append(record.item.id)
        labels.append(record.item.label)
        uris.append(record.item.uri)
        vectors.append(np.asarray(record.vector, np.float32))
    output.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        output,
        ids=np.array(ids, dtype=str),
        labels=np.array(labels, dtype=str),
        uris=np.array(uris, dtype=str),
        vectors=np.stack(vectors) if vectors else np.zeros((0, gen.dimension), np.float32),
        generation=gen.name,
        model_name=gen.space.model_name,
        model_version=gen.space.model_version,
        metric=types_pb2.Metric.Name(gen.metric),
    )
    return len(ids)
