"""`make up` / `make down` / `make status`: the local stack kept running in the background."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from cbir.errors import FailedPrecondition
from quickstart import services
from quickstart.stack import Stack

REPO = Path(__file__).resolve().parents[1]
DEMO_MODELS = REPO / "var" / "demo" / "models"
DEMO_CATALOGUE = REPO / "var" / "demo" / "data" / "train"
DEMO_EVAL = REPO / "var" / "demo" / "data" / "test"


def _versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def ensure_model(models: Path, model_name: str, *, seed_from: Path = DEMO_MODELS) -> int:
    """The latest version in ``models/<name>``; when there is none, copies the demo's latest model."""
    versions = _versions(models / model_name)
    if versions:
        return versions[-1]
    demo_versions = _versions(seed_from / model_name)
    if not demo_versions:
        raise FailedPrecondition(
            f"no model to serve: {models / model_name} has no version directory. Run `make demo` first "
            f"(it trains and exports one), or pass MODELS=<repo> holding {model_name}/<version>/."
        )
    version = demo_versions[-1]
    target = models / model_name / str(version)
    staging = target.with_name(f".{version}.copy")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(seed_from / model_name / str(version), staging)
    staging.rename(target)  # published atomically (docs/architecture.md, Repository)
    print(f"copied the demo's model {model_name} version {version} into {models}")
    return version


def up(args) -> int:
    root: Path = args.root
    catalogue = args.catalogue or (DEMO_CATALOGUE if DEMO_CATALOGUE.is_dir() else None)
    eval_set = args.eval or (DEMO_EVAL if DEMO_EVAL.is_dir() else None)
    if args.follow and (catalogue is None or eval_set is None or not eval_set.exists()):
        raise FailedPrecondition(
            "--follow needs a catalogue to reindex and a labelled evaluation set"
            + (f" ({eval_set} does not exist)" if eval_set is not None else "")
            + ": pass --catalogue and --eval (make up FOLLOW=1 DATA=... EVAL=...), or run `make demo` first "
            "(its train and test splits)"
        )
    models = (args.models or root / "models").resolve()
    version = ensure_model(models, args.model_name)
    ports = services.StackPorts(
        args.serving_port,
        args.indexer_port,
        args.gateway_port,
        args.indexer_metrics_port,
        args.gateway_metrics_port,
        args.gateway_http_port,
        args.rollout_port,
    )
    stack = Stack(root)
    print(f"local stack in {root} (model {args.model_name} from {models}, latest version {version})")
    serving, indexer, gateway = services.stack_specs(
        root, models, args.model_name, ports, catalogue_root=catalogue
    )
    rollout = (
        services.rollout_spec(
            serving, indexer, args.model_name, catalogue.resolve(), eval_set.resolve(), ports
        )
        if args.follow
        else None
    )
    for spec in (serving, indexer, gateway, *([rollout] if rollout else [])):
        # Before anything starts: a taken port must not leave half a stack running.
        stack.check_ports(spec)
    for spec in (serving, indexer):
        services.start_service(stack, spec, timeout=args.timeout)
    indexer_target = indexer.target
    generation = services.active_generation(indexer_target)
    if generation is None and catalogue is not None:
        print(f"no active generation: indexing {catalogue} with {args.model_name} version {version} ...")
        services.wait_for_model_version(f"127.0.0.1:{ports.serving}", args.model_name, version)
        command = [
            sys.executable,
            "-m",
            "indexer",
            "reindex",
            str(catalogue),
            "--indexer",
            indexer_target,
            "--serving",
            f"127.0.0.1:{ports.serving}",
            "--model",
            args.model_name,
            "--model-version",
            str(version),
            "--metric",
            "cosine",
        ]
        result = subprocess.run(command, cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if result.returncode != 0:
            print(f"reindexing failed (exit {result.returncode}); the services keep running", file=sys.stderr)
            return 1
        generation = services.active_generation(indexer_target)
    # The gateway is NOT_SERVING until a generation is active: then "up" is all we can wait for.
    services.start_service(stack, gateway, timeout=args.timeout, require_serving=generation is not None)
    if rollout is not None:
        services.start_service(stack, rollout, timeout=args.timeout)
    _print_status(stack)
    if ports.gateway_http >= 0:
        print(f"\nsearch page: http://127.0.0.1:{ports.gateway_http}/   (HTTP/JSON API: /openapi.json)")
    print(f"search:  .venv/bin/python -m gateway search --target 127.0.0.1:{ports.gateway} --image <file>")
    if args.follow:
        print(
            f"rollout: export a new version into {models / args.model_name}; then "
            f".venv/bin/python -m indexer generations list --indexer {indexer_target}"
        )
    print("stop:    make down")
    return 0


def down(args) -> int:
    stack = Stack(args.root)
    stopped = stack.stop_all(grace=args.grace)
    print(f"stopped: {', '.join(stopped)}" if stopped else f"nothing running under {args.root}")
    return 0


def status(args) -> int:
    stack = Stack(args.root)
    if not stack.records():
        print(f"nothing running under {args.root} (start it with `make up`)")
        return 0
    return 0 if _print_status(stack) else 1


def _print_status(stack: Stack) -> bool:
    rows = stack.status()
    print(f"\n{'service':8s}  {'pid':>7s}  {'port':>5s}  {'health':11s}  log")
    for row in rows:
        pid = str(row.pid) if row.alive else "-"
        print(f"{row.name:8s}  {pid:>7s}  {row.port:>5d}  {row.health:11s}  {row.log}")
    healthy = all(r.health == "SERVING" for r in rows)
    indexer = next((r for r in rows if r.name == services.INDEXER and r.alive), None)
    if indexer is not None:
        generation = services.active_generation(f"127.0.0.1:{indexer.port}")
        if generation is None:
            print("active generation: none (index a catalogue: python -m indexer reindex ...)")
        else:
            print(
                f"active generation: {generation.name} ({generation.item_count} items, model "
                f"{generation.space.model_name} version {generation.space.model_version})"
            )
    return healthy
