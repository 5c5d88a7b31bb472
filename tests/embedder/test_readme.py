"""The commands in embedder/README.md use flags that exist; the TF Serving lines match ours."""

from __future__ import annotations

import re
from pathlib import Path

from embedder.cli import build_parser

README = Path(__file__).resolve().parents[2] / "embedder" / "README.md"
# Flags only tensorflow_model_server has (GPU memory, its opt-in health service; ours is always on).
TF_SERVING_ONLY = {"--per_process_gpu_memory_fraction", "--enable_grpc_healthcheck_service"}


def _commands(program: str) -> list[list[str]]:
    """Command lines inside the README's ```sh blocks that mention ``program``."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line.split() for line in lines if program in line and not line.lstrip().startswith("#")]


def _subparser(name: str):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


def test_embedder_commands_use_existing_flags():
    commands = _commands("python -m embedder ")
    assert len(commands) >= 5
    for tokens in commands:
        start = tokens.index("embedder") + 1
        sub = _subparser(tokens[start])
        for token in tokens[start + 1 :]:
            if token.startswith("--"):
                assert token.split("=", 1)[0] in sub._option_string_actions, (tokens[start], token)


def test_tf_serving_command_lines_only_use_flags_the_local_server_has_too():
    serve = _subparser("serve")
    lines = _commands("tensorflow_model_server --") + _commands("tensorflow/serving:")
    assert len(lines) >= 2
    seen = 0
    for tokens in lines:
        for token in tokens:
            flag = token.split("=", 1)[0]
            if re.fullmatch(r"--[a-z_]+", flag) and "_" in flag and flag not in TF_SERVING_ONLY:
                assert flag in serve._option_string_actions, flag
                seen += 1
    assert seen >= 10
