"""Listen addresses of every service: loopback by default, and a port that is taken is one line naming it.

Real processes (`python -m <service> serve`) are started on a port this test holds open itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from cbir.errors import FailedPrecondition
from cbir.ports import DEFAULT_HOST, bind_problem, ensure_can_listen
from cbir.processes import REPO, free_port
from cbir.server import ServerOptions, add_common_flags, start_server


@contextmanager
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 that this process listens on for the block."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_services_default_to_loopback():
    import argparse

    parser = argparse.ArgumentParser()
    add_common_flags(parser, env_prefix="CBIR_TEST", port=1, metrics_port=2)
    assert parser.parse_args([]).host == DEFAULT_HOST == "127.0.0.1"
    assert ServerOptions("x").host == "127.0.0.1"


def test_bind_problem_says_why():
    with held_port() as port:
        assert bind_problem("127.0.0.1", port) == "address already in use"
    assert bind_problem("127.0.0.1", free_port()) is None
    assert "cannot resolve" in bind_problem("no-such-host.invalid", 0)
    with pytest.raises(
        FailedPrecondition, match=r"^cannot listen on 127.0.0.1:\d+: address already in use \(--x\)$"
    ):
        with held_port() as port:
            ensure_can_listen("127.0.0.1", port, "--x")


@pytest.mark.parametrize("which", ["port", "metrics-port"])
def test_start_server_on_a_taken_port_is_one_error_naming_the_flag(which):
    with held_port() as port:
        ports = {"port": 0, "metrics-port": 0, which: port}
        options = ServerOptions(
            "t", host="127.0.0.1", port=ports["port"], metrics_port=ports["metrics-port"], env_prefix="CBIR_T"
        )
        variable = "CBIR_T_" + which.upper().replace("-", "_")
        with pytest.raises(
            FailedPrecondition,
            match=rf"^cannot listen on 127.0.0.1:{port}: address already in use \(--{which} / {variable}\)$",
        ):
            start_server(options, [], [])


SERVICES = {
    "gateway": ("CBIR_GATEWAY", ["--serving", "127.0.0.1:1", "--indexer", "127.0.0.1:1"]),
    "indexer": ("CBIR_INDEXER", ["--data-dir", "{tmp}/index"]),
    "embedder": ("CBIR_EMBEDDER", ["--model_name", "m", "--model_base_path", "{tmp}/models/m"]),
}


def serve(service: str, tmp_path, flags: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    prefix, required = SERVICES[service]
    args = [a.format(tmp=tmp_path) for a in required]
    # Every other port is a free one (or off), so only the held one can be taken.
    others = ["--port", "0"] + ([] if f"{prefix}_METRICS_PORT" in env else ["--metrics-port", "-1"])
    return subprocess.run(
        [sys.executable, "-m", service, "serve", *args, *others, *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env},
    )


CASES = [
    ("gateway", "--port", "--port / CBIR_GATEWAY_PORT"),
    ("gateway", "--metrics-port", "--metrics-port / CBIR_GATEWAY_METRICS_PORT"),
    ("indexer", "--port", "--port / CBIR_INDEXER_PORT"),
    ("indexer", "--metrics-port", "--metrics-port / CBIR_INDEXER_METRICS_PORT"),
    ("indexer", "CBIR_INDEXER_METRICS_PORT", "--metrics-port / CBIR_INDEXER_METRICS_PORT"),
    ("embedder", "--port", "--port / CBIR_EMBEDDER_PORT"),
    ("embedder", "--rest_api_port", "--rest_api_port / CBIR_EMBEDDER_REST_API_PORT"),
]


@pytest.mark.slow
@pytest.mark.parametrize("service, setting, named", CASES, ids=[f"{s}{f}" for s, f, _ in CASES])
def test_a_service_on_a_taken_port_exits_with_one_line_naming_port_and_flag(
    tmp_path, service, setting, named
):
    with held_port() as port:
        if setting.startswith("--"):
            result = serve(service, tmp_path, [setting, str(port)], {})
        else:  # the environment variable instead of the flag
            result = serve(service, tmp_path, [], {setting: str(port)})
    expected = f"error: cannot listen on 127.0.0.1:{port}: address already in use ({named})"
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in result.stderr.splitlines(), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("which", ["port", "metrics-port"])
def test_a_port_taken_after_the_check_is_the_same_error(monkeypatch, which):
    # Between the check and the bind another process may take the port: then grpcio's own failure
    # (add_insecure_port raises RuntimeError in grpcio 1.85, returned 0 in older ones) and the metrics
    # server's OSError must give the same one-line error.
    import cbir.server

    monkeypatch.setattr(cbir.server, "ensure_can_listen", lambda *args, **kwargs: None)
    with held_port() as port:
        ports = {"port": 0, "metrics-port": 0, which: port}
        options = ServerOptions("t", host="127.0.0.1", port=ports["port"], metrics_port=ports["metrics-port"])
        with pytest.raises(
            FailedPrecondition,
            match=rf"^cannot listen on 127.0.0.1:{port}: address already in use \(--{which}\)$",
        ):
            start_server(options, [], [])
