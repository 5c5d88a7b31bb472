"""A real CBIR stack for the gateway's end-to-end tests: model server, indexer shard(s), gateway processes.

Everything runs as `python -m <pkg> serve` on free ports, with a tiny exported model
(tests/support/tiny_model.py) and a catalogue of generated images written to files.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cbir.processes import ServiceProcess, wait_for_health, wait_for_port_file
from cbir.sharding import shard_of
from cbir.v1 import indexer_pb2, search_pb2_grpc, types_pb2
from trainer.synthetic import make_image

MODEL = "tiny"
DIM = 8
N_ITEMS = 40
LABELS = 4
SEARCH_KEY = "e2e-search-key-0001"
INFO_KEY = "e2e-info-only-key-02"
COLOURS = ("red", "green", "blue")
AUTH = (("authorization", f"Bearer {SEARCH_KEY}"),)


def model_config(repo: Path) -> str:
    # Keep two versions loaded during a hot swap (docs/architecture.md, Embedding space).
    return (
        "model_config_list {\n  config {\n"
        f'    name: "{MODEL}"\n    base_path: "{repo / MODEL}"\n    model_platform: "tensorflow"\n'
        "    model_version_policy { latest { num_versions: 2 } }\n  }\n}\n"
    )


@dataclass
class Catalogue:
    folder: Path
    images: dict[str, bytes] = field(default_factory=dict)
    items: dict[str, types_pb2.Item] = field(default_factory=dict)

    @classmethod
    def make(cls, folder: Path, n: int = N_ITEMS) -> Catalogue:
        folder.mkdir(parents=True, exist_ok=True)
        catalogue = cls(folder)
        for i in range(n):
            item_id = f"item-{i:03d}"
            data = make_image(seed=i, size=32, label=i % LABELS)
            path = folder / f"{item_id}.png"
            path.write_bytes(data)
            catalogue.images[item_id] = data
            catalogue.items[item_id] = types_pb2.Item(
                id=item_id, uri=str(path), label=f"class{i % LABELS}", attributes={"colour": COLOURS[i % 3]}
            )
        return catalogue


def start(
    module: str,
    args: Sequence[str],
    log_dir: Path,
    name: str,
    *,
    port: int = 0,
    env: dict | None = None,
    timeout: float = 120.0,
    health: bool = True,
    credentials: grpc.ChannelCredentials | None = None,
) -> tuple[ServiceProcess, str]:
    """Starts `python -m module serve ARGS` on ``port`` (0: free) and waits for it to listen (and be SERVING)."""
    port_file = log_dir / f"{name}-{time.monotonic_ns()}.port"
    proc = ServiceProcess(
        ["-m", module, "serve", *args, "--port", str(port), "--port-file", str(port_file)],
        log_dir / f"{name}.log",
        env,
    )
    try:
        bound = wait_for_port_file(port_file, proc, timeout)
        target = f"127.0.0.1:{bound}"
        if health:
            options = (("grpc.ssl_target_name_override", "localhost"),) if credentials else ()
            wait_for_health(target, "", timeout, proc, credentials=credentials, options=options)
    except BaseException:
        proc.stop()
        raise
    return proc, target


def metrics_port_of(proc: ServiceProcess, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proc.log_text().splitlines():
            if '"server started"' in line:
                return int(json.loads(line)["metrics_port"])
        time.sleep(0.1)
    raise TimeoutError("no 'server started' log line with metrics_port")


def build_generation(
    serving: str,
    indexers: Sequence[str],
    catalogue: Catalogue,
    version: int,
    name: str,
    indexer_tls=None,
    before_activation: Callable[[], None] | None = None,
) -> indexer_pb2.Generation:
    """Embeds the catalogue with model ``version`` and activates it as generation ``name``
    (``before_activation`` runs once the generation is complete but still inactive)."""
    from embedder.client import EmbedderClient
    from indexer.client import IndexerClient

    ids = sorted(catalogue.items)
    with (
        EmbedderClient(serving, MODEL, timeout=60) as embedder,
        IndexerClient(list(indexers), timeout=60, tls=indexer_tls) as index,
    ):
        result = embedder.embed([catalogue.images[i] for i in ids], version=version)
        assert result.model_version == version
        index.create_generation(
            name,
            types_pb2.EmbeddingSpace(model_name=MODEL, model_version=version),
            types_pb2.METRIC_COSINE,
            DIM,
        )
        index.upsert(
            (
                indexer_pb2.Record(item=catalogue.items[i], vector=v.tolist())
                for i, v in zip(ids, result.vectors, strict=True)
            ),
            generation=name,
        )
        if before_activation is not None:
            before_activation()
        index.activate_generation(name)
        return index.active_generation()


def wait_for_model_version(serving: str, version: int, timeout: float = 90.0) -> None:
    from embedder.client import EmbedderClient

    deadline = time.monotonic() + timeout
    with EmbedderClient(serving, MODEL, timeout=5) as embedder:
        while time.monotonic() < deadline:
            try:
                if str(embedder.model_versions().get(version, "")).upper().endswith("AVAILABLE"):
                    return
            except Exception:  # noqa: BLE001 - not loaded yet
                pass
            time.sleep(0.2)
    raise TimeoutError(f"model version {version} never became AVAILABLE")


@dataclass
class Gateway:
    proc: ServiceProcess
    target: str
    metrics_port: int
    credentials: grpc.ChannelCredentials | None = None
    # The HTTP/JSON port (always on, on a free port).
    http_port: int = -1

    @property
    def http_url(self) -> str:
        scheme = "https" if self.credentials is not None else "http"
        return f"{scheme}://{'localhost' if self.credentials is not None else '127.0.0.1'}:{self.http_port}"

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(
            self.target, self.credentials, options=[("grpc.ssl_target_name_override", "localhost")]
        )

    def stub(self, channel: grpc.Channel) -> search_pb2_grpc.SearchServiceStub:
        return search_pb2_grpc.SearchServiceStub(channel)


def start_gateway(
    log_dir: Path,
    name: str,
    serving: str,
    indexers: Sequence[str],
    *extra: str,
    env: dict | None = None,
    credentials=None,
) -> Gateway:
    http_port_file = log_dir / f"{name}-{time.monotonic_ns()}.http-port"
    args = [
        "--serving",
        serving,
        "--indexer",
        ",".join(indexers),
        "--host",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--http-port",
        "0",
        "--http-port-file",
        str(http_port_file),
        "--probe-period",
        "0.3",
        "--probe-timeout",
        "1",
        *extra,
    ]
    proc, target = start("gateway", args, log_dir, name, env=env, credentials=credentials)
    http_port = wait_for_port_file(http_port_file, proc, 10)
    return Gateway(proc, target, metrics_port_of(proc), credentials, http_port)


def split_by_shard(ids: Sequence[str], shard_count: int) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for item_id in ids:
        out.setdefault(shard_of(item_id, shard_count), []).append(item_id)
    return out


REQUEST_ID = re.compile(r'"request_id": "([^"]+)"')
