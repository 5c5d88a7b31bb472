"""Session-wide real stack for the gateway's end-to-end tests (started once, only if such a test runs)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from cbir.processes import ServiceProcess
from tests.gateway import stack as s


@dataclass
class Stack:
    workdir: Path
    model_repo: Path
    catalogue: s.Catalogue
    serving: str
    serving_proc: ServiceProcess
    indexer: str
    indexer_proc: ServiceProcess
    gateway: s.Gateway


@pytest.fixture(scope="session")
def e2e():
    """Model server (tiny model v1) + one indexer shard with generation tiny-v1 + gateway (API keys on)."""
    from tests.support.tiny_model import export_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="cbir-gateway-e2e-"))
    logs = workdir / "logs"
    logs.mkdir()
    repo = workdir / "models"
    export_tiny_model(repo, s.MODEL, version=1, dim=s.DIM, seed=0)
    config = workdir / "models.config"
    config.write_text(s.model_config(repo))
    catalogue = s.Catalogue.make(workdir / "catalogue")
    procs: list[ServiceProcess] = []
    try:
        serving_proc, serving = s.start(
            "embedder",
            [
                "--model_config_file",
                str(config),
                "--file_system_poll_wait_seconds",
                "0.5",
                "--host",
                "127.0.0.1",
                "--max-workers",
                "32",
            ],
            logs,
            "embedder",
        )
        procs.append(serving_proc)
        indexer_proc, indexer = s.start(
            "indexer",
            ["--data-dir", str(workdir / "index0"), "--host", "127.0.0.1", "--metrics-port", "-1"],
            logs,
            "indexer",
        )
        procs.append(indexer_proc)
        s.build_generation(serving, [indexer], catalogue, 1, "tiny-v1")
        gateway = s.start_gateway(
            logs,
            "gateway",
            serving,
            [indexer],
            "--max-image-bytes",
            "2000000",
            "--max-image-pixels",
            "4000000",
            "--max-message-bytes",
            str(8 * 1024 * 1024),
            "--generation-ttl",
            "0.5",
            "--catalogue-root",
            str(catalogue.folder),
            env={"CBIR_GATEWAY_API_KEYS": f"{s.SEARCH_KEY},{s.INFO_KEY}:info"},
        )
        procs.append(gateway.proc)
        yield Stack(workdir, repo, catalogue, serving, serving_proc, indexer, indexer_proc, gateway)
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.fixture(scope="session")
def unavailable_gateway(e2e):
    """A gateway whose indexer does not exist: NOT_SERVING, every search UNAVAILABLE (HTTP on a free port)."""
    from cbir.processes import free_port, wait_for_port_file

    logs = e2e.workdir / "logs"
    http_port_file = logs / "unavailable.http-port"
    proc, target = s.start(
        "gateway",
        [
            "--serving",
            e2e.serving,
            "--indexer",
            f"127.0.0.1:{free_port()}",
            "--host",
            "127.0.0.1",
            "--metrics-port",
            "-1",
            "--http-port",
            "0",
            "--http-port-file",
            str(http_port_file),
            "--probe-period",
            "0.3",
            "--probe-timeout",
            "1",
            "--dependency-timeout",
            "2",
        ],
        logs,
        "unavailable",
        health=False,
    )
    try:
        yield s.Gateway(proc, target, -1, None, wait_for_port_file(http_port_file, proc, 30))
    finally:
        proc.stop()
