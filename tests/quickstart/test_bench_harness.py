"""The `make bench` harness: discovery, error isolation, time budget and the report format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import run as harness

GOOD = """
def run(quick, workdir):
    assert not (workdir / "touched").exists(), "the workdir is fresh on every run"
    (workdir / "touched").write_text("yes")
    return [{"name": "speed", "value": 200.0, "unit": "qps", "baseline_name": "brute force",
             "baseline": 100.0, "ratio": 2.0, "goal": "ratio >= 1.5", "higher_is_better": True},
            {"name": "latency", "value": 12.0, "unit": "ms", "baseline_name": "seed", "baseline": 10.0,
             "ratio": 1.2, "goal": "<= 1.1x", "higher_is_better": False},
            {"name": "recall", "value": 0.97, "unit": "", "baseline_name": "exact", "baseline": 1.0,
             "ratio": 0.97, "goal": "close to exact", "higher_is_better": True, "quick": quick}]
"""
CRASHES = "def run(quick, workdir):\n    raise RuntimeError('index exploded')\n"
HANGS = "import time\n\ndef run(quick, workdir):\n    time.sleep(60)\n"
MALFORMED = "def run(quick, workdir):\n    return [{'name': 'x', 'value': 'fast'}]\n"


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "benches"
    folder.mkdir()
    for name, text in {"good": GOOD, "crashes": CRASHES, "hangs": HANGS, "malformed": MALFORMED}.items():
        (folder / f"bench_{name}.py").write_text(text)
    (folder / "helper.py").write_text("raise SystemExit('not a benchmark')\n")
    return folder


def test_discover_finds_bench_files_only_and_filters(bench_dir):
    assert [p.stem for p in harness.discover(bench_dir)] == [
        "bench_crashes",
        "bench_good",
        "bench_hangs",
        "bench_malformed",
    ]
    assert [p.stem for p in harness.discover(bench_dir, ["good", "bench_hangs"])] == [
        "bench_good",
        "bench_hangs",
    ]


@pytest.mark.parametrize(
    ("goal", "value", "ratio", "expected"),
    [
        ("ratio >= 1.5", 1, 2.0, True),
        ("ratio >= 1.5", 1, 1.4, False),
        (">= 0.9", 0.95, 0, True),
        ("< 50", 60, 0, False),
        ("<= 1.1x", 0, 1.2, False),
        ("≥ 2×", 0, 3, True),
        ("as fast as possible", 1, 1, None),
    ],
)
def test_goal_met(goal, value, ratio, expected):
    assert harness.goal_met({"goal": goal, "value": value, "ratio": ratio, "unit": ""}) is expected


def test_a_bare_goal_compares_the_ratio_of_a_figure_with_a_unit():
    throughput = {"goal": ">= 0.9", "value": 272.0, "ratio": 0.81, "unit": "images/s"}
    assert harness.goal_met(throughput) is False
    assert harness.goal_met({**throughput, "goal": "value >= 0.9"}) is True


def test_passed_field_overrides_goal():
    assert harness.goal_met({"goal": "ratio >= 5", "ratio": 1, "value": 1, "passed": True}) is True


@pytest.mark.slow
def test_one_failing_benchmark_does_not_stop_the_others(bench_dir, tmp_path):
    out = tmp_path / "out"
    results, report = harness.run_all(
        harness.discover(bench_dir), quick=True, out_dir=out, budget=8, echo=lambda _: None
    )
    by_name = {r.name: r for r in results}
    assert by_name["good"].status == "ok"
    assert by_name["crashes"].status == "failed" and "index exploded" in by_name["crashes"].error
    assert by_name["hangs"].status == "timeout" and by_name["hangs"].seconds < 20
    assert by_name["malformed"].status == "failed" and "'value'" in by_name["malformed"].error
    assert (out / "work" / "good" / "touched").read_text() == "yes"

    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["quick"] is True and saved["machine"]["cores"] >= 1 and saved["machine"]["python"]
    good = next(b for b in saved["benchmarks"] if b["name"] == "good")
    assert [f["met"] for f in good["figures"]] == [True, False, None]
    assert good["figures"][2]["quick"] is True

    table = (out / "results.md").read_text()
    assert "| good | speed ↑ | 200 qps | 100 (brute force) | 2× | ratio >= 1.5 | ✓ |" in table
    assert "| good | latency ↓ | 12 ms | 10 (seed) | 1.2× | <= 1.1x | ✗ |" in table
    assert "| crashes | **failed**" in table and "| hangs | **timeout**" in table
    assert "cores" in table and "TensorFlow" in table and "Date:" in table


@pytest.mark.slow
def test_cli_exit_code_and_only(bench_dir, tmp_path):
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "--quick",
        "--dir",
        str(bench_dir),
        "--out",
        str(tmp_path / "o"),
    ]
    for _ in range(2):  # twice: the second run gets a fresh workdir too
        ok = subprocess.run([*command, "--only", "good"], capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1/1 benchmarks ran" in ok.stdout
    failing = subprocess.run([*command, "--only", "crashes"], capture_output=True, text=True, timeout=120)
    assert failing.returncode == 1 and "failed: crashes" in failing.stderr
    none = subprocess.run([*command, "--only", "nothing"], capture_output=True, text=True, timeout=120)
    assert none.returncode == 2 and "no benchmarks" in none.stderr
