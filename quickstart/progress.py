"""Progress display of the demo: numbered steps with timings, and live tails of long subprocesses.

Long steps run as subprocesses whose output goes to a log file; while they run, the last line of
that log (a tqdm bar, a training loss) is shown in place on a terminal, or printed every
``heartbeat`` seconds otherwise (CI logs), so the demo never looks stuck.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from cbir.errors import CbirError

_NOISE = re.compile(r"(cuda|cpu_feature_guard|absl::InitializeLog|rebuild TensorFlow|oneDNN|AVX2 FMA)")


class StepFailed(CbirError):
    """A demo step failed; the message says which and where its log is."""


class Progress:
    """Prints ``[i/N] title`` per step and keeps each step's wall time."""

    def __init__(self, total: int, out: TextIO = sys.stdout, heartbeat: float = 15.0):
        self.total = total
        self.index = 0
        self.out = out
        self.heartbeat = heartbeat
        self.timings: dict[str, float] = {}
        self.started = time.monotonic()
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.current: subprocess.Popen | None = None

    def say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    def info(self, message: str) -> None:
        self.say(f"      {message}")

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.index += 1
        elapsed = time.monotonic() - self.started
        self.say(f"[{self.index}/{self.total}] {title}  (t+{elapsed:.0f}s)")
        started = time.monotonic()
        yield
        seconds = time.monotonic() - started
        self.timings[title] = round(seconds, 2)
        self.info(f"done in {seconds:.1f}s")

    def run(
        self,
        command: Sequence[str],
        log_path: Path,
        *,
        cwd: Path,
        env: dict | None = None,
        timeout: float = 1800.0,
    ) -> None:
        """Runs ``command`` (own session, output to ``log_path``) showing its progress; fails with its log."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        with open(log_path, "ab") as log:
            log.write(f"\n$ {' '.join(command)}\n".encode())
            log.flush()
            self.current = subprocess.Popen(
                list(command),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )
        started = time.monotonic()
        deadline = started + timeout
        last_beat = time.monotonic()
        try:
            while self.current.poll() is None:
                if time.monotonic() > deadline:
                    raise StepFailed(
                        f"`{' '.join(command[:4])} ...` took more than {timeout:.0f}s (log: {log_path})"
                    )
                line = _last_line(log_path)
                if self.tty and line:
                    self.out.write("\r      " + line[:110].ljust(110))
                    self.out.flush()
                elif line and time.monotonic() - last_beat >= self.heartbeat:
                    self.info(f"... {time.monotonic() - started:.0f}s: {line[:150]}")
                    last_beat = time.monotonic()
                time.sleep(0.5)
        finally:
            if self.tty:
                self.out.write("\r" + " " * 118 + "\r")
            self.kill_current()
        code = self.current.returncode
        self.current = None
        if code != 0:
            tail = "\n".join(_useful_lines(log_path)[-15:])
            raise StepFailed(f"`{' '.join(command[:5])} ...` exited with {code}; log {log_path}:\n{tail}")

    def kill_current(self) -> None:
        """Stops the running subprocess and everything it started (no-op when none runs)."""
        proc = self.current
        if proc is None:
            return
        if proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # the group may hold grandchildren even when the leader is gone
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _useful_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    lines = []
    for raw in text.splitlines():
        # tqdm rewrites a line with \r: keep the latest state.
        line = raw.rsplit("\r", 1)[-1].strip()
        if line and not _NOISE.search(line):
            lines.append(line)
    return lines


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 4096))
            chunk = handle.read().decode(errors="replace")
    except OSError:
        return ""
    for raw in reversed(re.split(r"[\r\n]", chunk)):
        line = raw.strip()
        if line and not _NOISE.search(line):
            return line
    return ""
