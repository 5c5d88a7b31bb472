"""Command line of the quickstart: `demo`, and `up`/`down`/`status` of the local stack."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cbir.cli import run_main
from quickstart.options import FASHION_STEPS, DemoOptions
from quickstart.services import StackPorts

REPO = Path(__file__).resolve().parents[1]
STACK_ROOT = REPO / "var" / "stack"
DEMO_ROOT = REPO / "var" / "demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m quickstart",
        description="Run the whole CBIR system on this machine: a demo end to end, or the stack in the background.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="Train, export, serve, index, search, evaluate, hot-swap; write a report.",
        description="Everything on localhost in about 10 minutes on 2 CPU cores; stops everything it "
        "started, also on Ctrl-C or failure. The report goes to <root>/report/index.html.",
    )
    demo.add_argument(
        "--data",
        type=Path,
        default=None,
        help="A folder-per-class catalogue (<class>/<image> or <split>/<class>/<image>), trained with the "
        "default recipe for real photos (fine-tuned EfficientNet-Lite0). Default: Fashion-MNIST (Debian "
        "package dataset-fashion-mnist, the Keras cache, or a download) and a small CNN.",
    )
    demo.add_argument("--root", type=Path, default=DEMO_ROOT, help="Where the demo writes everything.")
    demo.add_argument("--quick", action="store_true", help="Tiny data and few training steps (for tests).")
    demo.add_argument("--train-per-class", type=int, default=None, help="Catalogue images per class.")
    demo.add_argument("--test-per-class", type=int, default=None, help="Query images per class.")
    demo.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"Training steps of version 2 (default: {FASHION_STEPS} on Fashion-MNIST, the recipe's on --data).",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=DemoOptions.seed,
        help="Seed of the data subset, training and query draws.",
    )
    demo.add_argument(
        "--no-install",
        action="store_true",
        help="Do not apt-get install the Fashion-MNIST package nor download it.",
    )
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="Leave the services running at the end (stop them with `python -m quickstart "
        "down --root <root>/stack`). Default: stop everything.",
    )

    up = sub.add_parser(
        "up", help="Start the model server, indexer and gateway in the background (idempotent)."
    )
    up.add_argument(
        "--root", type=Path, default=STACK_ROOT, help="Folder of logs, pid files and service data."
    )
    up.add_argument(
        "--models",
        type=Path,
        default=None,
        help="Model repository (<repo>/<name>/<version>/). Default: <root>/models, seeded with "
        "the demo's latest model when empty.",
    )
    up.add_argument("--model-name", default="demo", help="Model to serve.")
    up.add_argument(
        "--catalogue",
        type=Path,
        default=None,
        help="Catalogue to index when the indexer has no active generation "
        "(default: the demo's catalogue, if `make demo` ran).",
    )
    up.add_argument(
        "--follow",
        action="store_true",
        help="Also run the rollout controller (`python -m indexer follow`): a new version exported into "
        "the model repository is reindexed, evaluated on --eval and activated only if it passes the gate.",
    )
    up.add_argument(
        "--eval",
        type=Path,
        default=None,
        help="Labelled evaluation set of the controller (default: the demo's test split, if `make demo` ran).",
    )
    defaults_ports = StackPorts.defaults()
    for name, what in (
        ("serving", "the model server's gRPC"),
        ("indexer", "the indexer's gRPC"),
        ("indexer_metrics", "the indexer's /metrics (-1: off)"),
        ("gateway", "the gateway's gRPC"),
        ("gateway_metrics", "the gateway's /metrics (-1: off)"),
        ("gateway_http", "the gateway's HTTP/JSON API and search page (-1: off)"),
        ("rollout", "the rollout controller's health gRPC (with --follow)"),
    ):
        up.add_argument(
            StackPorts.option(name),
            dest=f"{name}_port",
            type=int,
            default=getattr(defaults_ports, name),
            help=f"Port of {what} on 127.0.0.1 (default: %(default)s).",
        )
    up.add_argument("--timeout", type=float, default=180.0, help="Seconds to wait for each service's health.")

    down = sub.add_parser("down", help="Stop the services started by `up`.")
    down.add_argument("--root", type=Path, default=STACK_ROOT)
    down.add_argument("--grace", type=float, default=15.0, help="Seconds between SIGTERM and SIGKILL.")

    status = sub.add_parser("status", help="Each service's pid, port, health; the active generation.")
    status.add_argument("--root", type=Path, default=STACK_ROOT)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ start-up chatter (CUDA probing, CPU features) would bury the progress display;
    # children inherit this too.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    # Exit 1 on an error (not cbir.cli's usual 2), as the quickstart always has.
    return run_main(lambda: _run(args), error_exit=1)


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from quickstart.demo import run_demo

        return run_demo(DemoOptions.from_args(args))
    from quickstart import local

    return {"up": local.up, "down": local.down, "status": local.status}[args.command](args)
