"""The process supervisor: a stop ends the whole group, kill is kill -9, and waits fail early with the log."""

from __future__ import annotations

import signal
import time

import pytest

from cbir.errors import NotReady
from cbir.processes import ServiceProcess, free_port, pids_alive, wait_for_health, wait_for_port_file

# A parent that starts a child (in its own process group, as a service's helper would be), prints the
# child's pid and waits.
PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def _first_line(proc: ServiceProcess, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = proc.log_text().splitlines()
        if lines:
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no output from {proc.name}")


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether ``pid`` is gone within ``timeout`` (a killed process takes a moment to exit)."""
    deadline = time.monotonic() + timeout
    while pids_alive([pid]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids_alive([pid]) == []


def test_stop_ends_the_service_and_what_it_started(tmp_path):
    proc = ServiceProcess(["-c", PARENT], tmp_path / "parent.log")
    child = int(_first_line(proc))
    assert pids_alive([proc.pid, child]) == [proc.pid, child]
    assert proc.stop(timeout=10) == -signal.SIGTERM
    assert not proc.alive() and _gone(child)


def test_kill_is_sigkill_of_the_group(tmp_path):
    proc = ServiceProcess(["-c", PARENT], tmp_path / "parent.log")
    child = int(_first_line(proc))
    proc.kill()
    assert proc.proc.returncode == -signal.SIGKILL
    assert _gone(child)
    assert proc.stop() == -signal.SIGKILL  # stopping a dead service is harmless


def test_a_service_that_exits_before_its_port_file_reports_its_log(tmp_path):
    proc = ServiceProcess(
        ["-c", "import sys; print('cannot open the index', file=sys.stderr); sys.exit(3)"],
        tmp_path / "bad.log",
    )
    with pytest.raises(NotReady, match=r"(?s)exit code 3.*exited while starting.*cannot open the index"):
        wait_for_port_file(tmp_path / "never.port", proc, timeout=30)
    proc.stop()


def test_health_wait_gives_up_after_its_timeout():
    started = time.monotonic()
    with pytest.raises(NotReady, match=r"not SERVING after 1s \(UNAVAILABLE\)"):
        wait_for_health(f"127.0.0.1:{free_port()}", timeout=1.0)
    assert time.monotonic() - started < 10
