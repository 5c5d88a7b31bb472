"""Every component runs as `python -m <name>` with --help, and each service binary reports SERVING on
grpc.health.v1 with its service listed by reflection (docs/architecture.md, Plumbing)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cbir.processes import REPO, running_service, wait_for_health
from cbir.v1 import indexer_pb2, types_pb2

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "module, commands",
    [
        ("gateway", ["serve"]),
        ("indexer", ["serve", "reindex"]),
        ("embedder", ["serve"]),
        ("trainer", ["train", "embed", "test", "evaluation", "cbir", "export"]),
    ],
)
def test_help(module, commands):
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in commands:
        assert command in result.stdout


def reflected_services(target: str) -> set[str]:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        return {s.name for answer in answers for s in answer.list_services_response.service}


def test_every_service_is_healthy_and_reflected():
    from tests.support.tiny_model import export_tiny_model

    work = Path(tempfile.mkdtemp(prefix="cbir-services-"))
    export_tiny_model(work / "models", "tiny", version=1, dim=8)
    with running_service(
        "embedder",
        "serve",
        "--model_name",
        "tiny",
        "--model_base_path",
        str(work / "models" / "tiny"),
        "--host",
        "127.0.0.1",
        log_dir=work,
    ) as (_, serving):
        assert {
            "tensorflow.serving.PredictionService",
            "tensorflow.serving.ModelService",
            "grpc.health.v1.Health",
        } <= reflected_services(serving)
        with running_service(
            "indexer",
            "serve",
            "--data-dir",
            str(work / "index"),
            "--host",
            "127.0.0.1",
            "--metrics-port",
            "-1",
            health_service="cbir.v1.IndexerService",
            log_dir=work,
        ) as (_, indexer):
            assert {"cbir.v1.IndexerService", "grpc.health.v1.Health"} <= reflected_services(indexer)
            _activate_one_item_generation(indexer)
            with running_service(
                "gateway",
                "serve",
                "--serving",
                serving,
                "--model-name",
                "tiny",
                "--indexer",
                indexer,
                "--host",
                "127.0.0.1",
                "--metrics-port",
                "-1",
                "--http-port",
                "-1",
                "--probe-period",
                "0.2",
                health_service="cbir.v1.SearchService",
                log_dir=work,
            ) as (_, gateway):
                assert {"cbir.v1.SearchService", "grpc.health.v1.Health"} <= reflected_services(gateway)
                wait_for_health(gateway, "", timeout=30)


def _activate_one_item_generation(indexer: str) -> None:
    from indexer.client import IndexerClient

    with IndexerClient([indexer]) as client:
        client.create_generation(
            "tiny-1", types_pb2.EmbeddingSpace(model_name="tiny", model_version=1), types_pb2.METRIC_COSINE, 8
        )
        vector = np.ones(8, dtype=np.float32) / np.sqrt(8)
        client.upsert(
            [indexer_pb2.Record(item=types_pb2.Item(id="only", label="x"), vector=vector.tolist())],
            generation="tiny-1",
        )
        client.activate_generation("tiny-1")
