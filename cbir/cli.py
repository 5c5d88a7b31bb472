"""How every command line reports a failure: one line on stderr and an exit code, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

import grpc

from cbir.errors import CbirError

# A mistake the user can fix (bad flag, unreadable file, a service refusing the request): argparse's
# own exit code for a usage error.
ERROR_EXIT = 2
# A direct gRPC call failed (the service's status and details are printed).
RPC_FAILED_EXIT = 1
# Ctrl-C, as a shell reports a process ended by SIGINT.
INTERRUPTED_EXIT = 130


def run_main(
    command: Callable[[], int],
    *,
    error_exit: int = ERROR_EXIT,
    also: tuple[type[Exception], ...] = (),
) -> int:
    """``command()``'s exit code, or the report of why it failed.

    A :class:`CbirError`, or an exception of a type in ``also`` (OSError, a config error, ...),
    prints ``error: <message>`` and exits ``error_exit``; a ``grpc.RpcError`` of a direct call prints
    ``error: <CODE>: <details>`` and exits :data:`RPC_FAILED_EXIT`; Ctrl-C prints ``interrupted``.
    Anything else is a bug and keeps its traceback.
    """
    try:
        return command()
    except CbirError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return error_exit
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"error: {code.name}: {details}", file=sys.stderr)
        return RPC_FAILED_EXIT
    except also as exc:
        print(f"error: {exc}", file=sys.stderr)
        return error_exit
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
