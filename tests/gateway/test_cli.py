"""Flags of `python -m gateway` (read by the deploy tests too) and their environment fallbacks."""

import pytest

from gateway.cli import _targets, build_parser, main


def test_serve_defaults():
    args = build_parser().parse_args(["serve"])
    assert args.port == 50051 and args.metrics_port == 9091 and args.http_port == 8080
    assert args.http_port_file is None and args.catalogue_root is None
    assert args.max_k == 1000 and args.max_batch == 64 and args.serving == "localhost:8500"


def test_environment_fallbacks(monkeypatch):
    monkeypatch.setenv("CBIR_GATEWAY_MAX_K", "77")
    monkeypatch.setenv("CBIR_GATEWAY_SERVING", "dns:///serving:8500")
    monkeypatch.setenv("CBIR_GATEWAY_SERVING_TLS_CA", "/etc/ca.pem")
    monkeypatch.setenv("CBIR_GATEWAY_HTTP_PORT", "-1")
    monkeypatch.setenv("CBIR_GATEWAY_CATALOGUE_ROOT", "/srv/catalogue")
    args = build_parser().parse_args(["serve"])
    assert args.max_k == 77 and args.serving == "dns:///serving:8500" and args.serving_tls_ca == "/etc/ca.pem"
    assert args.http_port == -1 and args.catalogue_root == "/srv/catalogue"


def test_indexer_targets_repeatable_and_comma_separated():
    args = build_parser().parse_args(["serve", "--indexer", "a:1,b:2", "--indexer", "c:3"])
    assert _targets(args.indexer) == ["a:1", "b:2", "c:3"]


def test_bad_limits_are_a_clean_error(capsys):
    assert main(["serve", "--max-k", "0", "--indexer", "x:1"]) == 2
    assert "--max-k must be at least 1" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "serve" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--api-keys-file", "/nonexistent/keys"], "cannot read --api-keys-file"),
        (["--serving-tls-ca", "/nonexistent/ca.pem"], "cannot read TLS CA file"),
        (["--tls-cert", "/nonexistent/cert.pem"], "TLS needs both"),
        (["--http-port", "-2"], "--http-port must be a port number, 0 (a free port) or -1 (off), got -2"),
        (["--http-port", "70000"], "--http-port must be a port number"),
        (
            ["--catalogue-root", "/nonexistent/images"],
            "--catalogue-root '/nonexistent/images' is not a folder",
        ),
    ],
)
def test_startup_mistakes_are_clean_errors(flags, message, capsys):
    code = main(
        [
            "serve",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--http-port",
            "0",
            "--indexer",
            "127.0.0.1:1",
            *flags,
        ]
    )
    assert code == 2 and message in capsys.readouterr().err


def test_a_taken_http_port_is_a_clean_error(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(
            [
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--metrics-port",
                "-1",
                "--http-port",
                str(port),
                "--indexer",
                "127.0.0.1:1",
                "--log-level",
                "error",
            ]
        )
    assert code == 2 and f"cannot listen for HTTP on 127.0.0.1:{port}" in capsys.readouterr().err
