"""The stack manager: idempotent start, pid files, health wait, stop (SIGTERM then SIGKILL)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from cbir.errors import FailedPrecondition, NotReady
from cbir.processes import free_port, health_of, pids_alive
from quickstart.stack import ServiceSpec, Stack

pytestmark = pytest.mark.slow

MODULE = "tests.quickstart.health_only_service"


def spec(name: str, port: int, *extra: str) -> ServiceSpec:
    return ServiceSpec(name, MODULE, ("--port", str(port), "--metrics-port", "-1", *extra), port)


def test_up_twice_starts_no_duplicate_and_down_stops_everything(tmp_path):
    root = tmp_path / "stack"
    specs = [spec("first", free_port()), spec("second", free_port(), "--delay", "1")]
    stack = Stack(root)
    try:
        started = [stack.start(s, timeout=60) for s in specs]
        assert [was_started for _, was_started in started] == [True, True]
        assert all(health_of(s.target) == "SERVING" for s in specs)
        pids = [record.pid for record, _ in started]

        # A second `up` (a new manager, as a new `make up` process would be) finds them running.
        again = Stack(root)
        second = [again.start(s, timeout=60) for s in specs]
        assert [was_started for _, was_started in second] == [False, False]
        assert [record.pid for record, _ in second] == pids
        assert sorted(pids_alive(pids)) == sorted(pids)
        status = {s.name: s for s in again.status()}
        assert status["first"].health == "SERVING" and status["second"].port == specs[1].port
        assert (root / "logs" / "first.log").exists() and (root / "run" / "first.json").exists()

        # `down` from yet another manager stops both, the last started first.
        assert Stack(root).stop_all() == ["second", "first"]
        assert pids_alive(pids) == []
        assert Stack(root).records() == [] and Stack(root).stop_all() == []
    finally:
        stack.stop_all()


def test_stale_pid_file_is_replaced(tmp_path):
    root = tmp_path / "stack"
    s = spec("svc", free_port())
    stack = Stack(root)
    try:
        record, _ = stack.start(s, timeout=60)
        os.killpg(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pids_alive([record.pid]) and time.monotonic() < deadline:
            stack._children["svc"].poll()
            time.sleep(0.05)
        fresh, started = Stack(root).start(s, timeout=60)
        assert started and fresh.pid != record.pid
    finally:
        stack.stop_all()
        Stack(root).stop_all()


def test_port_taken_by_a_stranger_is_a_clear_error(tmp_path):
    port = free_port()
    stranger = Stack(tmp_path / "other")
    try:
        stranger.start(spec("stranger", port), timeout=60)
        # The message says which port, why, and what sets it (the spec's default: "the svc port").
        with pytest.raises(
            FailedPrecondition,
            match=f"^cannot listen on 127.0.0.1:{port}: address already in use \\(the svc port\\); ",
        ):
            Stack(tmp_path / "mine").start(spec("svc", port), timeout=60)
    finally:
        stranger.stop_all()


def test_a_service_that_dies_while_starting_reports_its_log(tmp_path):
    stack = Stack(tmp_path / "stack")
    bad = ServiceSpec("bad", MODULE, ("--port", str(free_port()), "--log-level", "nonsense"), free_port())
    with pytest.raises(NotReady, match="exited while starting"):
        stack.start(bad, timeout=30)
    assert stack.records() == []


def test_a_child_without_pid_file_is_stopped_too(tmp_path):
    """Ctrl-C between starting a process and writing its pid file must not orphan it."""
    import subprocess
    import sys

    stack = Stack(tmp_path / "stack")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    stack._children["half-started"] = child
    assert stack.stop_all(grace=5) == ["half-started"]
    assert child.poll() is not None
