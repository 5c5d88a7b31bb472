"""The local CBIR stack: the model server, the indexer and the gateway, as stack service specs.

One function says how the three services are started on localhost, for both `make up` and the demo,
so they cannot drift apart. The model server gets a TF Serving model config that keeps the two latest
versions loaded: during a hot-swap the active generation's version must stay served until the new
generation is active (docs/architecture.md, Embedding space).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from cbir import defaults
from cbir.errors import FailedPrecondition, NotReady
from cbir.processes import free_port
from cbir.v1 import indexer_pb2, indexer_pb2_grpc, search_pb2, search_pb2_grpc
from quickstart.stack import ServiceSpec, Stack

SERVING, INDEXER, GATEWAY, ROLLOUT = "serving", "indexer", "gateway", "rollout"
ORDER = (SERVING, INDEXER, GATEWAY, ROLLOUT)


@dataclass(frozen=True)
class StackPorts:
    """The ports of the stack; each field is set by the ``quickstart up`` option of :meth:`option`."""

    serving: int
    indexer: int
    gateway: int
    # -1 disables a metrics endpoint (or the gateway's HTTP port); 0 picks a free port.
    indexer_metrics: int = -1
    gateway_metrics: int = -1
    gateway_http: int = -1
    # The rollout controller's health port (`up --follow` only).
    rollout: int = defaults.ROLLOUT_PORT

    @staticmethod
    def option(name: str) -> str:
        """The ``quickstart up`` option setting port ``name``: indexer_metrics -> --indexer-metrics-port."""
        return f"--{name.replace('_', '-')}-port"

    def listens(self, *names: str) -> tuple[tuple[int, str], ...]:
        """``(port, "--x-port of quickstart up")`` for the named ports, as ServiceSpec.listens wants."""
        return tuple((getattr(self, n), f"{self.option(n)} of `python -m quickstart up`") for n in names)

    @classmethod
    def defaults(cls) -> StackPorts:
        return cls(
            defaults.SERVING_GRPC_PORT,
            defaults.INDEXER_PORT,
            defaults.GATEWAY_PORT,
            defaults.INDEXER_METRICS_PORT,
            defaults.GATEWAY_METRICS_PORT,
            defaults.GATEWAY_HTTP_PORT,
        )

    @classmethod
    def free(cls) -> StackPorts:
        return cls(free_port(), free_port(), free_port(), -1, -1, free_port(), free_port())


def write_model_config(path: Path, model_repo: Path, model_name: str, num_versions: int = 2) -> Path:
    """A TF Serving ``--model_config_file`` serving the ``num_versions`` latest versions of one model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "model_config_list {\n"
        "  config {\n"
        f'    name: "{model_name}"\n'
        f'    base_path: "{(model_repo / model_name).resolve()}"\n'
        '    model_platform: "tensorflow"\n'
        f"    model_version_policy {{ latest {{ num_versions: {num_versions} }} }}\n"
        "  }\n"
        "}\n"
    )
    return path


def stack_specs(
    root: Path,
    model_repo: Path,
    model_name: str,
    ports: StackPorts,
    *,
    poll_seconds: float = 1.0,
    catalogue_root: Path | None = None,
) -> list[ServiceSpec]:
    """The three services in start order; their state lives under ``root``. The gateway's search page
    shows catalogue images from ``catalogue_root`` (when given)."""
    config = write_model_config(root / "serving" / "models.config", model_repo, model_name)
    serving = ServiceSpec(
        SERVING,
        "embedder",
        (
            "serve",
            f"--port={ports.serving}",
            "--rest_api_port=0",
            f"--model_config_file={config}",
            f"--file_system_poll_wait_seconds={poll_seconds:g}",
            "--host=127.0.0.1",
            "--log-format=text",
        ),
        ports.serving,
        listens=ports.listens("serving"),
    )
    indexer = ServiceSpec(
        INDEXER,
        "indexer",
        (
            "serve",
            "--data-dir",
            str(root / "indexer"),
            "--port",
            str(ports.indexer),
            "--metrics-port",
            str(ports.indexer_metrics),
            "--host",
            "127.0.0.1",
            "--log-format",
            "text",
        ),
        ports.indexer,
        listens=ports.listens("indexer", "indexer_metrics"),
    )
    gateway = ServiceSpec(
        GATEWAY,
        "gateway",
        (
            "serve",
            "--serving",
            serving.target,
            "--indexer",
            indexer.target,
            "--model-name",
            model_name,
            "--port",
            str(ports.gateway),
            "--metrics-port",
            str(ports.gateway_metrics),
            "--host",
            "127.0.0.1",
            "--log-format",
            "text",
            "--generation-ttl",
            "0.2",
            "--http-port",
            str(ports.gateway_http),
            *(("--catalogue-root", str(catalogue_root.resolve())) if catalogue_root is not None else ()),
        ),
        ports.gateway,
        listens=ports.listens("gateway", "gateway_metrics", "gateway_http"),
    )
    return [serving, indexer, gateway]


def rollout_spec(
    serving: ServiceSpec,
    indexer: ServiceSpec,
    model_name: str,
    catalogue: Path,
    eval_set: Path,
    ports: StackPorts,
    *,
    poll_seconds: float = 1.0,
) -> ServiceSpec:
    """The rollout controller (`python -m indexer follow`) of the local stack (indexer/README.md, Rollouts)."""
    return ServiceSpec(
        ROLLOUT,
        "indexer",
        (
            "follow",
            "--indexer",
            indexer.target,
            "--serving",
            serving.target,
            "--model",
            model_name,
            "--catalogue",
            str(catalogue),
            "--eval",
            str(eval_set),
            "--poll-seconds",
            f"{poll_seconds:g}",
            "--port",
            str(ports.rollout),
            "--metrics-port",
            "-1",
            "--host",
            "127.0.0.1",
            "--log-format",
            "text",
        ),
        ports.rollout,
        listens=ports.listens("rollout"),
    )


def start_service(
    stack: Stack, spec: ServiceSpec, *, timeout: float = 180.0, require_serving: bool = True, log=print
) -> bool:
    """Starts (or finds running) one service; returns whether it was started now."""
    log(f"{spec.name:8s} starting on {spec.target} ...")
    record, was_started = stack.start(spec, timeout=timeout, require_serving=require_serving)
    verb = "started" if was_started else "already running"
    health = "SERVING" if require_serving else "up"
    log(f"{spec.name:8s} {verb}: pid {record.pid}, {spec.target}, {health} (log {record.log})")
    return was_started


def active_generation(indexer_target: str, timeout: float = 5.0) -> indexer_pb2.Generation | None:
    """The indexer's active generation, or None when there is none (or it does not answer)."""
    import grpc

    with grpc.insecure_channel(indexer_target) as channel:
        stub = indexer_pb2_grpc.IndexerServiceStub(channel)
        try:
            stats = stub.Stats(indexer_pb2.StatsRequest(), timeout=timeout)
        except grpc.RpcError:
            return None
        if not stats.active_generation:
            return None
        for generation in stats.generations:
            if generation.name == stats.active_generation:
                return generation
    return None


def serving_info(gateway_target: str, timeout: float = 5.0) -> search_pb2.ServingInfo:
    import grpc

    with grpc.insecure_channel(gateway_target) as channel:
        try:
            return search_pb2_grpc.SearchServiceStub(channel).GetServingInfo(
                search_pb2.GetServingInfoRequest(), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise NotReady(f"gateway {gateway_target}: {exc.code().name}: {exc.details()}") from exc


def import_tensorflow_quietly() -> None:
    """Imports the embedder client (and so TensorFlow) with stderr muted at the file-descriptor level.

    TensorFlow's C++ start-up lines (CUDA probing, absl's "WARNING: All log messages before ...") ignore
    TF_CPP_MIN_LOG_LEVEL and would land in the middle of the progress display.
    """
    import sys

    if "embedder.client" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        import embedder.client  # noqa: F401

        tf.constant(0)  # the first op initialises the runtime, which logs too
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def wait_for_model_version(
    serving_target: str, model_name: str, version: int, timeout: float = 120.0
) -> None:
    """Waits until Serving reports ``version`` of ``model_name`` AVAILABLE (it polls the repository)."""
    import_tensorflow_quietly()
    from embedder.client import EmbedderClient

    deadline = time.monotonic() + timeout
    states: dict = {}
    with EmbedderClient(serving_target, model_name, timeout=5.0) as client:
        while time.monotonic() < deadline:
            try:
                states = client.model_versions()
            except Exception as exc:  # noqa: BLE001 - not loaded yet looks like NOT_FOUND or UNAVAILABLE
                states = {"error": str(exc)}
            if states.get(version) == "AVAILABLE":
                return
            time.sleep(0.3)
    raise FailedPrecondition(
        f"Serving at {serving_target} did not load {model_name} version {version} "
        f"within {timeout:.0f}s (model versions: {states})"
    )
