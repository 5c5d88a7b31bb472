"""cbir.cli.run_main: every command line's one way to report a failure."""

from __future__ import annotations

import grpc
import pytest

from cbir.cli import run_main
from cbir.errors import InvalidInput, NotReady


class _CallFailed(grpc.RpcError):
    """What a stub raises: an RpcError that is also a grpc.Call (code, details)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"


def _raise(exc: BaseException):
    def command() -> int:
        raise exc

    return command


def test_the_command_s_exit_code_passes_through(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(lambda: 0) == 0
    assert run_main(lambda: 1) == 1
    assert capsys.readouterr().err == ""


def test_a_domain_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(_raise(InvalidInput("--max-k must be at least 1"))) == 2
    assert capsys.readouterr().err == "error: --max-k must be at least 1\n"
    assert run_main(_raise(NotReady("indexer x:1 is unavailable")), error_exit=1) == 1
    assert capsys.readouterr().err == "error: indexer x:1 is unavailable\n"


def test_listed_types_are_reported_the_same_way(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(_raise(FileNotFoundError(2, "No such file", "a.jpg")), also=(OSError,)) == 2
    assert capsys.readouterr().err == "error: [Errno 2] No such file: 'a.jpg'\n"


def test_a_failed_grpc_call_prints_its_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(_raise(_CallFailed())) == 1
    assert capsys.readouterr().err == "error: UNAVAILABLE: connection refused\n"


def test_ctrl_c_exits_130(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(_raise(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_bug_keeps_its_traceback() -> None:
    with pytest.raises(ZeroDivisionError):
        run_main(lambda: 1 // 0)
    with pytest.raises(OSError):
        run_main(_raise(OSError("not listed")))
