"""cbir.errors: the status code of each domain error, read both ways, and its HTTP status."""

from __future__ import annotations

import grpc
import pytest

from cbir import errors

DOMAIN_ERRORS = [
    errors.InvalidInput,
    errors.NotFound,
    errors.AlreadyExists,
    errors.FailedPrecondition,
    errors.Aborted,
    errors.ResourceExhausted,
    errors.NotReady,
    errors.Unauthenticated,
    errors.PermissionDenied,
    errors.DeadlineExceeded,
    errors.Unimplemented,
]


@pytest.mark.parametrize("cls", DOMAIN_ERRORS, ids=lambda c: c.__name__)
def test_a_status_comes_back_as_the_error_that_answers_it(cls: type[errors.CbirError]) -> None:
    error = errors.error_for(cls.code, "the message")
    assert type(error) is cls and error.message == "the message"
    assert errors.status_of(error) == (cls.code, "the message")
    assert errors.has_domain_error(cls.code)


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED, grpc.StatusCode.DATA_LOSS],
)
def test_a_status_without_a_domain_error_is_an_internal_failure(code: grpc.StatusCode) -> None:
    error = errors.error_for(code, "boom")
    assert type(error) is errors.CbirError and error.code == grpc.StatusCode.INTERNAL
    assert not errors.has_domain_error(code)


def test_every_status_code_has_an_http_status() -> None:
    assert set(errors.HTTP_STATUS) == set(grpc.StatusCode)
    assert errors.HTTP_STATUS[errors.InvalidInput.code] == 400
    assert errors.HTTP_STATUS[errors.NotReady.code] == 503
