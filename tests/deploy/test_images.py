"""Container images: Dockerfiles are multi-stage, pinned and non-root, copy what exists, and agree with
the overlays; `make images` fails clearly without an engine; the TLS exec probe works."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cbir.processes import free_port
from tests.deploy.rendering import DEPLOY, REPO

DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
HEALTH_CHECK = DEPLOY / "docker" / "health_check.py"


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _base_images(path: Path) -> list[str]:
    steps = _instructions(path)
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    images = []
    for op, rest in steps:
        if op == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image))
    return images


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_pinned_and_non_root(dockerfile):
    steps = _instructions(dockerfile)
    bases = _base_images(dockerfile)
    assert len(bases) >= 2, "multi-stage: build tools stay out of the runtime image"
    for image in bases:
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and re.fullmatch(r"\d+\.\d+\.\d+[\w.-]*", tag), f"{image}: pin an exact version"
    users = [rest for op, rest in steps if op == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), (
        "the last USER must be a numeric non-root uid:gid"
    )
    # Sources copied from the build context exist (the context is the repository root).
    for op, rest in steps:
        if op == "COPY" and "--from" not in rest:
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
    # The manifests pass `-m <package> <command> ...` as args, without a command of their own.
    entrypoint = [rest for op, rest in steps if op == "ENTRYPOINT"][-1]
    assert re.fullmatch(r'\["/opt/cbir/bin/python"\]', entrypoint), entrypoint
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.exists(), "keep .venv, .git and data out of the build context"


def test_images_run_as_the_uid_the_manifests_use():
    manifests_uids = set()
    for path in (DEPLOY / "base").rglob("*.yaml"):
        manifests_uids |= {int(u) for u in re.findall(r"runAsUser: (\d+)", path.read_text())}
    for dockerfile in DOCKERFILES:
        user = [rest for op, rest in _instructions(dockerfile) if op == "USER"][-1]
        assert {int(user.split(":")[0])} == manifests_uids, dockerfile.name


def test_trainer_image_is_tensorflows_gpu_image_of_the_pinned_version():
    pinned = re.search(r'"tensorflow==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    bases = _base_images(DEPLOY / "docker" / "trainer.Dockerfile")
    assert bases[-1] == f"tensorflow/tensorflow:{pinned}-gpu"
    assert bases[0].startswith("tensorflow/tensorflow:") and bases[0].split(":")[1].startswith(pinned)
    serving = yaml.safe_load((DEPLOY / "base/tf-serving/deployment.yaml").read_text())
    assert serving["spec"]["template"]["spec"]["containers"][0]["image"] == f"tensorflow/serving:{pinned}-gpu"


def test_overlays_use_the_image_names_make_images_builds():
    makefile = (REPO / "Makefile").read_text()
    registry = re.search(r"^IMAGE_REGISTRY \?= (\S+)", makefile, re.M).group(1)
    tag = re.search(r"^IMAGE_TAG \?= (\S+)", makefile, re.M).group(1)
    for overlay, flavour in (("gpu", "gpu"), ("cpu", "cpu")):
        release = yaml.safe_load((DEPLOY / f"overlays/{overlay}/release/kustomization.yaml").read_text())
        images = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in release["images"]}
        assert images["cbir-services"] == f"{registry}/services:{tag}"
        assert images["cbir-trainer"] == f"{registry}/trainer:{tag}-{flavour}"


def test_make_images_without_an_engine_fails_with_a_clear_message():
    proc = subprocess.run(
        ["make", "--no-print-directory", "images", "CONTAINER_ENGINE="],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "needs a container engine" in proc.stderr and "docker or podman" in proc.stderr


# --------------------------------------------------------------------------- TLS exec probe


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield servicer, port
    server.stop(None)


def _probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HEALTH_CHECK), *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.slow
def test_health_check_follows_the_servers_status(health_server):
    servicer, port = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    proc = _probe(f"--port={port}")
    assert proc.returncode == 1 and "NOT_SERVING" in proc.stderr
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    proc = _probe(f"--port={port}")
    assert proc.returncode == 0 and "SERVING" in proc.stdout


@pytest.mark.slow
def test_health_check_fails_when_nothing_listens():
    proc = _probe(f"--port={free_port()}", "--timeout=1")
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr


@pytest.mark.slow
def test_health_check_reports_a_missing_certificate_file(tmp_path):
    proc = _probe("--port=1", f"--tls-ca={tmp_path / 'missing.crt'}")
    assert proc.returncode == 2 and "cannot read a TLS file" in proc.stderr
    proc = _probe("--port=1", "--tls-ca=x", "--tls-cert=y")
    assert proc.returncode == 2 and "go together" in proc.stderr


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA and a server certificate for the names the tls component uses (cbir-indexer, *.cbir-indexer)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=cbir-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=d,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=cbir-indexer",
        "-keyout",
        "tls.key",
        "-out",
        "tls.csr",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:cbir-indexer,DNS:*.cbir-indexer\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "tls.crt",
        cwd=d,
    )
    return d


@pytest.mark.slow
def test_health_check_speaks_tls_with_the_certificates_name(certificates):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = free_port()
    credentials = grpc.ssl_server_credentials(
        [((certificates / "tls.key").read_bytes(), (certificates / "tls.crt").read_bytes())]
    )
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    try:
        ca = f"--tls-ca={certificates / 'ca.crt'}"
        proc = _probe(f"--port={port}", ca, "--server-name=cbir-indexer")
        assert proc.returncode == 0, proc.stderr
        # The pod probes itself on 127.0.0.1, which is not in the certificate: hence --server-name.
        proc = _probe(f"--port={port}", ca, "--timeout=2")
        assert proc.returncode == 1
        # A plaintext probe (the kubelet's grpc probe) cannot talk to a TLS port.
        assert _probe(f"--port={port}", "--timeout=2").returncode == 1
    finally:
        server.stop(None)


def test_tls_exec_probes_run_the_health_check_the_services_image_installs(rendered):
    copies = [
        rest.split()
        for op, rest in _instructions(DEPLOY / "docker" / "services.Dockerfile")
        if op == "COPY" and "health_check.py" in rest
    ]
    assert len(copies) == 1
    installed = copies[0][-1]
    commands = set()
    for objects in rendered.values():
        for obj in objects:
            if obj["kind"] in ("Deployment", "StatefulSet"):
                for c in obj["spec"]["template"]["spec"]["containers"]:
                    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                        if "exec" in c.get(probe, {}):
                            commands.add(c[probe]["exec"]["command"][0])
    assert commands == {installed}
