"""Command-line flags with environment-variable fallbacks: flag > environment > default."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r} (use true/false)")


def _usage_error(parser: argparse.ArgumentParser | Any, message: str) -> None:
    """argparse's usage error (message on stderr, exit 2), also for an argument group, which has no
    ``error`` of its own and does not know its parser."""
    if isinstance(parser, argparse.ArgumentParser):
        parser.error(message)
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def env_flag(
    parser: argparse.ArgumentParser | Any,
    flag: str,
    *,
    env: str,
    default: Any = None,
    type: Callable[[str], Any] = str,
    help: str = "",
    **kwargs: Any,
) -> None:
    """Adds ``flag`` whose default comes from the environment variable ``env`` when it is set.

    Booleans (``type=bool``) become ``--flag``/``--no-flag`` switches. A malformed environment value
    is a usage error naming the variable, not a traceback.
    """
    raw = os.environ.get(env)
    parse = _parse_bool if type is bool else type
    if raw is not None:
        try:
            default = parse(raw)
        except (ValueError, TypeError) as exc:
            _usage_error(parser, f"environment variable {env}={raw!r} is invalid for {flag}: {exc}")
    shown = "(default: %(default)s; env " + env + ")"
    text = f"{help} {shown}".strip()
    if type is bool:
        parser.add_argument(
            flag, default=bool(default), action=argparse.BooleanOptionalAction, help=text, **kwargs
        )
    else:
        parser.add_argument(flag, default=default, type=type, help=text, **kwargs)
