"""Domain errors raised by service cores, and their one mapping to gRPC status codes."""

from __future__ import annotations

import grpc


class CbirError(Exception):
    """Base of every error a service core raises on purpose; carries the gRPC status it maps to.

    The message is shown to the caller as the status details, so it must say what was wrong and,
    where possible, what to do about it. It must never contain secrets.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(CbirError):
    """The request is malformed: wrong dimension, bad image, k out of range, ..."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CbirError):
    """A named thing (item, generation, model version) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CbirError):
    """Creating something whose name is taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CbirError):
    """The system is not in a state where the request can run (e.g. no active generation)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(CbirError):
    """A concurrent change invalidated the request (e.g. the active generation changed); retry."""

    code = grpc.StatusCode.ABORTED


class ResourceExhausted(CbirError):
    """The request is too large (bytes, pixels, batch) or a queue is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReady(CbirError):
    """The service or one of its dependencies is not available right now; retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(CbirError):
    """No valid credentials were presented."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CbirError):
    """Credentials are valid but do not allow this call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(CbirError):
    """The request's deadline passed before the work could finish."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(CbirError):
    """The method exists in the protocol but this server does not offer it."""

    code = grpc.StatusCode.UNIMPLEMENTED


# Status codes of a downstream call that are passed on unchanged when a service core lets a
# grpc.RpcError from a dependency escape: they describe the dependency's state, not our bug.
PASS_THROUGH_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status code and message a failed call answers with, for every transport (gRPC, HTTP).

    A :class:`CbirError` answers with its own code and message; a ``grpc.RpcError`` of a dependency
    with a code in :data:`PASS_THROUGH_CODES` with that code. None means a bug: the caller answers
    INTERNAL with a generic message and logs the traceback.
    """
    if isinstance(exc, CbirError):
        return exc.code, exc.message
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") and exc.code() in PASS_THROUGH_CODES:
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return exc.code(), f"dependency failed: {details}"
    return None
