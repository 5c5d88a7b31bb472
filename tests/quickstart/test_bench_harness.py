"""The `make bench` harness: discovery, error isolation, time budget and the report format."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import measure
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


# --------------------------------------------------------------------------- measurement helpers

ECHO_SERVER = """
import sys, grpc
from concurrent import futures
calls = 0
def echo(request, context):
    global calls
    calls += 1
    if request == b"fail":
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "asked to fail")
    return request
def count(request, context):
    return str(calls).encode()
ident = lambda b: b
server = grpc.server(futures.ThreadPoolExecutor(8), options=[("grpc.so_reuseport", 0)])
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Echo", {
    "Echo": grpc.unary_unary_rpc_method_handler(echo, ident, ident),
    "Count": grpc.unary_unary_rpc_method_handler(count, ident, ident)})])
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""

BUSY = """
import sys
def spin(n):
    total = 0
    for i in range(n):
        total += i
    return total
print("up", flush=True)
for line in sys.stdin:
    spin(int(line))
    print("done", flush=True)
"""


@pytest.fixture
def echo_server(tmp_path):
    script = tmp_path / "echo.py"
    script.write_text(ECHO_SERVER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield proc, f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def busy_child(tmp_path):
    script = tmp_path / "busy.py"
    script.write_text(BUSY)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "up"

    def spin(iterations: int) -> None:
        proc.stdin.write(f"{iterations}\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"

    try:
        yield proc, spin
    finally:
        proc.kill()
        proc.wait()


def test_cpu_meter_counts_the_work_of_the_process_and_not_its_waiting(busy_child):
    proc, spin = busy_child
    meter = measure.CpuMeter({"busy": proc.pid})
    meter.start()
    spin(3_000_000)
    worked = meter.stop()["busy"]
    meter.start()
    subprocess.run([sys.executable, "-c", "import time; time.sleep(0.3)"], check=True)
    waited = meter.stop()["busy"]
    # Millions of interpreted additions take tens of milliseconds of CPU on any machine; waiting on
    # stdin takes none (both well away from the 10 ms tick of /proc's counters).
    assert worked >= 0.03 and waited < 0.02
    assert measure.process_cpu(proc.pid) >= worked
    threads = measure.thread_cpu(proc.pid)
    assert sum(threads.values()) <= measure.process_cpu(proc.pid) + 0.02 and threads


def test_self_cpu_grows_with_work():
    before = measure.self_cpu()
    sum(i * i for i in range(2_000_000))
    assert measure.self_cpu() > before


@pytest.mark.slow
def test_run_load_counts_every_call_and_the_servers_cpu(echo_server, tmp_path):
    proc, target = echo_server
    requests = [b"a" * 10, b"b" * 100]
    run = measure.run_load(
        target,
        "/t.Echo/Echo",
        requests,
        clients=3,
        seconds=1.0,
        services={"echo": proc.pid},
        threads_per_process=2,
        workdir=tmp_path,
    )
    import grpc

    with grpc.insecure_channel(target) as channel:
        served = int(channel.unary_unary("/t.Echo/Count")(b"", timeout=10))
    # Two load processes (2 + 1 clients), each warming up with 3 calls per client before the window.
    assert run.clients == 3 and run.calls == served - 3 * 3
    assert len(run.latencies) == run.calls and (run.latencies > 0).all()
    assert run.service_cpu["echo"] > 0 and run.client_cpu > 0
    assert run.cpu_ms("echo") == pytest.approx(run.service_cpu["echo"] / run.calls * 1e3)
    assert run.throughput == pytest.approx(run.calls / run.seconds)
    assert run.ms(50) <= run.ms(99)
    both = measure.combine([run, run])
    assert both.calls == 2 * run.calls and both.cpu_ms("echo") == pytest.approx(run.cpu_ms("echo"))
    assert not list(tmp_path.glob("requests-*.bin")) and not list(tmp_path.glob("load-*.json")), (
        "the request and spec files are removed afterwards"
    )


@pytest.mark.slow
def test_run_load_fails_loudly_when_calls_fail(echo_server, tmp_path):
    _proc, target = echo_server
    with pytest.raises(RuntimeError, match="load generator did not start|INVALID_ARGUMENT"):
        measure.run_load(target, "/t.Echo/Echo", [b"fail"], clients=1, seconds=0.5, workdir=tmp_path)
    with pytest.raises(RuntimeError, match="UNIMPLEMENTED"):
        measure.run_load(target, "/t.Echo/Nope", [b"x"], clients=1, seconds=0.5, workdir=tmp_path)


@pytest.fixture
def http_echo():
    """An HTTP/1.1 (keep-alive) server answering a POST with its body; a body of ``fail`` gets a 500."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: dict[str, set | int] = {"posts": 0, "types": set(), "keys": set(), "paths": set(), "ports": set()}
    lock = threading.Lock()

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                seen["posts"] += 1
                seen["types"].add(self.headers["Content-Type"])
                seen["keys"].add(self.headers["x-api-key"])
                seen["paths"].add(self.path)
                seen["ports"].add(self.client_address[1])
            self.send_response(500 if body == b"fail" else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_run_load_posts_http_bodies_over_keep_alive_connections(http_echo, tmp_path):
    target, seen = http_echo
    run = measure.run_load(
        target,
        "/v1/echo",
        [b'{"a": 1}', b'{"b": 2}'],
        clients=3,
        seconds=1.0,
        threads_per_process=2,
        metadata=[("x-api-key", "secret")],
        workdir=tmp_path,
        content_type="application/json",
    )
    # Two load processes (2 + 1 clients), each warming up with 3 calls per client before the window.
    assert run.clients == 3 and run.calls == seen["posts"] - 3 * 3
    assert len(run.latencies) == run.calls and (run.latencies > 0).all()
    assert (
        seen["types"] == {"application/json"} and seen["keys"] == {"secret"} and seen["paths"] == {"/v1/echo"}
    )
    assert len(seen["ports"]) == 3, "one keep-alive connection per client"


@pytest.mark.slow
def test_run_load_fails_loudly_on_http_errors(http_echo, tmp_path):
    target, _ = http_echo
    with pytest.raises(RuntimeError, match="HTTP 500"):
        measure.run_load(
            target, "/v1/echo", [b"fail"], clients=1, seconds=0.5, workdir=tmp_path, content_type="text/plain"
        )


def test_request_files_round_trip(tmp_path):
    from benchmarks.loadgen import read_requests, write_requests

    requests = [b"", b"\x00\x01", b"x" * 70_000]
    write_requests(tmp_path / "r.bin", requests)
    assert read_requests(tmp_path / "r.bin") == requests


STACKS = """\
Thread._bootstrap (threading.py:1002);_serve (grpc/_server.py:1314) 40
_run (grpc/_server.py:1);run (cbir/server.py:193);Search (gateway/server.py:47);prepare_image (gateway/images.py:100) 10
_run (grpc/_server.py:1);run (cbir/server.py:193);_finish (cbir/server.py:260);inc (prometheus_client/metrics.py:340) 5
_run (grpc/_server.py:1);run (cbir/server.py:193);_abort (cbir/server.py:230);info (/usr/lib/python3.11/logging/__init__.py:1489) 3
_run (grpc/_server.py:1);run (cbir/server.py:193);_embed (gateway/search.py:386);embed (embedder/client.py:205);_blocking (grpc/_channel.py:1136) 20
_run (grpc/_server.py:1);run (cbir/server.py:193) 2
main (tool.py:1) 1
"""


def test_breakdown_sorts_samples_into_hops_by_priority():
    stacks = measure.parse_collapsed(STACKS + "garbage line\n")
    assert sum(stacks.values()) == 81
    hops = measure.breakdown(stacks, measure.GATEWAY_RULES)
    assert hops == {
        "gRPC Python server (poll, hand-off, (de)serialise)": 40,
        "Predict call (embedder client)": 20,
        "decode check (image validation)": 10,
        "metrics": 5,
        "logging": 3,
        "interceptor (request id, status mapping)": 2,
        "other Python": 1,
    }
    text = measure.format_breakdown(
        stacks, measure.GATEWAY_RULES, rate=100, seconds=2, calls=100, cpu_ms=20.0
    )
    # 20 samples at 100 Hz over 100 requests = 2 ms of GIL-held time per request in the Predict call.
    assert "Predict call (embedder client)                            2.000  10.0%" in text
    assert "outside the GIL" in text and "81 samples at 100 Hz" in text
    assert (
        measure.format_breakdown(stacks, measure.GATEWAY_RULES, rate=100, seconds=2, calls=0, cpu_ms=1)
        == "no profile"
    )


PROMETHEUS = """\
# HELP cbir_embedder_batch_size Items per model run.
# TYPE cbir_embedder_batch_size histogram
cbir_embedder_batch_size_bucket{batcher="a",le="1.0"} %d
cbir_embedder_batch_size_bucket{batcher="a",le="2.0"} %d
cbir_embedder_batch_size_bucket{batcher="a",le="4.0"} %d
cbir_embedder_batch_size_bucket{batcher="a",le="+Inf"} %d
cbir_embedder_batch_size_count{batcher="a"} %d
cbir_embedder_batch_size_sum{batcher="a"} %d
cbir_embedder_batch_size_bucket{batcher="b",le="1.0"} 99
cbir_embedder_batch_size_count{batcher="b"} 99
"""


def test_histogram_deltas_between_two_scrapes():
    before = measure.histogram(PROMETHEUS % (1, 1, 2, 2, 2, 4), "cbir_embedder_batch_size", batcher="a")
    assert before == ({1.0: 1, 2.0: 1, 4.0: 2, float("inf"): 2}, 4, 2)
    after = measure.histogram(PROMETHEUS % (3, 5, 9, 9, 9, 30), "cbir_embedder_batch_size", batcher="a")
    rows, total, count = measure.histogram_delta(before, after)
    assert rows == [(0.0, 1.0, 2), (1.0, 2.0, 2), (2.0, 4.0, 3), (4.0, float("inf"), 0)]
    assert (total, count) == (26, 7)
    text = measure.format_histogram(rows)
    assert "        1:       2  28.6%" in text and "      3-4:       3  42.9%" in text and "inf" not in text


def test_counter_by_sums_a_counter_per_label_value():
    text = (
        "# TYPE cbir_embedder_batches_closed_total counter\n"
        'cbir_embedder_batches_closed_total{batcher="a",reason="full"} 3.0\n'
        'cbir_embedder_batches_closed_total{batcher="a",reason="timeout"} 2.0\n'
        'cbir_embedder_batches_closed_total{batcher="b",reason="full"} 7.0\n'
        'cbir_embedder_batches_closed_created{batcher="a",reason="full"} 1.7e9\n'
    )
    found = measure.counter_by(text, "cbir_embedder_batches_closed_total", "reason", batcher="a")
    assert found == {"full": 3.0, "timeout": 2.0}
    assert measure.counter_by(text, "cbir_embedder_batches_closed", "reason") == {
        "full": 10.0,
        "timeout": 2.0,
    }


@pytest.mark.slow
def test_profiler_samples_a_busy_process(busy_child, tmp_path):
    proc, spin = busy_child
    profiler = measure.Profiler(
        proc.pid, 1, tmp_path / "busy.spy", rate=100, extra=["--nonblocking", "--gil"]
    )
    profiler.start()
    started = time.monotonic()
    while time.monotonic() - started < 1.5:
        spin(300_000)
    stacks = profiler.stacks()
    assert profiler.error == ""
    assert any("spin (" in stack for stack in stacks) and sum(stacks.values()) > 10


def test_details_are_validated_and_rendered():
    figure = {
        "name": "cpu",
        "value": 1.0,
        "unit": "ms",
        "baseline_name": "b",
        "baseline": 2.0,
        "ratio": 0.5,
        "goal": "value <= 2",
        "higher_is_better": False,
    }
    with pytest.raises(ValueError, match="details"):
        harness.validate_figures([{**figure, "details": ["not", "text"]}])
    checked = harness.validate_figures([{**figure, "details": "hop a 1 ms\nhop b 2 ms"}])
    checked[0]["met"] = harness.goal_met(checked[0])
    result = harness.BenchmarkResult("gw", "ok", 1.0, checked)
    table = harness.render_markdown([result], {"cpu": "x", "cores": 2}, "today", quick=True)
    assert "## Details" in table and "**gw: cpu**" in table and "hop a 1 ms\nhop b 2 ms" in table
