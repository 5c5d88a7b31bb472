"""`make demo --quick` end to end with real processes: the report's figures, and nothing left running.

Run on Fashion-MNIST (a small CNN from scratch) when its Debian package is installed, and on a user's
catalogue (``--data``: the default recipe, a pretrained EfficientNet-Lite0 fine-tuned on cached
activations, at a test's scale).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.quickstart.conftest import generated_catalogue, processes_mentioning

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def run_demo(root: Path, data_args: list[str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "quickstart", "demo", "--quick", "--root", str(root), *data_args, *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def assert_nothing_left(root: Path, pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and processes_mentioning(str(root)):
        time.sleep(0.2)
    assert processes_mentioning(str(root)) == []
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
        )
    assert list((root / "stack" / "run").glob("*.json")) == []


@pytest.fixture(params=["default data", "user catalogue"])
def data_args(request, tmp_path, demo_data_args):
    if request.param == "default data":
        return demo_data_args
    return ["--data", str(generated_catalogue(tmp_path / "catalogue"))]


def test_quick_demo_end_to_end(tmp_path, data_args):
    root = tmp_path / "demo"
    proc = run_demo(root, data_args)
    try:
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-6000:]
    assert "[13/13]" in output and f"report: {root / 'report' / 'index.html'}" in output

    report = json.loads((root / "report" / "report.json").read_text())
    user_catalogue = "--data" in data_args
    models = {m["version"]: m for m in report["models"]}
    assert (
        models[1]["backbone"]
        == models[2]["backbone"]
        == ("efficientnet_lite0" if user_catalogue else "small_cnn")
    )
    assert models[1]["steps"] == 0 and models[2]["steps"] == 20
    # Version 1 is the backbone alone (its pooled features), version 2 has the trained head.
    assert models[1]["embedding_dim"] == (1280 if user_catalogue else 64) and models[2]["embedding_dim"] == 32
    # Quality through the system agrees with the offline evaluation of the same embeddings, for both.
    chance = 1 / len(report["data"]["classes"])
    for evaluation in (report["evaluation_v1"], report["evaluation"]):
        assert evaluation["agree"] and evaluation["scores_agree"]
        assert {r["metric"] for r in evaluation["rows"]} >= {"recall@1", "recall@5", "map@10", "map@r"}
        for row in evaluation["rows"]:
            assert 0.0 <= row["system"] <= 1.0 and abs(row["system"] - row["offline"]) <= row["tolerance"]
        assert evaluation["system"]["recall@1"] > 2 * chance, "a trained or pretrained model beats chance"
        assert evaluation["queries"] == report["data"]["test_count"]
        assert evaluation["gallery"] == report["data"]["train_count"]
        figures = evaluation["figures"]
        assert set(figures["per_class_recall@1"]) == set(report["data"]["classes"])
        spread = figures["spread"]
        assert spread["top_hits"]["same"]["count"] + spread["top_hits"]["different"]["count"] > 0
        assert -1.0 <= spread["random_pairs"]["different"]["mean"] <= 1.0
        assert (figures["collapse_warning"] is not None) == spread["collapsed"]
    # Did training help? Both versions side by side, through the system.
    comparison = report["comparison"]
    assert [r["metric"] for r in comparison["metrics"]] == ["recall@1", "recall@5", "recall@10", "map@10"]
    for row in comparison["metrics"]:
        assert row["v1"] == report["evaluation_v1"]["figures"][row["metric"]]
        assert row["v2"] == report["evaluation"]["figures"][row["metric"]]

    # The hot-swap: searches never failed and each was answered by its generation's model version.
    swap = report["hot_swap"]
    assert swap["searches"] > 10 and swap["failed"] == 0 and swap["inconsistent"] == 0
    assert swap["answered_by_old"] > 0 and swap["answered_by_new"] > 0
    assert [m["version"] for m in report["models"]] == [1, 2]

    html = (root / "report" / "index.html").read_text()
    assert set(report["figures"]) == {"grid_v1", "grid_v2", "recall", "spread", "swap"}
    for name in report["figures"].values():
        assert f"src='{name}'" in html
        with Image.open(root / "report" / name) as image:
            assert image.format == "PNG" and image.width > 200
    assert html.count("They agree.") == 2 and "Hot-swap" in html
    assert "Did training help?" in html and "Recall@1 per class" in html and "Score spread" in html

    assert_nothing_left(root, [s["pid"] for s in report["services"]])


def test_ctrl_c_stops_everything_the_demo_started(tmp_path, demo_data_args):
    root = tmp_path / "demo"
    proc = run_demo(root, demo_data_args, "--steps", "6")
    try:
        # Wait until a service runs, then press Ctrl-C (SIGINT to the demo only) while the next starts.
        deadline = time.monotonic() + 600
        record = root / "stack" / "run" / "serving.json"
        while not record.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert record.exists(), (
            proc.stdout.read() if proc.poll() is not None else "no service started in time"
        )
        pids = [json.loads(p.read_text())["pid"] for p in (root / "stack" / "run").glob("*.json")]
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output[-4000:]
    assert "interrupted" in output and ("stopped:" in output or "no service left running" in output)
    assert_nothing_left(root, pids)
