"""Structured (JSON lines) logging with a per-request id carried in a context variable."""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import sys
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

# Attributes every LogRecord has; anything else passed with ``extra=`` is emitted as a field.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, logger, message, request id, extra fields."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for terminals, with the request id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = request_id_var.get()
        prefix = f"[{request_id}] " if request_id else ""
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: {prefix}"
        text = base + record.getMessage()
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class CurrentStderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is when a record is emitted.

    A plain StreamHandler keeps the stream it was built with; when that stream is swapped and closed
    (pytest's capture, contextlib.redirect_stderr), a late record — TensorFlow logs some from
    garbage collection — fails with a "Logging error" traceback instead of being printed.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure_cli_logging(
    level: str | int = "INFO", fmt: str = "%(levelname)s %(name)s: %(message)s"
) -> None:
    """Plain-text logs of a command-line tool on the current stderr; calling it again only resets
    the level and format (no duplicate handlers across repeated ``main()`` calls)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, CurrentStderrHandler)), None)
    if handler is None:
        handler = CurrentStderrHandler()
        root.addHandler(handler)
    handler.setFormatter(logging.Formatter(fmt))
    root.setLevel(level.upper() if isinstance(level, str) else level)


def configure_logging(service: str, level: str = "info", fmt: str = "json") -> None:
    """Routes the root logger to stderr in ``fmt`` ("json" or "text") at ``level``."""
    handler = CurrentStderrHandler()
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter that drowns service logs at INFO.
    for noisy in ("absl", "tensorflow", "h5py", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # Library warnings (e.g. Pillow's DecompressionBombWarning) become log records in the same format
    # instead of bare lines on stderr.
    logging.captureWarnings(True)
