"""Command line of the gateway: `serve` (the SearchService) and `search` (a tiny client)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cbir import defaults
from cbir.cli import run_main
from cbir.config import env_flag
from cbir.errors import CbirError, InvalidInput
from cbir.memory import return_large_frees_to_the_os
from cbir.server import ServerOptions, add_common_flags, serve_until_signalled
from cbir.tls import ClientTLS
from gateway.images import PILLOW_BOMB_LIMIT, ImageLimits
from gateway.search import SearchLimits
from gateway.server import GatewayConfig, HttpOptions, build_gateway

ENV = "CBIR_GATEWAY"


def _targets(values: list[str] | str | None) -> list[str]:
    """--indexer may be repeated and/or comma-separated; order is shard order."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def _client_tls(args: argparse.Namespace, prefix: str) -> ClientTLS | None:
    ca, cert, key, name = (
        getattr(args, f"{prefix}_tls_{part}") for part in ("ca", "cert", "key", "server_name")
    )
    if not (ca or cert or key or getattr(args, f"{prefix}_tls")):
        return None
    return ClientTLS(ca_file=ca, cert_file=cert, key_file=key, server_name=name)


def _add_client_tls_flags(parser: argparse.ArgumentParser, prefix: str, what: str) -> None:
    up = prefix.upper()
    env_flag(
        parser,
        f"--{prefix}-tls",
        env=f"{ENV}_{up}_TLS",
        default=False,
        type=bool,
        help=f"Use TLS to {what} (implied by any --{prefix}-tls-* file flag).",
    )
    env_flag(
        parser,
        f"--{prefix}-tls-ca",
        env=f"{ENV}_{up}_TLS_CA",
        default=None,
        help=f"CA (PEM) that {what}'s certificate must chain to (default: system roots).",
    )
    env_flag(
        parser,
        f"--{prefix}-tls-cert",
        env=f"{ENV}_{up}_TLS_CERT",
        default=None,
        help=f"Client certificate (PEM) presented to {what}.",
    )
    env_flag(
        parser,
        f"--{prefix}-tls-key",
        env=f"{ENV}_{up}_TLS_KEY",
        default=None,
        help=f"Client private key (PEM) for --{prefix}-tls-cert.",
    )
    env_flag(
        parser,
        f"--{prefix}-tls-server-name",
        env=f"{ENV}_{up}_TLS_SERVER_NAME",
        default=None,
        help=f"Expected name in {what}'s certificate when it differs from the target host.",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway", description="CBIR search gateway: the public SearchService."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="Run the SearchService.",
        description="Run the SearchService (Search, BatchSearch, GetServingInfo).",
    )
    add_common_flags(
        serve, env_prefix=ENV, port=defaults.GATEWAY_PORT, metrics_port=defaults.GATEWAY_METRICS_PORT
    )
    env_flag(
        serve,
        "--serving",
        env=f"{ENV}_SERVING",
        default=f"localhost:{defaults.SERVING_GRPC_PORT}",
        help="TF Serving (or `python -m embedder serve`) gRPC target; dns:///host:port balances over replicas.",
    )
    env_flag(
        serve,
        "--model-name",
        env=f"{ENV}_MODEL_NAME",
        default=None,
        help="Model name to embed with. Default: the model of the active index generation. When set, a "
        "generation of another model makes searches fail with FAILED_PRECONDITION.",
    )
    serve.add_argument(
        "--indexer",
        action="append",
        default=None,
        help=f"Indexer shard target; repeat or comma-separate, shard i = i-th address "
        f"(default: localhost:{defaults.INDEXER_PORT}; env {ENV}_INDEXER, comma-separated).",
    )
    env_flag(
        serve,
        "--max-k",
        env=f"{ENV}_MAX_K",
        default=SearchLimits.max_k,
        type=int,
        help="Largest k a query may ask for.",
    )
    env_flag(
        serve,
        "--max-batch",
        env=f"{ENV}_MAX_BATCH",
        default=SearchLimits.max_batch,
        type=int,
        help="Most queries in a BatchSearch.",
    )
    env_flag(
        serve,
        "--max-image-bytes",
        env=f"{ENV}_MAX_IMAGE_BYTES",
        default=ImageLimits.max_bytes,
        type=int,
        help="Largest encoded query image (RESOURCE_EXHAUSTED above).",
    )
    env_flag(
        serve,
        "--max-image-pixels",
        env=f"{ENV}_MAX_IMAGE_PIXELS",
        default=ImageLimits.max_pixels,
        type=int,
        help="Largest width*height, read from the image header before decoding (RESOURCE_EXHAUSTED above); "
        f"at most {PILLOW_BOMB_LIMIT} (Pillow's decompression-bomb limit).",
    )
    env_flag(
        serve,
        "--max-decode-bytes-in-flight",
        env=f"{ENV}_MAX_DECODE_BYTES_IN_FLIGHT",
        default=ImageLimits.max_decode_bytes_in_flight,
        type=int,
        help="Memory that query-image decodes of all requests may hold at once (estimated per format); "
        "more waits its turn, RESOURCE_EXHAUSTED when the deadline comes first. See gateway/README.md, Memory.",
    )
    env_flag(
        serve,
        "--generation-retries",
        env=f"{ENV}_GENERATION_RETRIES",
        default=SearchLimits.generation_retries,
        type=int,
        help="Times a search is redone when the active generation changes under it.",
    )
    env_flag(
        serve,
        "--generation-ttl",
        env=f"{ENV}_GENERATION_TTL",
        default=SearchLimits.generation_ttl,
        type=float,
        help="Seconds the active generation read from shard 0 is reused.",
    )
    env_flag(
        serve,
        "--dependency-timeout",
        env=f"{ENV}_DEPENDENCY_TIMEOUT",
        default=SearchLimits.dependency_timeout,
        type=float,
        help="Longest wait for Serving or an indexer per call (the caller's deadline, if shorter, wins).",
    )
    env_flag(
        serve,
        "--coalesce-in-flight",
        env=f"{ENV}_COALESCE_IN_FLIGHT",
        default=SearchLimits.coalesce_in_flight,
        type=int,
        help="Concurrent image searches are merged into shared Serving/indexer calls, with at most this "
        "many merged batches in flight; 0 sends every search on its own.",
    )
    env_flag(
        serve,
        "--probe-period",
        env=f"{ENV}_PROBE_PERIOD",
        default=GatewayConfig.probe_period,
        type=float,
        help="Seconds between health probes of Serving and the indexer shards.",
    )
    env_flag(
        serve,
        "--probe-timeout",
        env=f"{ENV}_PROBE_TIMEOUT",
        default=GatewayConfig.probe_timeout,
        type=float,
        help="Timeout of each health probe call.",
    )
    env_flag(
        serve,
        "--api-keys-file",
        env=f"{ENV}_API_KEYS_FILE",
        default=None,
        help="File of accepted API keys, one per line (KEY or KEY:search+info). With it or "
        f"{ENV}_API_KEYS set, SearchService calls need 'authorization: Bearer KEY' or 'x-api-key: KEY'.",
    )
    env_flag(
        serve,
        "--http-port",
        env=f"{ENV}_HTTP_PORT",
        default=HttpOptions.port,
        type=int,
        help="Port of the HTTP/JSON API and the search page at / (0 picks a free one, -1 disables); same "
        "host, TLS files, API keys and limits as the gRPC port.",
    )
    env_flag(
        serve,
        "--http-port-file",
        env=f"{ENV}_HTTP_PORT_FILE",
        default=None,
        help="Write the bound HTTP port here once serving (useful with --http-port 0).",
    )
    env_flag(
        serve,
        "--catalogue-root",
        env=f"{ENV}_CATALOGUE_ROOT",
        default=None,
        help="Folder of the catalogue images: GET /v1/items/{id}/image serves an item's file only when it "
        "lies under it (symlinks resolved). Without it only http(s) uris are served, as redirects.",
    )
    _add_client_tls_flags(serve, "serving", "Serving")
    _add_client_tls_flags(serve, "indexer", "the indexer shards")

    search = sub.add_parser("search", help="Call Search on a running gateway and print the hits as JSON.")
    env_flag(
        search,
        "--target",
        env=f"{ENV}_TARGET",
        default=f"localhost:{defaults.GATEWAY_PORT}",
        help="Gateway address.",
    )
    what = search.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="Query image file.")
    what.add_argument("--item-id", help="Search like this catalogue item (it is excluded from the hits).")
    search.add_argument(
        "--k", type=int, default=0, help=f"Number of hits (0: the gateway default, {SearchLimits.default_k})."
    )
    search.add_argument(
        "--label", action="append", default=[], help="Only items with this label (repeatable)."
    )
    search.add_argument(
        "--attr",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Only items whose attribute KEY is VALUE (repeatable; same KEY twice = OR).",
    )
    search.add_argument("--min-score", type=float, default=None, help="Drop hits scoring below this.")
    search.add_argument("--timeout", type=float, default=30.0, help="Deadline of the call, in seconds.")
    search.add_argument(
        "--api-key", default=os.environ.get(f"{ENV}_API_KEY"), help=f"API key to send (env {ENV}_API_KEY)."
    )
    search.add_argument("--tls-ca", default=None, help="CA (PEM) of the gateway's certificate; enables TLS.")
    search.add_argument("--tls-server-name", default=None, help="Expected name in the gateway's certificate.")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from gateway.light_imports import use_tensorflow_protos_only

    use_tensorflow_protos_only()
    # Image decodes free tens of MB at a time on many threads: without this glibc keeps them per
    # thread, and RSS grows past --max-decode-bytes-in-flight (gateway/README.md, Memory).
    return_large_frees_to_the_os()
    indexers = (
        _targets(args.indexer)
        or _targets(os.environ.get(f"{ENV}_INDEXER"))
        or [f"localhost:{defaults.INDEXER_PORT}"]
    )
    for name in ("max_k", "max_batch", "max_image_bytes", "max_image_pixels", "max_decode_bytes_in_flight"):
        if getattr(args, name) < 1:
            raise InvalidInput(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_image_pixels > PILLOW_BOMB_LIMIT:
        # Pillow's guard would reject such images before the gateway's own check could admit them.
        raise InvalidInput(
            f"--max-image-pixels must be at most {PILLOW_BOMB_LIMIT} (Pillow's decompression-bomb "
            f"limit), got {args.max_image_pixels}"
        )
    if args.http_port < -1 or args.http_port > 65535:
        raise InvalidInput(
            f"--http-port must be a port number, 0 (a free port) or -1 (off), got {args.http_port}"
        )
    if args.catalogue_root and not Path(args.catalogue_root).is_dir():
        raise InvalidInput(f"--catalogue-root {args.catalogue_root!r} is not a folder")
    limits = SearchLimits(
        max_k=args.max_k,
        max_batch=args.max_batch,
        images=ImageLimits(
            max_bytes=args.max_image_bytes,
            max_pixels=args.max_image_pixels,
            max_decode_bytes_in_flight=args.max_decode_bytes_in_flight,
        ),
        generation_retries=max(0, args.generation_retries),
        generation_ttl=max(0.0, args.generation_ttl),
        dependency_timeout=args.dependency_timeout,
        coalesce_in_flight=max(0, args.coalesce_in_flight),
    )
    config = GatewayConfig(
        serving=args.serving,
        indexers=tuple(indexers),
        model_name=args.model_name or None,
        limits=limits,
        serving_tls=_client_tls(args, "serving"),
        indexer_tls=_client_tls(args, "indexer"),
        api_keys_file=args.api_keys_file,
        api_keys_env=os.environ.get(f"{ENV}_API_KEYS"),
        probe_period=args.probe_period,
        probe_timeout=args.probe_timeout,
        max_message_bytes=args.max_message_bytes,
        http=HttpOptions(
            port=args.http_port, port_file=args.http_port_file, catalogue_root=args.catalogue_root or None
        ),
    )
    options = ServerOptions.from_args("gateway", args)
    running = build_gateway(options, config)
    return serve_until_signalled(running)


def _search(args: argparse.Namespace) -> int:
    from cbir.channels import open_channel
    from cbir.v1 import search_pb2, search_pb2_grpc, types_pb2

    request = search_pb2.SearchRequest(k=args.k)
    if args.image:
        try:
            request.image = Path(args.image).read_bytes()
        except OSError as exc:
            raise CbirError(f"cannot read --image {args.image!r}: {exc.strerror or exc}") from None
    else:
        request.item_id = args.item_id
    attributes: dict[str, list[str]] = {}
    for pair in args.attr:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CbirError(f"--attr needs KEY=VALUE, got {pair!r}")
        attributes.setdefault(key, []).append(value)
    if args.label or attributes:
        request.filter.CopyFrom(
            types_pb2.Filter(
                labels=args.label,
                attributes=[types_pb2.AttributeFilter(key=k, values=v) for k, v in attributes.items()],
            )
        )
    if args.min_score is not None:
        request.min_score = args.min_score
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    tls = ClientTLS(ca_file=args.tls_ca, server_name=args.tls_server_name) if args.tls_ca else None
    with open_channel(args.target, tls=tls) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        response = stub.Search(request, timeout=args.timeout, metadata=metadata)
    from google.protobuf.json_format import MessageToDict

    print(json.dumps(MessageToDict(response, preserving_proto_field_name=True), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_main(lambda: _serve(args) if args.command == "serve" else _search(args))
