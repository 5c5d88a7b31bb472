"""The public API compiles with grpcio-tools and with Node's @grpc/proto-loader, and is documented."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.node import node_available, run_node

PROTOS = Path(__file__).resolve().parents[1] / "protos"
FILES = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))


def test_protos_compile_with_grpcio_tools(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *FILES,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cbir" / "v1" / "search_pb2_grpc.py").exists()


@pytest.mark.skipif(not node_available(), reason="node/npm not installed")
def test_protos_load_in_node():
    result = run_node("load_protos.js", *FILES)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert set(loaded["services"]["SearchService"]) >= {"Search", "BatchSearch", "GetServingInfo"}
    assert set(loaded["services"]["IndexerService"]) >= {
        "Upsert",
        "Delete",
        "Get",
        "Knn",
        "Stats",
        "CreateGeneration",
        "ActivateGeneration",
        "ListGenerations",
        "DropGeneration",
    }


@pytest.mark.parametrize("name", FILES)
def test_every_message_field_and_rpc_is_documented(name):
    """Contract 7: each message, enum, field, value and rpc has a comment right above it."""
    lines = (PROTOS / name).read_text().splitlines()
    declaration = re.compile(
        r"^\s*(message|enum|service|rpc|(optional |repeated )?[\w.<>, ]+ \w+ = \d+;|[A-Z_0-9]+ = \d+;)"
    )
    undocumented = []
    for i, line in enumerate(lines):
        if declaration.match(line) and not line.strip().startswith("option"):
            previous = lines[i - 1].strip() if i else ""
            if not previous.startswith("//"):
                undocumented.append(f"{name}:{i + 1}: {line.strip()}")
    assert not undocumented, "undocumented declarations:\n" + "\n".join(undocumented)
