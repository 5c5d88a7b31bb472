"""Background service processes on localhost, with their logs and pid files under one folder.

``<root>/run/<name>.json`` records each process (pid, its start time — so a recycled pid is never
mistaken for ours —, port, command line, log file); ``<root>/logs/<name>.log`` is its output. Every
process runs in its own session, so stopping it (SIGTERM to the group, then SIGKILL) also stops
anything it started, and Ctrl-C in the terminal that ran ``make up`` does not reach it.

Used by ``make up``/``make down``/``make status`` (root ``var/stack``) and by the demo (its own root).
Starting, waiting and stopping are cbir/processes.py's, as for the tests' and benchmarks' services;
this module adds the records that let another command (``make down``) find and stop them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cbir.ports import ensure_can_listen
from cbir.processes import (
    LOOPBACK,
    REPO,
    health_of,
    signal_group,
    spawn,
    start_ticks,
    stop_group,
    wait_for_health,
)


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

    @property
    def log_path(self) -> Path:
        return Path(self.log)

    def alive(self) -> bool:
        """The recorded process still runs (not merely a process that got its pid since)."""
        return start_ticks(self.pid) == self.start_ticks


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    alive: bool
    port: int | None
    health: str
    log: str | None


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
        if record.alive():
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
            wait_for_health(
                existing.target, existing.health_service, timeout, existing, require_serving=require_serving
            )
            return existing, False
        self.check_ports(spec)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{spec.name}.log"
        command = [self.python, "-m", spec.module, *spec.args]
        proc = spawn(command, log_path, env=spec.env, cwd=self.cwd, append=True)
        self._children[spec.name] = proc
        ticks = None
        for _ in range(100):  # /proc appears a moment after fork
            ticks = start_ticks(proc.pid)
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
            wait_for_health(
                record.target, record.health_service, timeout, record, require_serving=require_serving
            )
        except BaseException:
            self.stop(spec.name)
            raise
        return record, True

    # ------------------------------------------------------------------ stop

    def stop(self, name: str, *, grace: float = 15.0) -> bool:
        """SIGTERM to the service's process group, SIGKILL after ``grace``. True if it was running."""
        record = self.record(name)
        child = self._children.pop(name, None)
        was_running = record is not None and record.alive()
        if record is not None:

            def alive() -> bool:
                if child is not None:
                    child.poll()  # reaps it, so it stops looking alive
                return record.alive()

            if was_running:
                stop_group(record.pid, alive=alive, grace=grace)
            else:
                # Anything left in the group (a grandchild that ignored SIGTERM) goes too.
                signal_group(record.pid, signal.SIGKILL)
        elif child is not None and child.poll() is None:
            # Interrupted between starting it and writing its pid file.
            was_running = True
            stop_group(child.pid, alive=lambda: child.poll() is None, grace=grace)
        if child is not None:
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
            alive = record.alive()
            health = health_of(record.target, record.health_service) if alive else "STOPPED"
            answer.append(ServiceStatus(record.name, record.pid, alive, record.port, health, record.log))
        return answer

    def pids(self) -> list[int]:
        return [r.pid for r in self.records()]
