"""Flags of `python -m gateway` (read by the deploy tests too) and their environment fallbacks."""

import pytest

from gateway.cli import _targets, build_parser, main


def test_serve_defaults():
    args = build_parser().parse_args(["serve"])
    assert args.port == 50051 and args.metrics_port == 9091
    assert args.max_k == 1000 and args.max_batch == 64 and args.serving == "localhost:8500"


def test_environment_fallbacks(monkeypatch):
    monkeypatch.setenv("CBIR_GATEWAY_MAX_K", "77")
    monkeypatch.setenv("CBIR_GATEWAY_SERVING", "dns:///serving:8500")
    monkeypatch.setenv("CBIR_GATEWAY_SERVING_TLS_CA", "/etc/ca.pem")
    args = build_parser().parse_args(["serve"])
    assert args.max_k == 77 and args.serving == "dns:///serving:8500" and args.serving_tls_ca == "/etc/ca.pem"


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
    ],
)
def test_startup_mistakes_are_clean_errors(flags, message, capsys):
    code = main(["serve", "--port", "0", "--metrics-port", "-1", "--indexer", "127.0.0.1:1", *flags])
    assert code == 2 and message in capsys.readouterr().err
