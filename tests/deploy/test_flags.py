"""Every flag and CBIR_* variable a manifest passes to our images exists in that service's own parser
(`<package>.cli.build_parser()`), parses with the values the cluster would give it, and the ports
agree with cbir.defaults."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
from unittest import mock

import pytest

from cbir import defaults
from tests.deploy import rendering
from tests.deploy.rendering import containers, pod_specs

OUR_IMAGES = ("cbir/services", "cbir/trainer")
VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
ENV_IN_HELP = re.compile(r"\benv (CBIR_[A-Z0-9_]+)")
# Downward-API values, as the kubelet would fill them in for the first pod.
FIELD_VALUES = {
    "metadata.labels['apps.kubernetes.io/pod-index']": "0",
    "metadata.name": "cbir-indexer-0",
    "metadata.annotations['batch.kubernetes.io/job-completion-index']": "0",
}


def _parser(package: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"{package}.cli").build_parser()


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _environment(container: dict, objects) -> dict[str, str]:
    """The container's environment as the kubelet builds it (envFrom first, then env)."""
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = VARIABLE.sub(lambda m: env.get(m.group(1), m.group(0)), var["value"])
            continue
        ref = var["valueFrom"]
        if "configMapKeyRef" in ref:
            env[var["name"]] = config_maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
        elif "fieldRef" in ref:
            env[var["name"]] = FIELD_VALUES[ref["fieldRef"]["fieldPath"]]
        else:
            raise AssertionError(f"unexpected env source {ref}")
    return env


def _our_containers(rendered):
    """Distinct (where, container, environment) of every container running one of our images."""
    seen = set()
    for key, objects in rendered.items():
        path, components = key
        # The Jobs read the stack's ConfigMaps (cbir-topology) at run time.
        cluster = (
            objects if rendering.is_stack(path) else objects + rendered[(path.rsplit("/", 1)[0], components)]
        )
        for workload, spec in pod_specs(objects):
            for c in containers(spec):
                if not any(image in c["image"] for image in OUR_IMAGES):
                    continue
                env = _environment(c, cluster)
                fingerprint = json.dumps([c.get("args"), env], sort_keys=True)
                if fingerprint not in seen:
                    seen.add(fingerprint)
                    where = f"{rendering.combination_id(*key)}: {workload['metadata']['name']}/{c['name']}"
                    yield where, c, env


def _expand(arg: str, env: dict[str, str], where: str) -> str:
    def value(match):
        assert match.group(1) in env, (
            f"{where}: {arg} uses ${match.group(1)}, which the container does not have"
        )
        return env[match.group(1)]

    return VARIABLE.sub(value, arg)


def test_every_flag_and_variable_exists_and_parses(rendered):
    checked = 0
    for where, c, env in _our_containers(rendered):
        args = c["args"]
        assert args[0] == "-m" and "command" not in c, f"{where}: our images run `python {' '.join(args)}`"
        package, command, flags = args[1], args[2], args[3:]
        ours = {k: v for k, v in env.items() if k.startswith("CBIR_")}
        # env_flag reads the environment when the parser is built, as in the real process.
        with mock.patch.dict(os.environ, ours):
            parser = _parser(package)
            sub = _subparser(parser, command)
            known_flags = set(sub._option_string_actions)
            for flag in flags:
                if flag.startswith("--"):
                    assert flag.split("=", 1)[0] in known_flags, (
                        f"{where}: `python -m {package} {command}` has no flag {flag.split('=', 1)[0]}"
                    )
            known_env = {m for a in sub._actions for m in ENV_IN_HELP.findall(a.help or "")}
            for name in ours:
                assert name in known_env, f"{where}: {name} is not read by `python -m {package} {command}`"
            stderr = io.StringIO()
            try:
                with contextlib.redirect_stderr(stderr):
                    parsed = parser.parse_args([command, *(_expand(f, env, where) for f in flags)])
            except SystemExit:
                pytest.fail(
                    f"{where}: `python -m {package} {command}` rejects its arguments:\n{stderr.getvalue()}"
                )
        # The environment-provided settings arrive (TLS files, API keys, ...).
        for name, value in ours.items():
            dest = name.removeprefix(f"CBIR_{package.upper()}_").lower()
            if hasattr(parsed, dest):
                assert str(getattr(parsed, dest)) == value, f"{where}: {name}"
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize(
    ("package", "port", "metrics_port"),
    [
        ("gateway", defaults.GATEWAY_PORT, defaults.GATEWAY_METRICS_PORT),
        ("indexer", defaults.INDEXER_PORT, defaults.INDEXER_METRICS_PORT),
    ],
)
def test_manifest_ports_are_the_parsers_defaults(stacks, package, port, metrics_port):
    with mock.patch.dict(os.environ, {}, clear=False):
        for name in [n for n in os.environ if n.startswith(f"CBIR_{package.upper()}_")]:
            del os.environ[name]
        parsed = _subparser(_parser(package), "serve").parse_args([])
    assert (parsed.port, parsed.metrics_port) == (port, metrics_port)
    for key, objects in stacks.items():
        for _workload, spec in pod_specs(objects):
            c = spec["containers"][0]
            if c.get("args", [None, None])[1:3] == [package, "serve"]:
                ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                extra = {"http": parsed.http_port} if package == "gateway" else {}
                assert ports == {"grpc": parsed.port, "metrics": parsed.metrics_port, **extra}, (
                    rendering.combination_id(*key)
                )


def _parse_serve(package: str, flags, env: dict[str, str], command: str = "serve") -> argparse.Namespace:
    """``python -m <package> <command> <flags>`` parsed with exactly the CBIR_ variables of ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CBIR_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return _parser(package).parse_args([command, *flags])


# Commands that listen (gRPC, metrics): `indexer follow` serves its health and metrics.
LISTENING = {("gateway", "serve"), ("indexer", "serve"), ("embedder", "serve"), ("indexer", "follow")}


def test_services_listen_on_loopback_unless_the_manifests_say_otherwise(rendered):
    for package in ("gateway", "indexer", "embedder"):
        assert _parse_serve(package, [], {}).host == "127.0.0.1", package
    assert _parse_serve("indexer", ["--model", "m", "--eval", "e"], {}, "follow").host == "127.0.0.1"
    served = set()
    for where, c, env in _our_containers(rendered):
        package, command, flags = c["args"][1], c["args"][2], c["args"][3:]
        if (package, command) not in LISTENING:
            continue
        ours = {k: v for k, v in env.items() if k.startswith("CBIR_")}
        parsed = _parse_serve(package, [_expand(f, env, where) for f in flags], ours, command)
        # Probes, peers and Prometheus reach the pod IP, not the container's loopback.
        assert parsed.host == "0.0.0.0", f"{where}: listens on {parsed.host}"
        served.add((package, command))
    assert served == LISTENING


def test_serving_port_default_is_tf_servings(stacks):
    parsed = _subparser(_parser("embedder"), "serve").parse_args([])
    assert parsed.port == defaults.SERVING_GRPC_PORT
    for objects in stacks.values():
        serving = next(spec for w, spec in pod_specs(objects) if w["metadata"]["name"] == "cbir-tf-serving")
        assert {p["name"]: p["containerPort"] for p in serving["containers"][0]["ports"]}[
            "grpc"
        ] == parsed.port


README = rendering.DEPLOY / "README.md"
COMMAND = re.compile(r"python -m (gateway|indexer|embedder|trainer) ([a-z-]+)((?: [^`\n|]*)?)")


def test_readme_commands_use_existing_flags_and_paths():
    text = README.read_text()
    commands = COMMAND.findall(text)
    assert len(commands) >= 8
    for package, command, rest in commands:
        sub = _subparser(_parser(package), command)
        for token in rest.split():
            if token.startswith("--"):
                flag = token.split("=", 1)[0]
                assert flag in sub._option_string_actions, (
                    f"README: python -m {package} {command} has no {flag}"
                )
    paths = re.findall(r"-k (deploy/[\w/.-]+)", text) + re.findall(
        r"`((?:base|overlays|components|docker)/[\w/.-]+)`", text
    )
    assert len(paths) >= 10
    for path in paths:
        full = rendering.REPO / path if path.startswith("deploy/") else rendering.DEPLOY / path
        assert full.exists(), f"README mentions {path}, which does not exist"


# tensorflow_model_server flags that our local model server does not need (GPU, its own health service).
TF_SERVING_ONLY_FLAGS = {"--per_process_gpu_memory_fraction", "--enable_grpc_healthcheck_service"}


def test_tf_serving_flags_are_the_ones_the_local_model_server_mirrors(stacks):
    """`python -m embedder serve` keeps tensorflow_model_server's flag names, so its parser catches a
    misspelt TF Serving flag (TF Serving itself would refuse to start)."""
    mirrored = set(_subparser(_parser("embedder"), "serve")._option_string_actions)
    for key, objects in stacks.items():
        serving = next(spec for w, spec in pod_specs(objects) if w["metadata"]["name"] == "cbir-tf-serving")
        c = serving["containers"][0]
        if c.get("command") != ["tensorflow_model_server"]:
            continue
        for arg in c["args"]:
            flag = arg.split("=", 1)[0]
            assert flag in mirrored | TF_SERVING_ONLY_FLAGS, (
                f"{rendering.combination_id(*key)}: unknown {flag}"
            )
