"""Hot swap: a new version exported while clients keep sending loads without a single failure,
answers switch to it, and pinned old versions keep working while the policy keeps them."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbir.processes import running_service
from embedder.client import EmbedderClient, ModelVersionUnavailable
from embedder.model_config import ModelEntry, VersionPolicy, format_model_server_config
from tests.support.tiny_model import export_tiny_model, reference_embedding
from trainer.synthetic import make_image

pytestmark = pytest.mark.slow

IMAGES = [make_image(i) for i in range(3)]


def wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached in {timeout}s")


def test_new_versions_swap_in_without_failures(tmp_path):
    repo = tmp_path / "models"
    export_tiny_model(repo, "tiny", version=1, seed=0)
    config = tmp_path / "models.config"
    config.write_text(
        format_model_server_config(
            [ModelEntry("tiny", str(repo / "tiny"), VersionPolicy("latest", num_versions=2))]
        )
    )
    with running_service(
        "embedder",
        "serve",
        "--model_config_file",
        str(config),
        "--file_system_poll_wait_seconds",
        "0.2",
        "--model_config_file_poll_wait_seconds",
        "0.3",
        "--enable_batching",
        "--log-format",
        "text",
        log_dir=tmp_path,
    ) as (proc, target):
        stop = threading.Event()
        failures: list[str] = []
        seen: dict[str, list[int]] = {}
        answers: dict[int, np.ndarray] = {}

        def send(name: str, version: int | None) -> None:
            # No retries: an UNAVAILABLE during the swap would count as a failure.
            with EmbedderClient(target, "tiny", max_retries=0, timeout=30) as client:
                while not stop.is_set():
                    try:
                        result = client.embed(IMAGES, version=version)
                    except Exception as exc:  # noqa: BLE001
                        failures.append(f"{name}: {type(exc).__name__}: {exc}")
                        continue
                    seen.setdefault(name, []).append(result.model_version)
                    answers[result.model_version] = result.vectors

        threads = [threading.Thread(target=send, args=(f"latest-{i}", None)) for i in range(3)]
        threads.append(threading.Thread(target=send, args=("pinned-1", 1)))
        for thread in threads:
            thread.start()
        try:
            wait_for(
                lambda: all(
                    len(seen.get(n, [])) >= 3 for n in ("latest-0", "latest-1", "latest-2", "pinned-1")
                ),
                what="first answers",
            )
            export_tiny_model(repo, "tiny", version=2, seed=1)
            wait_for(
                lambda: all(seen[n][-1] == 2 for n in ("latest-0", "latest-1", "latest-2")),
                what="answers from version 2",
            )
            count_after = {n: len(v) for n, v in seen.items()}
            wait_for(lambda: all(len(seen[n]) >= count_after[n] + 3 for n in seen), what="more answers")
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert failures == []
        for name in ("latest-0", "latest-1", "latest-2"):
            versions = seen[name]
            assert versions[0] == 1 and versions[-1] == 2
            # Once version 2 answers, version 1 never answers an unpinned call again.
            assert versions == sorted(versions), name
        assert set(seen["pinned-1"]) == {1}
        np.testing.assert_allclose(answers[1], reference_embedding(repo / "tiny" / "1", IMAGES), atol=1e-5)
        np.testing.assert_allclose(answers[2], reference_embedding(repo / "tiny" / "2", IMAGES), atol=1e-5)

        with EmbedderClient(target, "tiny") as client:
            assert client.model_versions() == {1: "AVAILABLE", 2: "AVAILABLE"}
            # Junk next to the versions is ignored: non-numeric, dot-prefixed staging, no saved_model.pb.
            (repo / "tiny" / "notes").mkdir()
            (repo / "tiny" / ".7-staging").mkdir()
            (repo / "tiny" / "8").mkdir()
            (repo / "tiny" / "8" / "variables").mkdir()
            # A version that cannot load is reported and does not take the server down.
            (repo / "tiny" / "4").mkdir()
            (repo / "tiny" / "4" / "saved_model.pb").write_bytes(b"this is not a SavedModel")
            wait_for(lambda: client.model_versions().get(4) == "END", what="version 4 failed")
            versions = client.model_versions()
            assert versions == {1: "AVAILABLE", 2: "AVAILABLE", 4: "END"}
            assert client.embed(IMAGES).model_version == 2
            # Version 3 pushes version 1 out of the latest-2 policy: pinned calls to 1 now fail.
            export_tiny_model(repo, "tiny", version=3, seed=2)
            wait_for(lambda: client.model_versions().get(1) == "END", what="version 1 unloaded")
            assert client.model_versions() == {1: "END", 2: "AVAILABLE", 3: "AVAILABLE", 4: "END"}
            with pytest.raises(ModelVersionUnavailable, match=r"version 1 .*available versions: \[2, 3\]"):
                client.embed(IMAGES, version=1)
            assert client.embed(IMAGES).model_version == 3
            assert client.embed(IMAGES, version=2).model_version == 2
            # The config file is polled: a label added to it becomes usable without a restart.
            config.write_text(
                format_model_server_config(
                    [
                        ModelEntry(
                            "tiny", str(repo / "tiny"), VersionPolicy("latest", num_versions=2), {"stable": 2}
                        )
                    ]
                )
            )

            def stable_version():
                try:
                    return client.embed(IMAGES, version_label="stable").model_version
                except ModelVersionUnavailable:
                    return None

            wait_for(lambda: stable_version() == 2, what="label from the re-read config file")

        import grpc

        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert proc.alive()
        log = proc.log_text()
        assert "model version failed to load" in log


def test_health_waits_for_the_first_version(tmp_path):
    from cbir.processes import ServiceProcess, free_port, wait_for_health

    repo = tmp_path / "models"
    (repo / "tiny").mkdir(parents=True)
    port = free_port()
    proc = ServiceProcess(
        [
            "-m",
            "embedder",
            "serve",
            "--model_name",
            "tiny",
            "--model_base_path",
            str(repo / "tiny"),
            "--port",
            str(port),
            "--file_system_poll_wait_seconds",
            "0.2",
        ],
        tmp_path / "server.log",
    )
    try:
        import grpc

        target = f"127.0.0.1:{port}"
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def status():
                try:
                    return stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                except grpc.RpcError:
                    return None

            wait_for(lambda: status() is not None, what="server up")
            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
            with EmbedderClient(target, "tiny", max_retries=0) as client:
                with pytest.raises(ModelVersionUnavailable):
                    client.embed(IMAGES)
            export_tiny_model(repo, "tiny", version=5)
            wait_for_health(target, timeout=60, proc=proc)
            with EmbedderClient(target, "tiny") as client:
                assert client.embed(IMAGES).model_version == 5
    finally:
        assert proc.stop() == 0
