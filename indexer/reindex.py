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

With ``--partition i/n`` a run is one of n workers (a Kubernetes Indexed Job, or n local processes):
it embeds only the items of its partition (and drains only their pending ones) into the generation
all n share (``<model>-v<version>``, the version pinned up front), and the worker that finds every
partition complete and the counts right checks and activates it.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from cbir.cli import INTERRUPTED_EXIT
from cbir.defaults import SERVING_GRPC_PORT
from cbir.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound, NotReady
from cbir.logs import configure_cli_logging
from cbir.metric import METRIC_NAMES, Metric
from cbir.sharding import shard_of
from cbir.v1 import indexer_pb2, types_pb2
from indexer.core import check_item
from indexer.indexes import INDEX_TYPE_NAMES
from indexer.store import ItemRow

if TYPE_CHECKING:
    from cbir.catalogue import CatalogueEntry
    from embedder.client import EmbedderClient
    from indexer.client import IndexerClient


class Progress(Protocol):
    """What the pipeline needs of a progress bar (tqdm's)."""

    def update(self, n: int) -> object: ...


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partition:
    """Worker ``index`` of ``count``: the items whose id hashes to ``index`` (cbir.sharding.shard_of).

    Stable: the same id falls in the same partition in every process and run, so n workers cover the
    catalogue exactly once, and a retried worker redoes only its own items.
    """

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Partition:
        """``"i/n"`` with 0 <= i < n, e.g. ``"2/3"`` (on Kubernetes: ``$(JOB_COMPLETION_INDEX)/3``)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
        if not match:
            raise InvalidInput(f"--partition must be i/n (e.g. 0/3), got {text!r}")
        index, count = int(match[1]), int(match[2])
        if count < 1 or not 0 <= index < count:
            raise InvalidInput(f"--partition {text}: need n >= 1 and 0 <= i < n")
        return cls(index, count)

    def owns(self, item_id: str) -> bool:
        return shard_of(item_id, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class ReindexOptions:
    """What to embed with and how; the CLI builds it from its flags (whose defaults are these)."""

    model: str
    serving: str = f"127.0.0.1:{SERVING_GRPC_PORT}"
    model_version: int | None = None
    signature: str = "serving_default"
    generation: str | None = None
    resume: bool = False
    metric: str = "cosine"
    hnsw_m: int = 0
    hnsw_ef_construction: int = 0
    hnsw_ef_search: int = 0
    # "" (the server's --index-type), "hnsw" or "partitions"; lists/probes 0: automatic/default.
    index_type: str = ""
    partition_lists: int = 0
    partition_probes: int = 0
    batch_size: int = 32
    readers: int = 4
    prefetch: int = 4
    serving_timeout: float = 60.0
    check_samples: int = 20
    activate: bool = True
    allow_pending: bool = False
    progress: bool = True
    partition: Partition | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InvalidInput("--batch-size must be >= 1")
        Metric.from_name(self.metric)  # InvalidInput naming the spellings --metric accepts


_DEFAULTS = ReindexOptions(model="")


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    client_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    d = _DEFAULTS
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
    p.add_argument("--serving", default=d.serving, help="TF Serving (or local model server) gRPC address.")
    p.add_argument(
        "--model", required=False, default=None, help="Served model name (required unless --dry-run)."
    )
    p.add_argument(
        "--model-version",
        type=int,
        default=d.model_version,
        help="Model version to use (default: the latest served; pinned for the whole run).",
    )
    p.add_argument("--signature", default=d.signature, help="Serving signature taking encoded images.")
    p.add_argument(
        "--generation",
        default=d.generation,
        help="Generation name (default <model>-v<version>-<UTC time>, with --partition <model>-v<version>); "
        "an existing one is resumed.",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="Resume the newest building generation of this model version (or --generation).",
    )
    p.add_argument(
        "--partition",
        default=None,
        type=_partition_flag,
        help="Embed only partition i of n (i/n, e.g. 0/3; on Kubernetes $(JOB_COMPLETION_INDEX)/n) into the "
        "generation n workers share; the worker that completes it checks and activates it.",
    )
    p.add_argument("--metric", default=d.metric, choices=sorted(METRIC_NAMES))
    p.add_argument("--hnsw-m", type=int, default=d.hnsw_m, help="HNSW M (0: the server default).")
    p.add_argument("--hnsw-ef-construction", type=int, default=d.hnsw_ef_construction)
    p.add_argument("--hnsw-ef-search", type=int, default=d.hnsw_ef_search)
    p.add_argument(
        "--index-type",
        default=d.index_type,
        choices=["", *sorted(INDEX_TYPE_NAMES)],
        help="Index type of a new generation (default: the server's --index-type).",
    )
    p.add_argument(
        "--partition-lists", type=int, default=d.partition_lists, help="Partition lists (0: automatic)."
    )
    p.add_argument(
        "--partition-probes", type=int, default=d.partition_probes, help="Partition probes (0: default)."
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="Images per Predict call.")
    p.add_argument(
        "--readers", type=int, default=d.readers, help="Threads reading image files ahead of Serving."
    )
    p.add_argument(
        "--prefetch", type=int, default=d.prefetch, help="Batches read ahead of the one being embedded."
    )
    p.add_argument(
        "--serving-timeout", type=float, default=d.serving_timeout, help="Seconds per Predict call."
    )
    p.add_argument(
        "--check-samples", type=int, default=d.check_samples, help="Items queried to check the generation."
    )
    p.add_argument("--no-activate", action="store_true", help="Build and check, but do not activate.")
    p.add_argument("--allow-pending", action="store_true", help="Activate even if items stay pending.")
    p.add_argument("--dry-run", action="store_true", help="Read and validate the catalogue, write nothing.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")


def _partition_flag(text: str) -> Partition:
    try:
        return Partition.parse(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def options_from_args(args: argparse.Namespace) -> ReindexOptions:
    """The reindex flags as options (raises InvalidInput for a bad combination)."""
    if not args.model:
        raise InvalidInput("--model is required (the served model name)")
    return ReindexOptions(
        model=args.model,
        serving=args.serving,
        model_version=args.model_version,
        signature=args.signature,
        generation=args.generation,
        resume=args.resume,
        metric=args.metric,
        hnsw_m=args.hnsw_m,
        hnsw_ef_construction=args.hnsw_ef_construction,
        hnsw_ef_search=args.hnsw_ef_search,
        index_type=args.index_type,
        partition_lists=args.partition_lists,
        partition_probes=args.partition_probes,
        batch_size=args.batch_size,
        readers=args.readers,
        prefetch=args.prefetch,
        serving_timeout=args.serving_timeout,
        check_samples=args.check_samples,
        activate=not args.no_activate,
        allow_pending=args.allow_pending,
        progress=not args.no_progress,
        partition=args.partition,
    )


def open_embedder(options: ReindexOptions) -> EmbedderClient:
    """The Serving client the options describe (model, address, signature, timeout)."""
    from embedder.client import EmbedderClient

    return EmbedderClient(
        options.serving, options.model, signature_name=options.signature, timeout=options.serving_timeout
    )


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
    partition: Partition | None = None
    # Every partition is in (always true without --partition), the counts agree and nothing is pending.
    complete: bool = True

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


def entry_items(entries: Iterable[CatalogueEntry]) -> list[ItemRow]:
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


def embed_keeping_good(
    embedder: EmbedderClient, images: Sequence[bytes], *, version: int | None, timeout: float
) -> tuple[list[int], np.ndarray, int | None, list[tuple[int, str]]]:
    """Embeds ``images``, leaving out the ones Serving rejects instead of failing the batch.

    Returns (positions embedded, their vectors, the model version that answered, (position, reason)
    of each rejected image). EmbedderClient names the culprit of a rejected batch (InvalidImage);
    it is dropped and the rest sent again.
    """
    from embedder.client import InvalidImage

    positions = list(range(len(images)))
    rejected: list[tuple[int, str]] = []
    while positions:
        try:
            result = embedder.embed([images[j] for j in positions], version=version, timeout=timeout)
        except InvalidImage as exc:
            rejected.append((positions.pop(exc.index), exc.message))
            continue
        return positions, np.asarray(result.vectors, dtype=np.float32), int(result.model_version), rejected
    return [], np.zeros((0, 0), np.float32), None, rejected


class Pipeline:
    """Reads images ahead in a thread pool, embeds batch by batch at a pinned version, upserts behind."""

    def __init__(
        self,
        embedder: EmbedderClient,
        client: IndexerClient,
        options: ReindexOptions,
        progress: Progress | None = None,
    ) -> None:
        self.embedder = embedder
        self.client = client
        self.batch_size = options.batch_size
        self.readers = max(1, options.readers)
        self.prefetch = max(1, options.prefetch)
        self.timeout = options.serving_timeout
        self.progress = progress
        self.version: int | None = None
        self.failed: list[tuple[str, str]] = []
        # Time spent streaming (read -> embed -> upsert), without the set-up, drain and check.
        self.stream_seconds = 0.0

    def embed_items(
        self, items: Sequence[ItemRow], images: Sequence[bytes | None]
    ) -> tuple[list[ItemRow], np.ndarray]:
        """Vectors for the items whose image could be read and embedded; bad ones are recorded."""
        readable = [j for j, img in enumerate(images) if img is not None]
        kept, vectors, answered, rejected = embed_keeping_good(
            self.embedder,
            [img for img in images if img is not None],  # the images at ``readable``
            version=self.version,
            timeout=self.timeout,
        )
        for position, reason in rejected:
            self.failed.append((items[readable[position]].id, reason))
        if answered is not None:
            if self.version is None:
                self.version = answered
            elif answered != self.version:
                raise FailedPrecondition(
                    f"Serving answered with model version {answered}, not the pinned {self.version}"
                )
        return [items[readable[j]] for j in kept], vectors

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
            upsert: futures.Future[int] | None = None
            name = None
            for n, batch in enumerate(batches):
                images = reads[n].result()
                if n + self.prefetch < len(batches):
                    reads.append(reader.submit(self.read, batches[n + self.prefetch]))
                good, vectors = self.embed_items(batch, images)
                if good:
                    if name is None:
                        # Set by embed_items, which embedded this batch.
                        name = generation(vectors.shape[1], cast(int, self.version))
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


def run(args: argparse.Namespace, make_client: Callable[[argparse.Namespace], IndexerClient]) -> int:
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
        options = options_from_args(args)
        with make_client(args) as client, open_embedder(options) as embedder:
            report = reindex(items, options, client, embedder)
    except KeyboardInterrupt:
        # Other failures are reported by indexer/cli.py's main (cbir.cli.run_main).
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return INTERRUPTED_EXIT
    part = f"partition {report.partition}: " if report.partition else ""
    print(
        f"{part}generation {report.generation} (model {options.model} version {report.model_version}): "
        f"{report.catalogue_items} catalogue items, {report.embedded} embedded, {report.skipped} already "
        f"current, {report.pending_embedded} pending embedded, {len(report.failed)} failed, "
        f"{report.stream_items_per_second:.1f} items/s streaming, {report.items_per_second:.1f} items/s end to end; "
        f"{'complete' if report.complete else 'waiting for the other partitions'}, "
        f"{'activated' if report.activated else 'not activated'}"
    )
    for item_id, why in report.failed[:20]:
        print(f"  failed {item_id}: {why}", file=sys.stderr)
    if report.failed:
        print(
            f"not activating: {len(report.failed)} images failed; fix them and run again to resume "
            f"(--generation {report.generation})",
            file=sys.stderr,
        )
    return 1 if report.failed else 0


def _dry_run(items: list[ItemRow], args: argparse.Namespace) -> int:
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


def generation_name(options: ReindexOptions, version: int) -> str:
    """The generation a run writes to: --generation, else one every partition worker agrees on."""
    if options.generation:
        return options.generation
    if options.partition is not None:
        return f"{options.model}-v{version}"
    return f"{options.model}-v{version}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"


def _find_generation(client: IndexerClient, options: ReindexOptions) -> indexer_pb2.Generation | None:
    """The generation to resume, if any."""
    name = options.generation
    if not name and options.partition is not None and options.model_version is not None:
        name = generation_name(options, options.model_version)
    if name:
        try:
            found = client.get_generation(name)
            # Another partition worker may be creating it right now: on shard 0 already, on a later
            # shard not yet. Only a generation on every shard is joined as it is; otherwise this run
            # creates it too, which makes it exist everywhere before anything is written.
            for shard in range(1, client.shard_count):
                client.get_generation(name, shard=shard)
            return found
        except NotFound:
            if options.resume:
                raise
            return None
    if not options.resume:
        return None
    candidates = [
        g
        for g in client.list_generations()
        if g.state == indexer_pb2.GENERATION_STATE_BUILDING
        and g.space.model_name == options.model
        and (options.model_version is None or g.space.model_version == options.model_version)
    ]
    if not candidates:
        raise NotFound(f"--resume: no building generation of model {options.model!r} to resume")
    return candidates[0]


def _latest_available(embedder: EmbedderClient, model: str) -> int:
    versions = [v for v, state in embedder.model_versions().items() if state == "AVAILABLE"]
    if not versions:
        raise NotReady(f"Serving has no AVAILABLE version of model {model!r} yet")
    return max(versions)


class _Target:
    """The generation being written: created on the first embedded batch, or joined when it exists.

    Joining (another partition worker created it first, or a run resumes it) checks that it holds
    the same embedding space and dimension, so two spaces never meet in one generation.
    """

    def __init__(
        self,
        client: IndexerClient,
        options: ReindexOptions,
        existing: indexer_pb2.Generation | None,
        say: Callable[[str], None],
    ) -> None:
        self.client = client
        self.options = options
        self.name = existing.name if existing is not None else None
        self.say = say

    def __call__(self, dim: int, version: int) -> str:
        if self.name is None:
            o = self.options
            name = generation_name(o, version)
            params = indexer_pb2.HnswParams(
                m=o.hnsw_m, ef_construction=o.hnsw_ef_construction, ef_search=o.hnsw_ef_search
            )
            space = types_pb2.EmbeddingSpace(model_name=o.model, model_version=version)
            try:
                self.client.create_generation(
                    name,
                    space,
                    Metric.from_name(o.metric),
                    dim,
                    params,
                    index_type=INDEX_TYPE_NAMES.get(o.index_type, 0),
                    partition_params=indexer_pb2.PartitionParams(
                        lists=o.partition_lists, probes=o.partition_probes
                    ),
                )
                self.say(f"created generation {name} (model {o.model} version {version}, dim {dim})")
            except AlreadyExists:
                self._join(self.client.get_generation(name), version, dim)
                self.say(f"joined generation {name} (model {o.model} version {version}, dim {dim})")
            self.name = name
        return self.name

    def _join(self, gen: indexer_pb2.Generation, version: int, dim: int) -> None:
        if (gen.space.model_name, gen.space.model_version, gen.dimension) != (
            self.options.model,
            version,
            dim,
        ):
            raise FailedPrecondition(
                f"generation {gen.name!r} holds model {gen.space.model_name} version "
                f"{gen.space.model_version} (dim {gen.dimension}); this run embedded with version {version} "
                f"(dim {dim}). Run again with --model-version {gen.space.model_version} to resume it"
            )
        if gen.state != indexer_pb2.GENERATION_STATE_BUILDING:
            raise FailedPrecondition(f"generation {gen.name!r} is not building; choose another --generation")


def reindex(
    items: list[ItemRow],
    options: ReindexOptions,
    client: IndexerClient,
    embedder: EmbedderClient,
    *,
    say: Callable[[str], None] = print,
) -> ReindexReport:
    """Embeds ``items`` (this worker's partition of them) into a generation; checks and activates it.

    ``client`` is an IndexerClient, ``embedder`` an EmbedderClient of ``options.model``; progress
    lines go to ``say``.
    """
    started = time.monotonic()
    part = options.partition
    if part is not None and options.model_version is None:
        # Every worker must pin the same version before its first batch, so that they agree on the
        # generation and a retried worker resumes it.
        options = replace(options, model_version=_latest_available(embedder, options.model))
    mine = [i for i in items if part.owns(i.id)] if part is not None else items
    existing = _find_generation(client, options)
    pipeline = Pipeline(embedder, client, options)
    skipped = 0
    todo = mine
    if existing is not None:
        if existing.state != indexer_pb2.GENERATION_STATE_BUILDING and not options.generation:
            raise FailedPrecondition(f"generation {existing.name!r} is not building")
        if options.model_version is not None and existing.space.model_version != options.model_version:
            raise FailedPrecondition(
                f"generation {existing.name!r} was built with version "
                f"{existing.space.model_version}, not {options.model_version}"
            )
        pipeline.version = int(existing.space.model_version)
        todo = _still_to_do(client, existing.name, mine)
        skipped = len(mine) - len(todo)
        say(f"resuming generation {existing.name}: {skipped} items already current, {len(todo)} to embed")
    elif options.model_version is not None:
        pipeline.version = options.model_version
    target = _Target(client, options, existing, say)
    if target.name is None and part is not None:
        # Create (or join) the shared generation before streaming: a worker whose partition of the
        # catalogue is empty still drains its pending items into it.
        dim = embedder.signature(pipeline.version).dim
        if dim > 0:
            target(dim, cast(int, pipeline.version))  # a partition worker pinned it above

    progress = None
    if options.progress and todo:
        from tqdm import tqdm

        progress = tqdm(total=len(todo), unit="img", desc="embedding", file=sys.stderr, smoothing=0.1)
    pipeline.progress = progress
    try:
        embedded = pipeline.run(todo, target)
    finally:
        if progress is not None:
            progress.close()
    if target.name is None:
        raise FailedPrecondition("no image could be embedded; nothing was written")
    name = target.name
    pending_embedded = _drain_pending(client, pipeline, name, target, part, say)
    complete = part is None or _complete(client, name, len(items), say)
    if complete:
        _check(client, name, options.check_samples, options.allow_pending, say)
    activated = False
    if options.activate and complete and not pipeline.failed:
        client.activate_generation(name, allow_pending=options.allow_pending)
        activated = True
    return ReindexReport(
        name,
        pipeline.version or 0,
        len(mine),
        embedded,
        skipped,
        pending_embedded,
        pipeline.failed,
        time.monotonic() - started,
        pipeline.stream_seconds,
        activated,
        part,
        complete,
    )


def _still_to_do(client: IndexerClient, generation: str, items: list[ItemRow]) -> list[ItemRow]:
    """Items without a current vector in the generation (missing, pending, or changed in the catalogue)."""
    if not items:
        return []
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


def _drain_pending(
    client: IndexerClient,
    pipeline: Pipeline,
    generation: str,
    target: _Target,
    part: Partition | None,
    say: Callable[[str], None],
    rounds: int = 5,
) -> int:
    """Embeds items pending in the generation from their uri until none are left (or no progress).

    A partition worker takes only the pending items of its partition: the others are theirs.
    """
    done = 0
    for _ in range(rounds):
        failed = {f for f, _ in pipeline.failed}
        pending = [
            ItemRow(i.id, i.uri, i.label, dict(i.attributes))
            for i in client.list_pending(generation)
            if i.id not in failed and (part is None or part.owns(i.id))
        ]
        if not pending:
            break
        say(f"embedding {len(pending)} pending items of {generation}")
        done += pipeline.run(pending, target)
    return done


def _complete(
    client: IndexerClient, generation: str, catalogue_items: int, say: Callable[[str], None]
) -> bool:
    """Whether every partition is in: a current vector for every catalogue item, on every shard."""
    gens = [client.get_generation(generation, shard=s) for s in range(client.shard_count)]
    vectors = sum(g.item_count for g in gens)
    indexed = sum(s.item_count for s in client.stats())
    pending = sum(g.pending_count for g in gens)
    complete = pending == 0 and vectors == indexed and vectors >= catalogue_items
    if not complete:
        say(
            f"generation {generation}: {vectors} vectors for {max(indexed, catalogue_items)} items, "
            f"{pending} pending: waiting for the other partitions"
        )
    return complete


def _check(
    client: IndexerClient,
    generation: str,
    samples: int,
    allow_pending: bool = False,
    say: Callable[[str], None] = print,
) -> None:
    """Counts match across shards, nothing pending, and sampled items are their own nearest neighbour."""
    gens = [client.get_generation(generation, shard=s) for s in range(client.shard_count)]
    stats = client.stats()
    in_generation = sum(g.item_count for g in gens)
    catalogue = sum(s.item_count for s in stats)
    pending = sum(g.pending_count for g in gens)
    say(f"check: {in_generation} vectors for {catalogue} catalogue items, {pending} pending")
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
            top.id != record.item.id
            and top.score
            < Metric(answer.generation.metric).self_score(np.asarray(record.vector, np.float32)) - 1e-4
        ):
            raise FailedPrecondition(
                f"check failed: item {record.item.id!r} does not find itself first in "
                f"{generation} (got {top.id if top else 'nothing'!r})"
            )


def export(client: IndexerClient, generation: str, output: Path) -> int:
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
