"""Flags fall back to environment variables, and bad environment values are clear usage errors."""

import argparse

import pytest

from cbir.config import env_flag


def parser_with(monkeypatch, env: dict[str, str]):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser(prog="svc")
    env_flag(parser, "--port", env="SVC_PORT", default=50051, type=int, help="Port.")
    env_flag(parser, "--tls", env="SVC_TLS", default=False, type=bool, help="TLS.")
    return parser


def test_default_when_neither_flag_nor_env(monkeypatch):
    monkeypatch.delenv("SVC_PORT", raising=False)
    args = parser_with(monkeypatch, {}).parse_args([])
    assert args.port == 50051 and args.tls is False


def test_env_overrides_default_and_flag_overrides_env(monkeypatch):
    parser = parser_with(monkeypatch, {"SVC_PORT": "7000", "SVC_TLS": "true"})
    assert parser.parse_args([]).port == 7000
    assert parser.parse_args([]).tls is True
    assert parser.parse_args(["--port", "8000", "--no-tls"]).port == 8000
    assert parser.parse_args(["--no-tls"]).tls is False


def test_bad_env_value_names_the_variable(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        parser_with(monkeypatch, {"SVC_PORT": "eighty"})
    assert exc.value.code == 2
    assert "SVC_PORT" in capsys.readouterr().err


def test_help_mentions_env(monkeypatch):
    text = parser_with(monkeypatch, {}).format_help()
    assert "SVC_PORT" in text


def test_bad_env_value_of_a_flag_in_an_argument_group_is_a_usage_error(monkeypatch, capsys):
    # The model server's flags live in argument groups, which have no `error` of their own.
    monkeypatch.setenv("CBIR_EMBEDDER_ENABLE_BATCHING", "maybe")
    from embedder.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "CBIR_EMBEDDER_ENABLE_BATCHING='maybe'" in err and "--enable_batching" in err
