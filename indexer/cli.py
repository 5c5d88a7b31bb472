"""Command line of the indexer: `serve`, `reindex`, `follow`, `stats`, `delete`, `generations`, `export`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from cbir.cli import run_main
from cbir.config import env_flag
from cbir.defaults import INDEXER_METRICS_PORT, INDEXER_PORT
from cbir.errors import InvalidInput
from cbir.logs import configure_cli_logging
from cbir.server import ServerOptions, add_common_flags, serve_until_signalled
from cbir.tls import ClientTLS
from indexer.core import IndexerConfig
from indexer.indexes import INDEX_TYPE_NAMES, index_type_name

if TYPE_CHECKING:
    from cbir.v1 import indexer_pb2
    from indexer.client import IndexerClient

ENV = "CBIR_INDEXER"
log = logging.getLogger("indexer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m indexer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="Run the IndexerService gRPC server.",
        description="Run the IndexerService: durable item store + HNSW generations.",
    )
    add_common_flags(serve, env_prefix=ENV, port=INDEXER_PORT, metrics_port=INDEXER_METRICS_PORT)
    env_flag(
        serve,
        "--data-dir",
        env=f"{ENV}_DATA_DIR",
        default="indexer-data",
        help="Folder of the item store and HNSW snapshots.",
    )
    env_flag(
        serve,
        "--shard-id",
        env=f"{ENV}_SHARD_ID",
        default=IndexerConfig.shard_id,
        type=int,
        help="This shard's number (0-based).",
    )
    env_flag(
        serve,
        "--shard-count",
        env=f"{ENV}_SHARD_COUNT",
        default=IndexerConfig.shard_count,
        type=int,
        help="Number of shards.",
    )
    env_flag(
        serve,
        "--max-k",
        env=f"{ENV}_MAX_K",
        default=IndexerConfig.max_k,
        type=int,
        help="Largest k a query may ask.",
    )
    env_flag(
        serve,
        "--max-batch",
        env=f"{ENV}_MAX_BATCH",
        default=IndexerConfig.max_batch,
        type=int,
        help="Most records / queries / ids per message.",
    )
    env_flag(
        serve,
        "--hnsw-m",
        env=f"{ENV}_HNSW_M",
        default=IndexerConfig.default_m,
        type=int,
        help="Default HNSW M.",
    )
    env_flag(
        serve,
        "--hnsw-ef-construction",
        env=f"{ENV}_HNSW_EF_CONSTRUCTION",
        default=IndexerConfig.default_ef_construction,
        type=int,
        help="Default HNSW ef_construction.",
    )
    env_flag(
        serve,
        "--hnsw-ef-search",
        env=f"{ENV}_HNSW_EF_SEARCH",
        default=IndexerConfig.default_ef_search,
        type=int,
        help="Default HNSW ef for queries (raised to k).",
    )
    env_flag(
        serve,
        "--index-type",
        env=f"{ENV}_INDEX_TYPE",
        default=index_type_name(IndexerConfig.default_index_type),
        choices=sorted(INDEX_TYPE_NAMES),
        help="Index type of a generation created without one (hnsw, or partitions: IVF-flat, see "
        "indexer/README.md).",
    )
    env_flag(
        serve,
        "--exact-threshold",
        env=f"{ENV}_EXACT_THRESHOLD",
        default=IndexerConfig.exact_threshold,
        type=int,
        help="Filtered queries matching at most this many items use exact search.",
    )
    env_flag(
        serve,
        "--compact-fraction",
        env=f"{ENV}_COMPACT_FRACTION",
        default=IndexerConfig.compact_fraction,
        type=float,
        help="Rebuild a graph when this fraction of its slots are deleted.",
    )
    env_flag(
        serve,
        "--snapshot-interval",
        env=f"{ENV}_SNAPSHOT_INTERVAL",
        default=IndexerConfig.snapshot_interval,
        type=float,
        help="Seconds between HNSW snapshots (only of graphs that changed).",
    )

    def client_flags(p: argparse.ArgumentParser) -> None:
        env_flag(
            p,
            "--indexer",
            env=f"{ENV}_TARGETS",
            default=f"127.0.0.1:{INDEXER_PORT}",
            help="Comma-separated indexer addresses, shard 0 first.",
        )
        env_flag(p, "--tls-ca", env=f"{ENV}_TLS_CA", default=None, help="CA (PEM) to trust for TLS indexers.")
        env_flag(p, "--timeout", env=f"{ENV}_TIMEOUT", default=30.0, type=float, help="Seconds per RPC.")

    from indexer import follow, reindex

    reindex.add_parser(sub, client_flags)
    follow.add_parser(sub, client_flags)

    stats = sub.add_parser("stats", help="Show each shard's counts, memory and generations (JSON).")
    client_flags(stats)

    delete = sub.add_parser("delete", help="Delete items from the catalogue (and every generation).")
    client_flags(delete)
    delete.add_argument("ids", nargs="+", help="Item ids.")
    delete.add_argument("--allow-missing", action="store_true", help="Ignore ids that do not exist.")

    gens = sub.add_parser("generations", help="List, activate or drop generations.")
    client_flags(gens)
    gens.add_argument("action", choices=["list", "activate", "drop"])
    gens.add_argument("name", nargs="?", help="Generation (activate/drop).")
    gens.add_argument("--allow-pending", action="store_true", help="Activate even with pending items.")

    export = sub.add_parser("export", help="Write ids, labels and vectors of a generation to an .npz.")
    client_flags(export)
    export.add_argument("--generation", default="", help="Generation (default: the active one).")
    export.add_argument("--output", required=True, help="Output .npz file.")
    return parser


def make_client(args: argparse.Namespace) -> IndexerClient:
    """An IndexerClient for the --indexer/--tls-ca/--timeout flags."""
    from indexer.client import IndexerClient

    targets = [t.strip() for t in args.indexer.split(",") if t.strip()]
    return IndexerClient(
        targets, tls=ClientTLS(ca_file=args.tls_ca) if args.tls_ca else None, timeout=args.timeout
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_main(lambda: _run(args, parser))


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "serve":
        return _serve(args)
    if args.command in ("follow", "reindex"):
        # They speak TF Serving's protocol but never run TensorFlow: load its protos only
        # (seconds and hundreds of MB less at start-up; see the module).
        from gateway.light_imports import use_tensorflow_protos_only

        use_tensorflow_protos_only()
    if args.command == "follow":
        from indexer import follow

        return follow.run(args, make_client)
    if args.command != "reindex":
        configure_cli_logging("INFO", "%(message)s")
    if args.command == "reindex":
        from indexer import reindex

        return reindex.run(args, make_client)
    with make_client(args) as client:
        if args.command == "stats":
            from google.protobuf.json_format import MessageToDict

            print(json.dumps([MessageToDict(s) for s in client.stats()], indent=2))
        elif args.command == "delete":
            print(f"deleted {client.delete(args.ids, allow_missing=args.allow_missing)} items")
        elif args.command == "generations":
            return _generations(client, args, parser)
        elif args.command == "export":
            from indexer.reindex import export

            count = export(client, args.generation, Path(args.output))
            print(f"exported {count} items to {args.output}")
    return 0


def _index_description(g: indexer_pb2.Generation) -> str:
    from cbir.v1 import indexer_pb2

    if g.index_type == indexer_pb2.INDEX_TYPE_PARTITIONS:
        return f"partitions(lists={g.partition_lists})"
    return "hnsw"


def _generations(client: IndexerClient, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cbir.v1 import indexer_pb2, types_pb2

    if args.action == "list":
        generations = client.list_generations()
        active = {g.name for g in generations if g.state == indexer_pb2.GENERATION_STATE_ACTIVE}
        for g in generations:
            print(
                f"{g.name}\t{indexer_pb2.GenerationState.Name(g.state).removeprefix('GENERATION_STATE_').lower()}"
                f"\t{g.space.model_name}:{g.space.model_version}\t{types_pb2.Metric.Name(g.metric)}"
                f"\tdim={g.dimension}\titems={g.item_count}\tpending={g.pending_count}"
                f"\t{_index_description(g)}" + ("\t*" if g.name in active else "")
            )
            if g.HasField("rollout"):
                print(f"  rollout {_describe_rollout(g.rollout)}")
        names = {g.name for g in generations}
        dropped = [d for d in client.list_rollouts() if d.generation not in names]
        if dropped:
            print("rollout decisions about dropped generations:")
            for d in dropped:
                print(f"  {d.generation}\t{d.model_name}:{d.model_version}\t{_describe_rollout(d)}")
        return 0
    if not args.name:
        parser.error(f"generations {args.action} needs a generation name")
    if args.action == "activate":
        client.activate_generation(args.name, allow_pending=args.allow_pending)
        print(f"activated {args.name}")
    else:
        client.drop_generation(args.name)
        print(f"dropped {args.name}")
    return 0


def _figure_order(pair: tuple[str, float]) -> tuple[str, int]:
    """recall@1, recall@5, recall@10 in that order (not as strings sort)."""
    name, _, depth = pair[0].partition("@")
    return (name, int(depth) if depth.isdigit() else 0)


def _describe_rollout(d: indexer_pb2.RolloutDecision) -> str:
    """One line: verdict, when, both generations' figures, timings, reason."""
    from cbir.v1 import indexer_pb2

    verdict = indexer_pb2.RolloutVerdict.Name(d.verdict).removeprefix("ROLLOUT_VERDICT_").lower()
    when = d.activated_at if d.HasField("activated_at") else d.decided_at
    what = "activated" if d.HasField("activated_at") else "decided"
    figures = ", ".join(
        f"{name} {value:.3f}" + (f" vs {d.active_metrics[name]:.3f}" if name in d.active_metrics else "")
        for name, value in sorted(d.candidate_metrics.items(), key=_figure_order)
    )
    against = f" (vs {d.active_generation}, version {d.active_model_version})" if d.active_generation else ""
    return (
        f"{verdict}, {what} {when.ToJsonString()}: {figures}{against} on {d.evaluation_queries} queries; "
        f"reindex {d.reindex_seconds:.1f} s, evaluation {d.evaluation_seconds:.1f} s, "
        f"activation {d.activation_seconds:.1f} s; {d.reason}"
    )


def _serve(args: argparse.Namespace) -> int:
    from indexer.core import IndexerCore
    from indexer.server import serve

    if not 0 <= args.shard_id < args.shard_count:
        raise InvalidInput(f"--shard-id must be 0..{args.shard_count - 1}, got {args.shard_id}")
    options = ServerOptions.from_args("indexer", args)
    config = IndexerConfig(
        data_dir=Path(args.data_dir),
        shard_id=args.shard_id,
        shard_count=args.shard_count,
        max_k=args.max_k,
        max_batch=args.max_batch,
        default_m=args.hnsw_m,
        default_ef_construction=args.hnsw_ef_construction,
        default_ef_search=args.hnsw_ef_search,
        default_index_type=INDEX_TYPE_NAMES[args.index_type],
        exact_threshold=args.exact_threshold,
        compact_fraction=args.compact_fraction,
        snapshot_interval=args.snapshot_interval,
    )
    running = serve(options, IndexerCore(config))
    return serve_until_signalled(running)
