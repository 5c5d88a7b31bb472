"""Listen addresses: the loopback default, and one check and one message for an address that cannot be bound."""

from __future__ import annotations

import errno
import socket

from cbir.errors import FailedPrecondition

# Services listen on loopback unless told otherwise: the indexer's write RPCs are unauthenticated, so
# exposing them on every interface of a developer's machine must be a choice (deploy/ passes 0.0.0.0).
DEFAULT_HOST = "127.0.0.1"


def bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound right now ("address already in use", ...), or None if it can.

    Binds with SO_REUSEADDR, as grpc and http.server do, so a port in TIME_WAIT counts as free.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        return f"cannot resolve host {host!r} ({exc.strerror})"
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return describe(exc)
    return None


def describe(exc: OSError) -> str:
    """The reason of a failed bind in the words of the OS, lower-case ("address already in use")."""
    if exc.errno is not None and exc.strerror:
        return exc.strerror.lower()
    return errno.errorcode.get(exc.errno or 0, str(exc))


def cannot_listen(host: str, port: int, reason: str, flags: str, hint: str = "") -> FailedPrecondition:
    """The one message for an address a service cannot listen on; ``flags`` says how to change it."""
    return FailedPrecondition(
        f"cannot listen on {host}:{port}: {reason} ({flags})" + (f"; {hint}" if hint else "")
    )


def ensure_can_listen(host: str, port: int, flags: str, hint: str = "") -> None:
    """Raises :func:`cannot_listen` when ``host:port`` cannot be bound (port 0: when ``host`` cannot)."""
    if port < 0:
        return
    problem = bind_problem(host, port)
    if problem is not None:
        raise cannot_listen(host, port, problem, flags, hint)
