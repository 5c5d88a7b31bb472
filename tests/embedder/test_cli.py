"""`python -m embedder`: TF Serving's flag names and clear errors for user mistakes (no tracebacks)."""

from __future__ import annotations

import pytest

from embedder.cli import build_parser, main


def _serve_parser():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices["serve"]


def test_tf_serving_flag_names_and_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.port, args.rest_api_port, args.model_name) == (8500, 0, "default")
    assert (args.file_system_poll_wait_seconds, args.model_config_file_poll_wait_seconds) == (1.0, 0.0)
    assert args.enable_batching is False and args.enable_model_warmup is True
    flags = set(_serve_parser()._option_string_actions)
    assert {
        "--model_base_path",
        "--model_config_file",
        "--batching_parameters_file",
        "--monitoring_config_file",
        "--port-file",
        "--tls-cert",
        "--grace-seconds",
    } <= flags


@pytest.mark.parametrize(
    ("argv", "value"),
    [
        (["--enable_batching"], True),
        (["--enable_batching=true"], True),
        (["--enable_batching=false"], False),
        ([], False),
    ],
)
def test_boolean_flags_are_written_the_tf_serving_way(argv, value):
    assert build_parser().parse_args(["serve", *argv]).enable_batching is value


def test_environment_fallback(monkeypatch):
    monkeypatch.setenv("CBIR_EMBEDDER_MODEL_NAME", "clothing")
    monkeypatch.setenv("CBIR_EMBEDDER_ENABLE_BATCHING", "true")
    args = build_parser().parse_args(["serve"])
    assert args.model_name == "clothing" and args.enable_batching is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve"], "give --model_base_path"),
        (["serve", "--model_config_file", "/nonexistent/models.config"], "cannot read model config file"),
        (
            ["serve", "--model_base_path", "/tmp/x", "--batching_parameters_file", "{bad}"],
            "batching parameters",
        ),
    ],
)
def test_user_mistakes_exit_2_with_a_message(argv, message, capsys, tmp_path):
    argv = [a.replace("{bad}", str(tmp_path / "b.txt")) for a in argv]
    (tmp_path / "b.txt").write_text("max_batch_size: 3")
    assert main(argv + ["--log-format", "text"]) == 2
    assert message in capsys.readouterr().err


def test_bad_model_config_file_names_the_line(tmp_path, capsys):
    config = tmp_path / "models.config"
    config.write_text("model_config_list {\n  config { name: 'a' base_path: '/a' bogus: 1 }\n}\n")
    assert main(["serve", "--model_config_file", str(config), "--log-format", "text"]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "2:" in err and "bogus" in err


def test_embed_against_nothing_is_a_clean_error(capsys):
    argv = ["embed", "--target", "127.0.0.1:1", "--model-name", "m", "--timeout", "2", "pyproject.toml"]
    assert main(argv) == 2
    assert "error: model server 127.0.0.1:1 unavailable" in capsys.readouterr().err


def test_embed_of_a_missing_file_is_a_clean_error(capsys):
    assert main(["embed", "--target", "127.0.0.1:1", "/nonexistent.jpg"]) == 2
    assert "cannot read image '/nonexistent.jpg'" in capsys.readouterr().err
