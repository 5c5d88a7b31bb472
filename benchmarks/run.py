"""The `make bench` harness: runs every ``benchmarks/bench_*.py`` and writes one report.

Each benchmark module provides ``run(quick: bool, workdir: pathlib.Path) -> list[dict]`` where every
dict is a figure: {"name", "value", "unit", "baseline_name", "baseline", "ratio", "goal",
"higher_is_better"}. Each module runs in its own process with its own time budget, so one that
crashes, hangs or leaks memory is reported as failed and the others still run. Results go to
``<out>/results.json`` and ``<out>/results.md`` (a markdown table plus the machine and the date).

``goal`` is free text; when it reads as a comparison (``ratio >= 2``, ``value < 50``, ``<= 1.1x``: a
trailing ``x`` compares the ratio; a bare ``>= 0.9`` compares the value of a figure without a unit and
the ratio of one with a unit) the table says whether it is met. A figure may also carry
``"passed": true|false`` itself, and ``"details"``: text (a histogram, a CPU breakdown, a sweep)
printed under the figure and in a section of its own below the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REQUIRED = {
    "name": str,
    "value": (int, float),
    "unit": str,
    "baseline_name": str,
    "baseline": (int, float),
    "ratio": (int, float),
    "goal": str,
    "higher_is_better": bool,
}
# Per-benchmark budgets: quick < 1 min and full < 5 min of work each, plus slack for start-up and a
# busy machine (make bench stays within ~20-25 min).
QUICK_BUDGET_SECONDS = 120.0
FULL_BUDGET_SECONDS = 600.0
_GOAL = re.compile(
    r"^\s*(?:(ratio|value)\s*)?(>=|<=|>|<|≥|≤)\s*([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)\s*(x|×)?\s*$", re.I
)


@dataclass
class BenchmarkResult:
    """One benchmark module's outcome."""

    name: str
    status: str  # "ok" | "failed" | "timeout"
    seconds: float
    figures: list[dict] = field(default_factory=list)
    error: str = ""


def discover(directory: Path = HERE, only: list[str] | None = None) -> list[Path]:
    """``bench_*.py`` files in ``directory``, sorted; ``only`` keeps names like ``indexer`` or ``bench_indexer``."""
    found = sorted(directory.glob("bench_*.py"))
    if only:
        wanted = {n.removeprefix("bench_").removesuffix(".py") for n in only}
        found = [p for p in found if p.stem.removeprefix("bench_") in wanted]
    return found


def goal_met(figure: dict) -> bool | None:
    """True/False when the goal is a comparison this understands (or ``passed`` is given), else None."""
    if isinstance(figure.get("passed"), bool):
        return figure["passed"]
    match = _GOAL.match(str(figure.get("goal", "")))
    if not match:
        return None
    subject, op, number, times = match.groups()
    if subject:
        use_ratio = subject.lower() == "ratio"
    else:
        # A bare ">= 0.9" means the value for a dimensionless figure (a recall), the ratio otherwise
        # (">= 0.9" against images/s can only mean 0.9x the baseline).
        use_ratio = bool(times) or bool(figure.get("unit", "").strip())
    value = figure["ratio"] if use_ratio else figure["value"]
    threshold = float(number)
    return {
        ">=": value >= threshold,
        "≥": value >= threshold,
        "<=": value <= threshold,
        "≤": value <= threshold,
        ">": value > threshold,
        "<": value < threshold,
    }[op]


def validate_figures(figures: object) -> list[dict]:
    """The figures, or ValueError saying which field of which figure is wrong."""
    if not isinstance(figures, list) or not figures:
        raise ValueError(f"run() must return a non-empty list of dicts, got {type(figures).__name__}")
    checked = []
    for i, figure in enumerate(figures):
        if not isinstance(figure, dict):
            raise ValueError(f"figure {i} is a {type(figure).__name__}, not a dict")
        for key, kind in REQUIRED.items():
            if key not in figure:
                raise ValueError(f"figure {i} ({figure.get('name', '?')}) has no {key!r}")
            if not isinstance(figure[key], kind) or (kind is not bool and isinstance(figure[key], bool)):
                raise ValueError(f"figure {i} ({figure.get('name', '?')}): {key!r} is {figure[key]!r}")
        if not isinstance(figure.get("details", ""), str):
            raise ValueError(f"figure {i} ({figure['name']}): 'details' must be text")
        checked.append(
            {
                **figure,
                "value": float(figure["value"]),
                "baseline": float(figure["baseline"]),
                "ratio": float(figure["ratio"]),
            }
        )
    return checked


def run_module(
    path: Path, quick: bool, workdir: Path, budget: float, python: str = sys.executable
) -> BenchmarkResult:
    """Runs one benchmark file in a child process, killed after ``budget`` seconds."""
    name = path.stem.removeprefix("bench_")
    # A fresh folder per run: state left by an earlier run (a training run, an index) must not leak in.
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    out = workdir / "figures.json"
    out.unlink(missing_ok=True)
    log_path = workdir / "output.log"
    command = [
        python,
        "-m",
        "benchmarks.run",
        "--child",
        str(path),
        "--workdir",
        str(workdir),
        "--child-out",
        str(out),
    ]
    if quick:
        command.append("--quick")
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            proc.wait(budget)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return BenchmarkResult(
                name,
                "timeout",
                time.monotonic() - started,
                error=f"no result within its {budget:.0f}s budget (log: {log_path})",
            )
        finally:
            # Anything the benchmark started (servers) goes with it.
            _kill_group(proc)
    seconds = time.monotonic() - started
    if proc.returncode != 0 or not out.exists():
        lines = log_path.read_text(errors="replace").strip().splitlines()
        return BenchmarkResult(
            name,
            "failed",
            seconds,
            error=f"exit code {proc.returncode}: "
            + (lines[-1] if lines else "no output")
            + f" (log: {log_path})",
        )
    try:
        figures = validate_figures(json.loads(out.read_text()))
    except ValueError as exc:
        return BenchmarkResult(name, "failed", seconds, error=f"bad result: {exc}")
    for figure in figures:
        figure["met"] = goal_met(figure)
    return BenchmarkResult(name, "ok", seconds, figures)


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _child(path: Path, quick: bool, workdir: Path, out: Path) -> int:
    """Inside the child process: import the file, call run(), write its figures as JSON."""
    spec = importlib.util.spec_from_file_location(f"benchmarks.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    figures = module.run(quick, workdir)
    out.write_text(json.dumps(figures, indent=2, default=float))
    return 0


def machine_info() -> dict:
    """CPU model, cores, RAM, Python and library versions: what the figures depend on."""
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    if hasattr(os, "sched_getaffinity"):
        info["cores"] = len(os.sched_getaffinity(0))
    from importlib.metadata import PackageNotFoundError, version

    for package in ("tensorflow", "keras", "grpcio", "hnswlib", "numpy"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    return info


def _number(x: float) -> str:
    if x == 0 or 0.01 <= abs(x) < 100000:
        return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{x:.3g}"


def render_markdown(results: list[BenchmarkResult], machine: dict, date: str, quick: bool) -> str:
    mode = "quick (smoke) run" if quick else "full run"
    lines = [
        f"# Benchmark results ({mode})",
        "",
        f"Date: {date}  ",
        f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('ram_gb', '?')} GB RAM  ",
        f"Software: Python {machine.get('python')}, TensorFlow {machine.get('tensorflow')}, "
        f"Keras {machine.get('keras')}, grpcio {machine.get('grpcio')}, hnswlib {machine.get('hnswlib')}  ",
        "Command: `make bench"
        + ("-quick`" if quick else "`")
        + " (python -m benchmarks"
        + (" --quick)" if quick else ")"),
        "",
        "| benchmark | figure | value | baseline | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        if result.status != "ok":
            lines.append(
                f"| {result.name} | **{result.status}** ({result.seconds:.0f}s) | "
                f"{result.error.replace('|', '/')} | | | | ✗ |"
            )
            continue
        for f in result.figures:
            met = {True: "✓", False: "✗", None: "—"}[f["met"]]
            arrow = "↑" if f["higher_is_better"] else "↓"
            lines.append(
                f"| {result.name} | {f['name']} {arrow} | {_number(f['value'])} {f['unit']} | "
                f"{_number(f['baseline'])} ({f['baseline_name']}) | {f['ratio']:.3g}× | {f['goal']} | {met} |"
            )
    lines += [
        "",
        "↑ higher is better, ↓ lower is better; — the goal is not a comparison the harness checks.",
        "",
    ]
    detailed = [(r.name, f) for r in results if r.status == "ok" for f in r.figures if f.get("details")]
    if detailed:
        lines += ["## Details", ""]
        for name, f in detailed:
            lines += [f"**{name}: {f['name']}**", "", "```", str(f["details"]).rstrip(), "```", ""]
    lines.append("| benchmark | status | seconds |")
    lines.append("| --- | --- | --- |")
    for result in results:
        lines.append(f"| {result.name} | {result.status} | {result.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def run_all(
    paths: list[Path], *, quick: bool, out_dir: Path, budget: float | None = None, echo=print
) -> tuple[list[BenchmarkResult], dict]:
    """Runs every benchmark in turn and writes ``results.json`` and ``results.md`` into ``out_dir``."""
    budget = budget or (QUICK_BUDGET_SECONDS if quick else FULL_BUDGET_SECONDS)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, path in enumerate(paths, 1):
        name = path.stem.removeprefix("bench_")
        echo(f"[{i}/{len(paths)}] {name} (budget {budget:.0f}s) ...")
        try:
            result = run_module(path, quick, out_dir / "work" / name, budget)
        except Exception as exc:  # noqa: BLE001 - a harness problem with one benchmark must not stop the rest
            result = BenchmarkResult(name, "failed", 0.0, error=f"{type(exc).__name__}: {exc}")
        results.append(result)
        if result.status == "ok":
            for f in result.figures:
                met = {True: "met", False: "NOT met", None: "-"}[f["met"]]
                echo(
                    f"    {f['name']}: {_number(f['value'])} {f['unit']} (x{f['ratio']:.3g} vs {f['baseline_name']}; "
                    f"goal {f['goal']}: {met})"
                )
                for line in str(f.get("details") or "").splitlines():
                    echo(f"        {line}")
        else:
            echo(f"    {result.status.upper()}: {result.error}")
    machine = machine_info()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = {"date": date, "quick": quick, "machine": machine, "benchmarks": [asdict(r) for r in results]}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    (out_dir / "results.md").write_text(render_markdown(results, machine, date, quick))
    return results, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Smoke run: each benchmark in its quick mode.")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="Run only this benchmark (e.g. indexer); repeatable."
    )
    parser.add_argument("--out", type=Path, default=REPO / "var" / "bench", help="Where the results go.")
    parser.add_argument("--dir", type=Path, default=HERE, help="Folder holding the bench_*.py files.")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"Seconds per benchmark (default {QUICK_BUDGET_SECONDS:.0f} quick, {FULL_BUDGET_SECONDS:.0f} full).",
    )
    parser.add_argument("--list", action="store_true", help="List the benchmarks found and exit.")
    # Internal: how the harness runs one benchmark in a child process.
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        try:
            return _child(args.child, args.quick, args.workdir, args.child_out)
        except Exception:  # noqa: BLE001 - the parent reads the last line of this output
            traceback.print_exc()
            return 1
    paths = discover(args.dir, args.only)
    if args.list:
        print("\n".join(p.stem.removeprefix("bench_") for p in paths))
        return 0
    if not paths:
        wanted = f" matching {args.only}" if args.only else ""
        print(f"no benchmarks{wanted} in {args.dir} (expected bench_<name>.py files)", file=sys.stderr)
        return 2
    started = time.monotonic()
    results, _ = run_all(paths, quick=args.quick, out_dir=args.out, budget=args.budget)
    failed = [r.name for r in results if r.status != "ok"]
    print(
        f"\n{len(results) - len(failed)}/{len(results)} benchmarks ran in {time.monotonic() - started:.0f}s; "
        f"results in {args.out / 'results.md'} and {args.out / 'results.json'}"
    )
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
