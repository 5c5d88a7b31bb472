"""Service processes on localhost: start one with its output in a log, wait for its port file and its
health, and stop it together with anything it started.

Every process runs in its own session (its own process group), so stopping it (SIGTERM to the group,
SIGKILL to whatever is left after a grace period) also stops its children, and a Ctrl-C in the
terminal that started it does not reach it. The quickstart's stack (``quickstart/stack.py``, services
that outlive the command which started them), the integration tests and the benchmarks
(:class:`ServiceProcess`, children of the process that runs them) all start and stop services here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbir.errors import NotReady

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
# Unbuffered output, so a log's tail is current when a service dies; TensorFlow's C++ chatter off.
SERVICE_ENV = {"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
# A service started without a metrics flag would bind its default port (9091/9092), which any other
# process on the machine may hold: a ServiceProcess gets a free one instead (a flag still wins).
NO_FIXED_PORTS = {
    "CBIR_GATEWAY_METRICS_PORT": "0",
    "CBIR_INDEXER_METRICS_PORT": "0",
    "CBIR_ROLLOUT_METRICS_PORT": "0",
}
POLL_SECONDS = 0.05


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- start and stop


def spawn(
    command: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path = REPO,
    append: bool = False,
) -> subprocess.Popen[bytes]:
    """Starts ``command`` in a session of its own with stdout and stderr in ``log_path``.

    ``append`` keeps what the log already holds and writes a line with the date and the command
    first, so runs of the same service stay apart.
    """
    with open(log_path, "ab" if append else "wb") as log:
        if append:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
            log.flush()
        # The child holds its own copy of the log's descriptor: this one can close.
        return subprocess.Popen(
            list(command),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **SERVICE_ENV, **(env or {})},
            start_new_session=True,
        )


def signal_group(pid: int, sig: int) -> None:
    """Sends ``sig`` to the process group led by ``pid``; a group that is gone is not an error."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(pid: int, *, alive: Callable[[], bool], grace: float) -> None:
    """SIGTERM to the group led by ``pid``; once ``alive()`` is false, or after ``grace`` seconds,
    SIGKILL to the group, which also ends anything of it that outlived its leader."""
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    signal_group(pid, signal.SIGKILL)


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), which
    tells a recycled pid from the process it once was; None if the process is gone."""
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


def pids_alive(pids: Sequence[int]) -> list[int]:
    """The pids of ``pids`` that still run (zombies count as gone)."""
    return [pid for pid in pids if start_ticks(pid) is not None]


def tail(path: str | Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log, or ``(no log)``."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- waiting


class Watched(Protocol):
    """A starting service whose death ends a wait early, with its log's tail in the error."""

    @property
    def name(self) -> str: ...

    @property
    def log_path(self) -> Path: ...

    def alive(self) -> bool: ...


def _exited(watched: Watched, waiting_for: str) -> NotReady:
    return NotReady(
        f"{watched.name} exited while starting ({waiting_for}); last lines of {watched.log_path}:\n"
        f"{tail(watched.log_path, 60)}"
    )


def wait_for_port_file(path: Path, proc: Watched, timeout: float) -> int:
    """The port a service wrote to ``path`` (its ``--port-file``) once it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        if not proc.alive():
            raise _exited(proc, f"no port in {path}")
        time.sleep(POLL_SECONDS)
    raise NotReady(
        f"{proc.name} did not bind a port in {timeout:.0f}s; last lines of {proc.log_path}:\n"
        f"{tail(proc.log_path, 60)}"
    )


def health_of(
    target: str,
    service: str = "",
    timeout: float = 2.0,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, str | int]] = (),
) -> str:
    """SERVING / NOT_SERVING / ... from grpc.health.v1, or the gRPC error code when nothing answers."""
    channel = (
        grpc.secure_channel(target, credentials, options=list(options))
        if credentials
        else grpc.insecure_channel(target, options=list(options))
    )
    with channel:
        try:
            # types-grpcio-health-checking declares HealthStub without its methods.
            answer = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def wait_for_health(
    target: str,
    service: str = "",
    timeout: float = 60.0,
    proc: Watched | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, str | int]] = (),
    *,
    require_serving: bool = True,
) -> None:
    """Polls grpc.health.v1 until ``service`` reports SERVING (with ``require_serving=False``, until
    anything answers: a gateway is NOT_SERVING until the indexer has an active generation, yet up).

    Raises NotReady with the log's tail as soon as ``proc`` exits, or after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise _exited(proc, f"health of {target}: {last}")
        # A fresh channel each time: a channel that failed to connect backs off for seconds.
        last = health_of(target, service, credentials=credentials, options=options)
        if last == "SERVING" or (not require_serving and last in ("NOT_SERVING", "SERVICE_UNKNOWN")):
            return
        time.sleep(2 * POLL_SECONDS)
    log = f"; last lines of {proc.log_path}:\n{tail(proc.log_path, 60)}" if proc is not None else ""
    raise NotReady(f"{target} service {service!r} not SERVING after {timeout:.0f}s ({last}){log}")


# --------------------------------------------------------------------------- child services


class ServiceProcess:
    """A service started as ``python <args...>`` (e.g. ``-m indexer serve ...``), a child of this
    process, with its output in ``log_path`` and free default ports (:data:`NO_FIXED_PORTS`)."""

    def __init__(self, args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None):
        self.args = list(args)
        self.log_path = Path(log_path)
        self.proc = spawn([sys.executable, *self.args], self.log_path, env={**NO_FIXED_PORTS, **(env or {})})

    @property
    def name(self) -> str:
        return f"`python {' '.join(self.args)}` (pid {self.pid}, exit code {self.proc.poll()})"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM to its group, SIGKILL after ``timeout`` (and to anything left); the exit code."""
        if self.proc.poll() is None:
            stop_group(self.pid, alive=self.alive, grace=timeout)
        else:
            signal_group(self.pid, signal.SIGKILL)  # children that outlived it
        return self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL to the whole process group (a crash, as kill -9)."""
        if self.proc.poll() is None:
            signal_group(self.pid, signal.SIGKILL)
            self.proc.wait(10)


@contextmanager
def running_service(
    module: str,
    *args: str,
    health_service: str = "",
    timeout: float = 90.0,
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    port_flag: str = "--port",
) -> Iterator[tuple[ServiceProcess, str]]:
    """Runs ``python -m module args --port 0 --port-file F`` until the block exits.

    Yields the process and its ``127.0.0.1:<port>`` target once health reports SERVING. The
    process is stopped (and killed if needed) whatever happens in the block.
    """
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="cbir-service-"))
    port_file = log_dir / f"{module}-{os.getpid()}-{time.monotonic_ns()}.port"
    proc = ServiceProcess(
        ["-m", module, *args, port_flag, "0", "--port-file", str(port_file)],
        log_dir / f"{module}-{port_file.stem}.log",
        env,
    )
    try:
        port = wait_for_port_file(port_file, proc, timeout)
        target = f"{LOOPBACK}:{port}"
        wait_for_health(target, health_service, timeout, proc)
        yield proc, target
    finally:
        proc.stop()
