"""Command line of the embedder: ``serve`` (local model server), ``embed`` and ``status`` (client).

``serve`` takes tensorflow_model_server's own flag names (``--port``, ``--rest_api_port``,
``--model_name``, ``--model_base_path``, ``--model_config_file``, ``--enable_batching``, ...) so the
same command lines and config files work with both; plus the common service flags of cbir.server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cbir.cli import run_main
from cbir.config import _parse_bool, env_flag
from cbir.defaults import SERVING_GRPC_PORT
from cbir.errors import CbirError, InvalidInput
from cbir.ports import ensure_can_listen
from cbir.server import ServerOptions, add_common_flags, serve_until_signalled
from embedder.settings import ModelServerSettings

if TYPE_CHECKING:
    import embedder.client

ENV_PREFIX = "CBIR_EMBEDDER"
DEFAULT_MAX_WORKERS = 64

log = logging.getLogger("embedder")


def _tf_bool_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, *, default: bool, help: str
) -> None:
    """A boolean flag written the TF Serving way: ``--flag``, ``--flag=true`` or ``--flag=false``."""
    env = f"{ENV_PREFIX}_{flag.lstrip('-').upper()}"
    env_flag(parser, flag, env=env, default=default, type=_parse_bool, nargs="?", const=True, help=help)


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    add_common_flags(parser, env_prefix=ENV_PREFIX, port=SERVING_GRPC_PORT, metrics_port=-1)
    if f"{ENV_PREFIX}_MAX_WORKERS" not in os.environ:
        # With batching, every request waiting for its batch holds an RPC thread: allow enough of
        # them for batches to fill (TF Serving's gRPC server is not limited to a few threads either).
        parser.set_defaults(max_workers=DEFAULT_MAX_WORKERS)
    p = ENV_PREFIX
    group = parser.add_argument_group("tensorflow_model_server flags (same names and meaning)")
    env_flag(
        group,
        "--rest_api_port",
        env=f"{p}_REST_API_PORT",
        default=0,
        type=int,
        help="Port of the REST API (predict, status, metadata, Prometheus); 0 turns it off.",
    )
    env_flag(
        group,
        "--model_name",
        env=f"{p}_MODEL_NAME",
        default="default",
        help="Name of the model when serving one with --model_base_path.",
    )
    env_flag(
        group,
        "--model_base_path",
        env=f"{p}_MODEL_BASE_PATH",
        default="",
        help="Folder holding the numeric version directories of the model.",
    )
    env_flag(
        group,
        "--model_config_file",
        env=f"{p}_MODEL_CONFIG_FILE",
        default="",
        help="TF Serving model config (text-format model_config_list); overrides --model_name/--model_base_path.",
    )
    env_flag(
        group,
        "--model_config_file_poll_wait_seconds",
        env=f"{p}_MODEL_CONFIG_FILE_POLL_WAIT_SECONDS",
        default=ModelServerSettings.model_config_file_poll_wait_seconds,
        type=float,
        help="Re-read --model_config_file this often; 0 reads it once.",
    )
    env_flag(
        group,
        "--file_system_poll_wait_seconds",
        env=f"{p}_FILE_SYSTEM_POLL_WAIT_SECONDS",
        default=ModelServerSettings.file_system_poll_wait_seconds,
        type=float,
        help="Look for new model versions this often; 0 looks once, negative never.",
    )
    _tf_bool_flag(group, "--enable_batching", default=False, help="Merge concurrent requests into batches.")
    env_flag(
        group,
        "--batching_parameters_file",
        env=f"{p}_BATCHING_PARAMETERS_FILE",
        default="",
        help="TF Serving BatchingParameters (text format); implies --enable_batching.",
    )
    env_flag(
        group,
        "--monitoring_config_file",
        env=f"{p}_MONITORING_CONFIG_FILE",
        default="",
        help="TF Serving MonitoringConfig, e.g. 'prometheus_config { enable: true }' (on the REST port).",
    )
    _tf_bool_flag(
        group,
        "--enable_model_warmup",
        default=ModelServerSettings.enable_model_warmup,
        help="Replay assets.extra/tf_serving_warmup_requests before a version serves.",
    )
    _tf_bool_flag(
        group,
        "--allow_version_labels_for_unavailable_models",
        default=ModelServerSettings.allow_version_labels_for_unavailable_models,
        help="Accept version labels pointing to versions that are not loaded yet.",
    )
    env_flag(
        group,
        "--tensorflow_intra_op_parallelism",
        env=f"{p}_TENSORFLOW_INTRA_OP_PARALLELISM",
        default=0,
        type=int,
        help="Threads inside one op; 0 lets TensorFlow choose.",
    )
    env_flag(
        group,
        "--tensorflow_inter_op_parallelism",
        env=f"{p}_TENSORFLOW_INTER_OP_PARALLELISM",
        default=0,
        type=int,
        help="Ops run in parallel; 0 lets TensorFlow choose.",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m embedder",
        description="TF-Serving-compatible local model server, and a client of TF Serving.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="Run the local model server (TF Serving's gRPC/REST API).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_serve_flags(serve)

    embed = commands.add_parser("embed", help="Embed image files through a model server; prints JSON lines.")
    embed.add_argument("images", nargs="+", help="Encoded image files (JPEG, PNG, ...).")
    _add_client_flags(embed)

    status = commands.add_parser("status", help="Print the model's versions and their states as JSON.")
    _add_client_flags(status)
    return parser


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    p = ENV_PREFIX
    env_flag(
        parser,
        "--target",
        env=f"{p}_TARGET",
        default=f"127.0.0.1:{SERVING_GRPC_PORT}",
        help="Model server address (host:port or dns:///name:port).",
    )
    env_flag(parser, "--model-name", env=f"{p}_MODEL_NAME", default="default", help="Served model name.")
    parser.add_argument("--version", type=int, default=None, help="Pin this model version.")
    parser.add_argument("--version-label", default=None, help="Use the version this label points to.")
    env_flag(
        parser, "--timeout", env=f"{p}_TIMEOUT", default=30.0, type=float, help="Deadline per call, seconds."
    )


def _serve(args: argparse.Namespace) -> int:
    from embedder.model_config import (
        BatchingParameters,
        MonitoringConfig,
        load_batching_parameters,
        load_model_server_config,
        load_monitoring_config,
        single_model_config,
    )

    options = ServerOptions.from_args("embedder", args)
    if args.model_config_file:
        entries = load_model_server_config(args.model_config_file)
    elif args.model_base_path:
        entries = single_model_config(args.model_name, args.model_base_path)
    else:
        raise InvalidInput("give --model_base_path (with --model_name) or --model_config_file")
    for entry in entries:
        if not Path(entry.base_path).is_dir():
            log.warning(
                "model base path does not exist yet; waiting for versions",
                extra={"model": entry.name, "base_path": entry.base_path},
            )
    batching = None
    if args.batching_parameters_file:
        batching = load_batching_parameters(args.batching_parameters_file)
    elif args.enable_batching:
        batching = BatchingParameters()
    monitoring = (
        load_monitoring_config(args.monitoring_config_file)
        if args.monitoring_config_file
        else MonitoringConfig()
    )

    import tensorflow as tf

    if args.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(args.tensorflow_intra_op_parallelism)
    if args.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(args.tensorflow_inter_op_parallelism)

    from embedder.rest import RestApi, start_rest_server
    from embedder.server import start_model_server

    settings = ModelServerSettings(
        entries=tuple(entries),
        batching=batching,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        model_config_file=args.model_config_file or None,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        enable_model_warmup=args.enable_model_warmup,
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
    )
    rest_flag = f"--rest_api_port / {ENV_PREFIX}_REST_API_PORT"
    if args.rest_api_port:
        ensure_can_listen(options.host, args.rest_api_port, rest_flag)
    running, manager = start_model_server(options, settings)
    if args.rest_api_port:
        try:
            rest, rest_port = start_rest_server(
                RestApi(manager, monitoring), options.host, args.rest_api_port, flag=rest_flag
            )
        except CbirError:
            running.stop(0)
            raise
        running.on_stop.append(rest.shutdown)
        log.info("REST API listening", extra={"rest_api_port": rest_port})
    log.info(
        "model server started",
        extra={"models": [e.name for e in entries], "batching": batching is not None, "port": running.port},
    )
    return serve_until_signalled(running)


def _client(args: argparse.Namespace) -> embedder.client.EmbedderClient:
    from embedder.client import EmbedderClient

    return EmbedderClient(args.target, args.model_name, timeout=args.timeout)


def _embed(args: argparse.Namespace) -> int:
    images = []
    for name in args.images:
        try:
            images.append(Path(name).read_bytes())
        except OSError as exc:
            raise InvalidInput(f"cannot read image {name!r}: {exc.strerror or exc}") from None
    with _client(args) as client:
        result = client.embed(images, version=args.version, version_label=args.version_label)
    for name, vector in zip(args.images, result.vectors, strict=True):
        print(
            json.dumps(
                {
                    "image": name,
                    "model_name": result.model_name,
                    "model_version": result.model_version,
                    "embedding": [round(float(x), 7) for x in vector],
                }
            )
        )
    return 0


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        versions = client.model_versions()
    print(
        json.dumps(
            {"model_name": args.model_name, "versions": {str(v): s for v, s in sorted(versions.items())}}
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"serve": _serve, "embed": _embed, "status": _status}
    return run_main(lambda: commands[args.command](args), also=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
