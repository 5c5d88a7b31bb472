"""Other callers of the real gateway: Node.js (@grpc/grpc-js + @grpc/proto-loader) and `python -m gateway search`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cbir.processes import REPO
from tests.gateway import stack as s
from tests.support.node import node_available, run_node

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not node_available(), reason="node/npm not installed: the Node.js client test needs them")
def test_node_client_searches_the_real_gateway(e2e):
    item = e2e.catalogue.items["item-011"]
    done = run_node(
        "search_client.js",
        e2e.gateway.target,
        "--image",
        item.uri,
        "--k",
        "4",
        "--api-key",
        s.SEARCH_KEY,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    response = json.loads(done.stdout)
    hits = response["hits"]
    assert len(hits) == 4 and hits[0]["id"] == "item-011" and abs(hits[0]["score"] - 1.0) < 1e-4
    assert hits[0]["label"] == item.label and hits[0]["attributes"]["colour"] == item.attributes["colour"]
    assert response["generation"]["space"]["model_name"] == "tiny" and response["request_id"]
    # Errors come back as gRPC statuses in Node too.
    done = run_node("search_client.js", e2e.gateway.target, "--item-id", "nope", "--api-key", s.SEARCH_KEY)
    assert done.returncode == 1 and done.stderr.startswith("NOT_FOUND")
    done = run_node("search_client.js", e2e.gateway.target, "--item-id", "item-001")
    assert done.returncode == 1 and done.stderr.startswith("UNAUTHENTICATED")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CBIR_GATEWAY_API_KEY": s.SEARCH_KEY}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "search", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_line_search(e2e):
    item = e2e.catalogue.items["item-030"]
    done = _cli("--target", e2e.gateway.target, "--image", item.uri, "--k", "3", "--label", item.label)
    assert done.returncode == 0, done.stderr
    hits = json.loads(done.stdout)["hits"]
    assert hits[0]["id"] == "item-030" and all(h["label"] == item.label for h in hits)
    done = _cli("--target", e2e.gateway.target, "--item-id", "item-030", "--attr", "colour=red", "--k", "50")
    hits = json.loads(done.stdout)["hits"]
    assert "item-030" not in [h["id"] for h in hits] and all(h["attributes"]["colour"] == "red" for h in hits)
    done = _cli("--target", e2e.gateway.target, "--image", str(e2e.workdir / "missing.png"))
    assert done.returncode == 2 and "cannot read --image" in done.stderr and "Traceback" not in done.stderr
    done = _cli("--target", e2e.gateway.target, "--item-id", "item-030", "--k", "-3")
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr


def test_readme_python_example_runs(e2e):
    readme = (REPO / "gateway" / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    item = e2e.catalogue.items["item-005"]
    code = (
        code.replace("localhost:50051", e2e.gateway.target)
        .replace("MY-KEY", s.SEARCH_KEY)
        .replace('"query.jpg"', repr(item.uri))
        .replace('"dress"', repr(item.label))
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("item-005 1.0 class1")
    assert "model version" in done.stdout
