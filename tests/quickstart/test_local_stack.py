"""`python -m quickstart up/status/down` with the real services (tiny model, generated catalogue)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from cbir.processes import free_port, health_of, pids_alive
from tests.quickstart.conftest import generated_catalogue, processes_mentioning
from tests.support.tiny_model import export_tiny_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def quickstart(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quickstart", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_up_is_idempotent_and_down_stops_everything(tmp_path):
    root = tmp_path / "stack"
    models = tmp_path / "models"
    export_tiny_model(models, name="demo", version=1)
    catalogue = generated_catalogue(tmp_path / "catalogue", classes=3, train=4, test=1) / "train"
    # Every port the stack binds, metrics and HTTP included, is a free one: the defaults may be taken.
    ports = {
        f"--{name}-port": free_port()
        for name in ("serving", "indexer", "indexer-metrics", "gateway", "gateway-metrics", "gateway-http")
    }
    flags = [
        "--root",
        str(root),
        "--models",
        str(models),
        "--catalogue",
        str(catalogue),
        *[str(x) for pair in ports.items() for x in pair],
    ]
    try:
        first = quickstart("up", *flags)
        assert first.returncode == 0, first.stdout + first.stderr
        assert first.stdout.count(" started: pid") == 3
        assert "active generation: demo-v1" in first.stdout and "(12 items" in first.stdout
        pids = sorted(json.loads(p.read_text())["pid"] for p in (root / "run").glob("*.json"))
        assert len(pids) == 3
        assert health_of(f"127.0.0.1:{ports['--gateway-port']}") == "SERVING"
        page = f"http://127.0.0.1:{ports['--gateway-http-port']}/"
        assert f"search page: {page}" in first.stdout
        _search_page_answers(page, catalogue)

        second = quickstart("up", *flags)
        assert second.returncode == 0, second.stdout + second.stderr
        assert second.stdout.count("already running") == 3 and " started: pid" not in second.stdout
        assert "indexing" not in second.stdout
        assert sorted(json.loads(p.read_text())["pid"] for p in (root / "run").glob("*.json")) == pids
        assert (
            len(processes_mentioning(str(root))) == 2
        )  # serving and indexer name the root; the gateway its ports

        status = quickstart("status", "--root", str(root))
        assert status.returncode == 0 and status.stdout.count("SERVING") == 3, status.stdout

        down = quickstart("down", "--root", str(root))
        assert down.returncode == 0 and "stopped: gateway, indexer, serving" in down.stdout
        assert processes_mentioning(str(root)) == []
        assert pids_alive(pids) == []  # (an orphan may linger as a zombie where pid 1 does not reap)
        after = quickstart("status", "--root", str(root))
        assert after.returncode == 0 and "nothing running" in after.stdout
    finally:
        quickstart("down", "--root", str(root))


def _search_page_answers(page: str, catalogue: Path) -> None:
    """The page is up, an upload finds the catalogue image itself, and its thumbnail is served."""
    with urllib.request.urlopen(page, timeout=30) as answer:
        assert b"<title>CBIR search</title>" in answer.read()
    image = sorted(catalogue.rglob("*.png"))[0]
    request = urllib.request.Request(
        page + "v1/search:upload?k=3", data=image.read_bytes(), headers={"Content-Type": "image/png"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        top = json.loads(answer.read())["hits"][0]
    assert Path(top["uri"]).resolve() == image.resolve()
    with urllib.request.urlopen(page + f"v1/items/{urllib.parse.quote(top['id'], safe='')}/image") as answer:
        assert answer.read() == image.read_bytes()


def test_up_without_a_model_says_what_to_do(tmp_path):
    result = quickstart(
        "up",
        "--root",
        str(tmp_path / "stack"),
        "--models",
        str(tmp_path / "empty"),
        "--model-name",
        "no-such-model",
    )
    assert result.returncode == 1
    assert "no model to serve" in result.stderr and "make demo" in result.stderr


@pytest.mark.parametrize("option", ["--indexer-metrics-port", "--gateway-port"])
def test_up_with_a_taken_port_names_it_and_starts_nothing(tmp_path, option):
    root = tmp_path / "stack"
    (tmp_path / "models" / "demo" / "1").mkdir(parents=True)  # checked before any model is loaded
    ports = {
        f"--{name}-port": free_port()
        for name in ("serving", "indexer", "indexer-metrics", "gateway", "gateway-metrics")
    }
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[option]))
        holder.listen()
        result = quickstart(
            "up",
            "--root",
            str(root),
            "--models",
            str(tmp_path / "models"),
            *[str(x) for pair in ports.items() for x in pair],
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith(
        f"error: cannot listen on 127.0.0.1:{ports[option]}: address already in use "
        f"({option} of `python -m quickstart up`); "
    ), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not list((root / "run").glob("*.json")) and processes_mentioning(str(root)) == []
