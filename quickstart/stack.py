"""Background service processes on localhost, with their logs and pid files under one folder.

``<root>/run/<name>.json`` records each process (pid, its start time — so a recycled pid is never
mistaken for ours —, port, command line, log file); ``<root>/logs/<name>.log`` is its output. Every
process runs in its own session, so stopping it (SIGTERM to the group, then SIGKILL) also stops
anything it started, and Ctrl-C in the terminal that ran ``make up`` does not reach it.

Used by ``make up``/``make down``/``make status`` (root ``var/stack``) and by the demo (its own root).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbir.errors import NotReady
from cbir.ports import ensure_can_listen

REPO = Path(__file__).resolve().parents[1]
# Every service of the stack listens here (the stack's services are local by design).
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServiceSpec:
    """How to start one service: ``python -m <module> <args...>``; it serves gRPC on ``port``.

    ``listens`` names every port it binds (gRPC, metrics, ...) with the option that sets it, so a
    taken one is reported before the service starts; by default only ``port``.
    """

    name: str
    module: str
    args: tuple[str, ...]
    port: int
    health_service: str = ""
    env: dict[str, str] = field(default_factory=dict)
    listens: tuple[tuple[int, str], ...] = ()

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def ports(self) -> tuple[tuple[int, str], ...]:
        return self.listens or ((self.port, f"the {self.name} port"),)


@dataclass(frozen=True)
class ServiceRecord:
    """What the pid file says about a started service."""

    name: str
    pid: int
    start_ticks: int
    port: int
    command: list[str]
    log: str
    health_service: str = ""
    started_at: float = 0.0

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    alive: bool
    port: int | None
    health: str
    log: str | None


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its closing one.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z" and not _other_threads_running(pid):
        # A zombie has exited; only its exit status is left. (A multi-threaded process killed with
        # SIGKILL shows its main thread as Z while the others still exit and still hold its sockets.)
        return None
    return int(fields[19])


def _other_threads_running(pid: int) -> bool:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            return True
    return False


def is_alive(record: ServiceRecord) -> bool:
    return _start_ticks(record.pid) == record.start_ticks


def health_of(target: str, service: str = "", timeout: float = 2.0) -> str:
    """SERVING / NOT_SERVING / ... or the gRPC error code when the service does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


class Stack:
    """Starts, finds and stops the services recorded under ``root``."""

    def __init__(self, root: Path, *, python: str = sys.executable, cwd: Path = REPO):
        self.root = Path(root)
        self.python = python
        self.cwd = cwd
        self.run_dir = self.root / "run"
        self.log_dir = self.root / "logs"
        # Children started by this process, so they are reaped (no zombies) when stopped.
        self._children: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ records

    def _record_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def record(self, name: str) -> ServiceRecord | None:
        path = self._record_path(name)
        try:
            return ServiceRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def records(self) -> list[ServiceRecord]:
        if not self.run_dir.is_dir():
            return []
        found = [self.record(p.stem) for p in sorted(self.run_dir.glob("*.json"))]
        return sorted((r for r in found if r), key=lambda r: r.started_at)

    def running(self, name: str) -> ServiceRecord | None:
        """The live process recorded for ``name``; a stale record (process gone) is removed."""
        record = self.record(name)
        if record is None:
            return None
        if is_alive(record):
            return record
        self._record_path(name).unlink(missing_ok=True)
        return None

    # ------------------------------------------------------------------ start

    def check_ports(self, spec: ServiceSpec) -> None:
        """Raises FailedPrecondition naming the option when a port of ``spec`` is taken, unless
        ``spec`` itself already runs (then they are its own)."""
        if self.running(spec.name) is not None:
            return
        for port, option in spec.ports():
            ensure_can_listen(
                LOOPBACK,
                port,
                option,
                hint=f"a process this stack did not start holds it (see `ss -ltnp | grep :{port}`); "
                "stop it or choose another port",
            )

    def start(
        self, spec: ServiceSpec, *, timeout: float = 120.0, require_serving: bool = True
    ) -> tuple[ServiceRecord, bool]:
        """Starts ``spec`` unless it already runs; waits for health SERVING. Returns (record, started).

        With ``require_serving=False`` any health answer will do (a gateway is NOT_SERVING until the
        indexer has an active generation, yet it is up).
        """
        existing = self.running(spec.name)
        if existing is not None:
            wait_healthy(existing, timeout=timeout, require_serving=require_serving)
            return existing, False
        self.check_ports(spec)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{spec.name}.log"
        command = [self.python, "-m", spec.module, *spec.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **spec.env}
        with open(log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                command,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._children[spec.name] = proc
        ticks = None
        for _ in range(100):  # /proc appears a moment after fork
            ticks = _start_ticks(proc.pid)
            if ticks is not None or proc.poll() is not None:
                break
            time.sleep(0.01)
        record = ServiceRecord(
            name=spec.name,
            pid=proc.pid,
            start_ticks=ticks or -1,
            port=spec.port,
            command=command,
            log=str(log_path),
            health_service=spec.health_service,
            started_at=time.time(),
        )
        staging = self._record_path(spec.name).with_suffix(".tmp")
        staging.write_text(json.dumps(asdict(record), indent=2))
        os.replace(staging, self._record_path(spec.name))
        try:
            wait_healthy(record, timeout=timeout, require_serving=require_serving)
        except BaseException:
            self.stop(spec.name)
            raise
        return record, True

    # ------------------------------------------------------------------ stop

    def stop(self, name: str, *, grace: float = 15.0) -> bool:
        """SIGTERM to the service's process group, SIGKILL after ``grace``. True if it was running."""
        record = self.record(name)
        child = self._children.pop(name, None)
        was_running = record is not None and is_alive(record)
        if was_running:
            _signal_group(record.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and is_alive(record):
                if child is not None:
                    child.poll()  # reaps it, so it stops looking alive
                time.sleep(0.05)
            if is_alive(record):
                _signal_group(record.pid, signal.SIGKILL)
        if record is not None:
            # Anything left in the group (a grandchild that ignored SIGTERM) goes too.
            _signal_group(record.pid, signal.SIGKILL)
        if child is not None:
            if record is None and child.poll() is None:
                # Interrupted between starting it and writing its pid file.
                was_running = True
                _signal_group(child.pid, signal.SIGTERM)
            try:
                child.wait(grace if record is None else 5)
            except subprocess.TimeoutExpired:
                _signal_group(child.pid, signal.SIGKILL)
                child.wait(5)
        self._record_path(name).unlink(missing_ok=True)
        return was_running

    def stop_all(self, *, grace: float = 15.0) -> list[str]:
        """Stops every recorded service, the last started first. Returns the names that were running."""
        stopped = []
        names = [r.name for r in reversed(self.records())] + [n for n in self._children]
        for name in dict.fromkeys(names):
            if self.stop(name, grace=grace):
                stopped.append(name)
        return stopped

    # ------------------------------------------------------------------ status

    def status(self) -> list[ServiceStatus]:
        answer = []
        for record in self.records():
            alive = is_alive(record)
            health = health_of(record.target, record.health_service) if alive else "STOPPED"
            answer.append(ServiceStatus(record.name, record.pid, alive, record.port, health, record.log))
        return answer

    def pids(self) -> list[int]:
        return [r.pid for r in self.records()]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_healthy(record: ServiceRecord, *, timeout: float, require_serving: bool = True) -> None:
    """Polls grpc.health.v1 until SERVING (or any answer, if not ``require_serving``); fails early, with
    the log's tail, if the process exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not is_alive(record):
            raise NotReady(
                f"{record.name} exited while starting; last lines of {record.log}:\n{tail(record.log)}"
            )
        last = health_of(record.target, record.health_service)
        if last == "SERVING" or (not require_serving and last in ("NOT_SERVING", "SERVICE_UNKNOWN")):
            return
        time.sleep(0.2)
    raise NotReady(
        f"{record.name} on {record.target} not SERVING after {timeout:.0f}s ({last}); "
        f"last lines of {record.log}:\n{tail(record.log)}"
    )


def tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def pids_alive(pids: Sequence[int]) -> list[int]:
    """The pids of ``pids`` that still run (zombies count as gone)."""
    alive = []
    for pid in pids:
        ticks = _start_ticks(pid)
        if ticks is not None:
            alive.append(pid)
    return alive
