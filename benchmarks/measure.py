"""What the benchmarks measure besides wall-clock time: CPU per request per service, load from
separate client processes, a profiler breakdown of where a service's CPU goes, Prometheus histograms.

- CPU: utime + stime of a process from ``/proc/<pid>/stat`` (all its threads, the gRPC core's and
  TensorFlow's included), read before and after a load window and divided by the requests answered
  in it. On shared cores this moves far less from run to run than latency or throughput.
- Load: :func:`run_load` starts as many ``benchmarks.loadgen`` processes as needed (a few client
  threads each), so the clients' GIL is never the service's bottleneck and their CPU is reported
  apart.
- Profile: :class:`Profiler` samples a service with py-spy while load runs; :func:`breakdown` sorts
  the samples into hops by the files on their stacks (the first rule that matches a sample wins).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.loadgen import write_requests

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- CPU from /proc


def _stat_fields(path: Path) -> list[str]:
    # The command name in parentheses may itself contain spaces or parentheses.
    return path.read_text().rsplit(")", 1)[1].split()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by every thread of process ``pid``."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    # Fields after the name start at field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of the same name summed) of the live threads of ``pid``."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = _stat_fields(task / "stat")
        except OSError:
            continue  # the thread exited meanwhile
        name = re.sub(r"[-_]?\d+$", "", name) or name  # "grpc_global_tim", "batch-bench-0" -> families
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


class CpuMeter:
    """CPU seconds used by named processes between ``start()`` and ``stop()``."""

    def __init__(self, pids: Mapping[str, int]):
        self.pids = dict(pids)
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: process_cpu(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.used = {name: process_cpu(pid) - self._start[name] for name, pid in self.pids.items()}
        return self.used


def self_cpu() -> float:
    """CPU seconds used so far by this process (all its threads)."""
    times = os.times()
    return times.user + times.system


# --------------------------------------------------------------------------- load


@dataclass
class LoadRun:
    """One load window: calls answered, their latencies, and the CPU each process spent on them."""

    clients: int
    calls: int
    seconds: float
    latencies: np.ndarray
    client_cpu: float
    service_cpu: dict[str, float] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds

    def ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3 if len(self.latencies) else math.nan

    def cpu_ms(self, service: str) -> float:
        """Milliseconds of CPU ``service`` spent per call answered in the window."""
        return self.service_cpu[service] / self.calls * 1e3

    @property
    def client_cpu_ms(self) -> float:
        return self.client_cpu / self.calls * 1e3


def run_load(
    target: str,
    method: str,
    requests: Sequence[bytes],
    *,
    clients: int,
    seconds: float,
    services: Mapping[str, int] = (),
    threads_per_process: int = 4,
    tls: Mapping[str, str] | None = None,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = 30.0,
    on_start: Callable[[], None] | None = None,
    workdir: Path | None = None,
    content_type: str | None = None,
) -> LoadRun:
    """``clients`` closed-loop clients calling ``method`` with ``requests`` (serialised, in turn) for
    ``seconds``, spread over load-generator processes of at most ``threads_per_process`` clients.
    With ``content_type``, ``method`` is an HTTP path and each request the body of a POST of that
    type (``metadata`` as headers), one keep-alive connection per client.

    The CPU of ``services`` (name -> pid) is read when every client is connected and warm and the
    go signal is sent, and again once every client has stopped. ``on_start`` runs right after go
    (e.g. to start a profiler). Any failed call fails the run (a benchmark of errors is worthless).
    """
    if clients < 1:
        raise ValueError("clients must be >= 1")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="cbir-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    request_file = workdir / f"requests-{stamp}.bin"
    write_requests(request_file, list(requests))
    sizes = [threads_per_process] * (clients // threads_per_process)
    if clients % threads_per_process:
        sizes.append(clients % threads_per_process)
    procs: list[subprocess.Popen] = []
    spec_files: list[Path] = []
    try:
        for i, threads in enumerate(sizes):
            spec = {
                "target": target,
                "method": method,
                "requests": str(request_file),
                "threads": threads,
                "seconds": seconds,
                "timeout": timeout,
                "tls": dict(tls) if tls else None,
                "metadata": [list(m) for m in metadata],
                "content_type": content_type,
                # Each process starts on a different request so that the mix is the same at any size.
                "offset": i,
            }
            spec_file = workdir / f"load-{stamp}-{i}.json"
            spec_file.write_text(json.dumps(spec))
            spec_files.append(spec_file)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.loadgen", str(spec_file)],
                    cwd=REPO,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in procs:
            line = proc.stdout.readline().strip()
            if line != "ready":
                proc.wait(30)
                raise RuntimeError(f"load generator did not start: {line} {proc.stderr.read()[-2000:]}")
        meter = CpuMeter(services)
        meter.start()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        if on_start is not None:
            on_start()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=seconds + timeout + 60)
            if proc.returncode != 0 or not out.strip():
                raise RuntimeError(f"load generator failed ({proc.returncode}): {err[-2000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        used = meter.stop()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for path in (request_file, *spec_files):
            path.unlink(missing_ok=True)
    failures = sum(r["failure_count"] for r in results)
    if failures:
        example = next(f for r in results for f in r["failures"])
        raise RuntimeError(f"{failures} of the load's calls to {method} failed, e.g. {example}")
    calls = sum(r["calls"] for r in results)
    if calls == 0:
        raise RuntimeError(f"no call to {method} finished within {seconds}s")
    return LoadRun(
        clients=clients,
        calls=calls,
        seconds=max(r["elapsed"] for r in results),
        latencies=np.concatenate([np.asarray(r["latencies"], float) for r in results]),
        client_cpu=sum(r["cpu"] for r in results),
        service_cpu=used,
    )


# --------------------------------------------------------------------------- profiler


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter (a dev dependency), or on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy sampling one process for ``seconds`` (non-blocking: the target is never paused)."""

    def __init__(self, pid: int, seconds: float, out: Path, rate: int = 250, extra=("--nonblocking",)):
        self.pid, self.seconds, self.out, self.rate = pid, seconds, Path(out), rate
        self.extra = list(extra)
        self._proc: subprocess.Popen | None = None
        self.error = ""

    def start(self) -> None:
        exe = py_spy()
        if exe is None:
            self.error = "py-spy is not installed (make install installs the dev dependencies)"
            return
        self._proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(self.pid),
                "--duration",
                str(max(1, int(self.seconds))),
                "--rate",
                str(self.rate),
                "--format",
                "raw",
                *self.extra,
                "--output",
                str(self.out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stacks(self) -> Counter[str]:
        """Collapsed stacks ("root;...;leaf" -> samples) once the recording is over; empty on failure."""
        if self._proc is None:
            return Counter()
        try:
            output, _ = self._proc.communicate(timeout=self.seconds + 60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            output, _ = self._proc.communicate()
        if self._proc.returncode != 0 or not self.out.exists():
            self.error = f"py-spy failed ({self._proc.returncode}): {output.strip()[-500:]}"
            return Counter()
        return parse_collapsed(self.out.read_text())


def parse_collapsed(text: str) -> Counter[str]:
    """py-spy's raw format (Brendan Gregg's collapsed stacks): one ``frame;frame;... count`` per line."""
    stacks: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


# A rule is (hop, substrings): a sample belongs to the first rule any of whose substrings occurs in
# one of its frames ("function (path:line)"). Order is priority: the specific hops (logging, metrics,
# checks) first, the servicer and the gRPC plumbing that sit under every request last.
Rules = Sequence[tuple[str, Sequence[str]]]
COMMON_TAIL: Rules = (
    ("interceptor (request id, status mapping)", ("cbir/server.py",)),
    ("gRPC Python server (poll, hand-off, (de)serialise)", ("grpc/", "concurrent/futures", "threading.py")),
)
COMMON_HEAD: Rules = (
    ("logging", ("/logging/", "cbir/logs.py")),
    ("metrics", ("prometheus_client/", "/metrics.py")),
)
GATEWAY_RULES: Rules = (
    *COMMON_HEAD,
    ("decode check (image validation)", ("gateway/images.py", "/PIL/")),
    ("Predict call (embedder client)", ("embedder/client.py",)),
    ("Knn call (indexer client)", ("indexer/client.py",)),
    ("coalescing", ("gateway/coalesce.py",)),
    ("search core (validation, generation, merge)", ("gateway/search.py",)),
    ("request parsing and response building", ("gateway/server.py",)),
    ("health prober", ("gateway/health.py",)),
    *COMMON_TAIL,
)
INDEXER_RULES: Rules = (
    *COMMON_HEAD,
    ("hnswlib search", ("indexer/graph.py",)),
    ("Knn core (checks, hits)", ("indexer/core.py",)),
    ("Knn conversions and response building", ("indexer/server.py",)),
    *COMMON_TAIL,
)
EMBEDDER_RULES: Rules = (
    *COMMON_HEAD,
    ("TensorFlow run", ("embedder/servable.py", "/tensorflow/")),
    ("batching", ("embedder/batching.py",)),
    ("model manager (resolve, checks)", ("embedder/model_manager.py",)),
    ("tensor conversions and response building", ("embedder/server.py",)),
    *COMMON_TAIL,
)


def classify(stack: str, rules: Rules) -> str:
    frames = stack.split(";")
    for hop, needles in rules:
        if any(needle in frame for frame in frames for needle in needles):
            return hop
    return "other Python"


def breakdown(stacks: Counter[str], rules: Rules) -> dict[str, int]:
    """Samples per hop, largest first."""
    hops: Counter[str] = Counter()
    for stack, count in stacks.items():
        hops[classify(stack, rules)] += count
    return dict(hops.most_common())


# --------------------------------------------------------------------------- Prometheus


def scrape(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


def histogram(text: str, name: str, **labels: str) -> tuple[dict[float, float], float, float]:
    """(cumulative count per upper bound ``le``, sum, count) of one Prometheus histogram series."""
    buckets: dict[float, float] = {}
    total = count = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or not match["name"].startswith(name):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        if any(found.get(k) != v for k, v in labels.items()):
            continue
        suffix = match["name"][len(name) :]
        if suffix == "_bucket":
            buckets[float(found["le"])] = buckets.get(float(found["le"]), 0.0) + float(match["value"])
        elif suffix == "_sum":
            total += float(match["value"])
        elif suffix == "_count":
            count += float(match["value"])
    return buckets, total, count


def counter_by(text: str, name: str, by: str, **labels: str) -> dict[str, float]:
    """Values of one Prometheus counter per value of its label ``by``, among the series matching ``labels``."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match["name"] not in (name, name + "_total"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        if by in found and all(found.get(k) == v for k, v in labels.items()):
            values[found[by]] = values.get(found[by], 0.0) + float(match["value"])
    return values


def histogram_delta(
    before: tuple[dict[float, float], float, float], after: tuple[dict[float, float], float, float]
) -> tuple[list[tuple[float, float, float]], float, float]:
    """Observations between two scrapes: ([(lower, upper, count) per bucket], sum, count)."""
    bounds = sorted(after[0])
    rows, previous, lower = [], 0.0, 0.0
    for upper in bounds:
        cumulative = after[0][upper] - before[0].get(upper, 0.0)
        rows.append((lower, upper, cumulative - previous))
        previous, lower = cumulative, upper
    return rows, after[1] - before[1], after[2] - before[2]


def format_breakdown(
    stacks: Counter[str], rules: Rules, *, rate: int, seconds: float, calls: float, cpu_ms: float
) -> str:
    """Where one request's CPU goes: GIL-held time per hop (py-spy ``--gil`` samples / rate / calls),
    and the rest of the measured CPU per request, spent outside the GIL (the gRPC core's I/O and
    polling, image decoding, TensorFlow's kernels, hnswlib's search loop)."""
    if not stacks or calls <= 0:
        return "no profile"
    hops = breakdown(stacks, rules)
    per_call = {hop: n / rate / calls * 1e3 for hop, n in hops.items()}
    held = sum(per_call.values())
    lines = [f"{'hop':<52} {'ms/request':>10} {'share':>6}"]
    for hop, ms in per_call.items():
        lines.append(f"{hop:<52} {ms:>10.3f} {ms / cpu_ms:>6.1%}")
    outside = max(0.0, cpu_ms - held)
    lines.append(
        f"{'outside the GIL (C: gRPC core, decoders, kernels)':<52} {outside:>10.3f} {outside / cpu_ms:>6.1%}"
    )
    lines.append(f"{'total CPU per request (/proc)':<52} {cpu_ms:>10.3f} {1:>6.0%}")
    lines.append(f"({sum(hops.values())} samples at {rate} Hz over {seconds:.0f} s, {calls:.0f} requests)")
    return "\n".join(lines)


def format_histogram(rows: Sequence[tuple[float, float, float]], unit: str = "") -> str:
    """One line per non-empty bucket: range, count, share, bar."""
    total = sum(count for _, _, count in rows) or 1
    lines = []
    for lower, upper, count in rows:
        if count <= 0:
            continue
        low = int(lower) + 1 if float(lower).is_integer() else lower
        label = f"{low:g}" if low == upper else f"{low:g}-{upper:g}"
        lines.append(
            f"{label:>9}{unit}: {int(count):>7} {count / total:>6.1%} {'#' * round(40 * count / total)}"
        )
    return "\n".join(lines)


def combine(runs: Sequence[LoadRun]) -> LoadRun:
    """Several load windows of the same setting as one (alternating rounds add up)."""
    services: dict[str, float] = {}
    for run in runs:
        for name, cpu in run.service_cpu.items():
            services[name] = services.get(name, 0.0) + cpu
    return LoadRun(
        clients=runs[0].clients,
        calls=sum(r.calls for r in runs),
        seconds=sum(r.seconds for r in runs),
        latencies=np.concatenate([r.latencies for r in runs]),
        client_cpu=sum(r.client_cpu for r in runs),
        service_cpu=services,
    )
