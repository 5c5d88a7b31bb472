"""Starts real service processes on free ports for integration tests, and always stops them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
# A service started without a metrics flag would bind its default port (9091/9092), which any other
# process on the machine may hold: tests get a free one instead (a flag still wins over these).
NO_FIXED_PORTS = {
    "CBIR_GATEWAY_METRICS_PORT": "0",
    "CBIR_INDEXER_METRICS_PORT": "0",
    "CBIR_ROLLOUT_METRICS_PORT": "0",
}


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """A service started as ``python -m <module> ...`` whose stderr goes to a log file."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict | None = None):
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = {**os.environ, **NO_FIXED_PORTS, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, *self.args],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, as kill -9)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


def wait_for_port_file(path: Path, proc: ServiceProcess, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        if not proc.alive():
            raise RuntimeError(f"{proc.args} exited with {proc.proc.returncode}:\n{proc.log_text()[-4000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"{proc.args} did not bind a port in {timeout}s:\n{proc.log_text()[-4000:]}")


def wait_for_health(
    target: str,
    service: str = "",
    timeout: float = 60.0,
    proc: ServiceProcess | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence = (),
) -> None:
    """Polls grpc.health.v1 until ``service`` reports SERVING."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    channel = (
        grpc.secure_channel(target, credentials, options=list(options))
        if credentials
        else grpc.insecure_channel(target)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise RuntimeError(
                    f"{proc.args} exited with {proc.proc.returncode}:\n{proc.log_text()[-4000:]}"
                )
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.1)
    tail = proc.log_text()[-4000:] if proc else ""
    raise TimeoutError(f"{target} service {service!r} not SERVING after {timeout}s ({last})\n{tail}")


@contextmanager
def running_service(
    module: str,
    *args: str,
    health_service: str = "",
    timeout: float = 90.0,
    env: dict | None = None,
    log_dir: Path | None = None,
    port_flag: str = "--port",
) -> Iterator[tuple[ServiceProcess, str]]:
    """Runs ``python -m module serve-like args --port 0 --port-file F`` until the block exits.

    Yields the process and its ``127.0.0.1:<port>`` target once health reports SERVING. The
    process is stopped (and killed if needed) whatever happens in the block.
    """
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="cbir-test-"))
    port_file = log_dir / f"{module}-{os.getpid()}-{time.monotonic_ns()}.port"
    proc = ServiceProcess(
        ["-m", module, *args, port_flag, "0", "--port-file", str(port_file)],
        log_dir / f"{module}-{port_file.stem}.log",
        env,
    )
    try:
        port = wait_for_port_file(port_file, proc, timeout)
        target = f"127.0.0.1:{port}"
        wait_for_health(target, health_service, timeout, proc)
        yield proc, target
    finally:
        proc.stop()
