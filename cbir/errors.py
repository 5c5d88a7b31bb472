"""Domain errors raised by service cores, and their one mapping to gRPC status codes (both ways) and HTTP."""

from __future__ import annotations

from collections.abc import Mapping

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


# Each status code's domain error: every class's ``code`` read backwards, for clients of our services.
_ERROR_OF_CODE: Mapping[grpc.StatusCode, type[CbirError]] = {
    cls.code: cls
    for cls in (
        InvalidInput,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        ResourceExhausted,
        NotReady,
        Unauthenticated,
        PermissionDenied,
        DeadlineExceeded,
        Unimplemented,
    )
}


def error_for(code: grpc.StatusCode, message: str) -> CbirError:
    """The domain error a called service meant by answering ``code``, so it passes on with its code.

    A code no domain error stands for (UNKNOWN, INTERNAL, CANCELLED, DATA_LOSS, ...) gives a plain
    :class:`CbirError`, which answers INTERNAL: the called service failed, not the request.
    """
    return _ERROR_OF_CODE.get(code, CbirError)(message)


def has_domain_error(code: grpc.StatusCode) -> bool:
    """Whether :func:`error_for` gives ``code`` its own domain error (else a plain CbirError)."""
    return code in _ERROR_OF_CODE


# Google's mapping of gRPC codes to HTTP statuses (google/rpc/code.proto; grpc-gateway's
# HTTPStatusFromCode), for every transport that answers over HTTP. 499 is "client closed request".
HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


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
