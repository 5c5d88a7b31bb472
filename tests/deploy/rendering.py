"""Renders the kustomizations under deploy/ (kubectl's built-in kustomize or a standalone kustomize)."""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
STACK_OVERLAYS = ("gpu", "cpu")
JOB_KUSTOMIZATIONS = ("train", "reindex")
COMPONENTS = tuple(sorted(p.name for p in (DEPLOY / "components").iterdir() if p.is_dir()))
# Components that only make sense with the stack (they change TF Serving, which the Jobs do not have).
STACK_ONLY_COMPONENTS = ("local-model-server",)
LOCAL_MODEL_SERVER = "local-model-server"

# Features the manifests rely on: native grpc probes (1.27) and the StatefulSet pod-index label (1.28).
MIN_KUBERNETES = "1.28"


class RendererMissing(RuntimeError):
    pass


@functools.cache
def kustomize_command() -> tuple[str, ...]:
    """kustomize, or kubectl's built-in copy (the machine image ships kubectl with kustomize v5)."""
    if shutil.which("kustomize"):
        return ("kustomize", "build")
    if shutil.which("kubectl"):
        return ("kubectl", "kustomize")
    raise RendererMissing(
        "neither `kustomize` nor `kubectl` is on PATH: install kubectl (it includes kustomize v5), "
        "e.g. `apt-get install kubectl` from Kubernetes' apt repository"
    )


def overlay_paths() -> list[str]:
    """Every top-level kustomization a user applies: the stack and the two Jobs of each overlay."""
    paths = []
    for overlay in STACK_OVERLAYS:
        paths.append(f"overlays/{overlay}")
        paths.extend(f"overlays/{overlay}/{job}" for job in JOB_KUSTOMIZATIONS)
    return paths


def combinations() -> Iterator[tuple[str, tuple[str, ...]]]:
    """(overlay path relative to deploy/, components): every overlay with every subset of components."""
    for path in overlay_paths():
        usable = [c for c in COMPONENTS if is_stack(path) or c not in STACK_ONLY_COMPONENTS]
        for size in range(len(usable) + 1):
            for chosen in itertools.combinations(usable, size):
                yield path, chosen


def is_stack(path: str) -> bool:
    """overlays/<name> is the stack; overlays/<name>/<job> a Job kustomization."""
    return path.count("/") == 1


def combination_id(path: str, components: tuple[str, ...]) -> str:
    return "+".join((path.removeprefix("overlays/"), *components))


@functools.cache
def render(path: str, components: tuple[str, ...] = ()) -> tuple[dict, ...]:
    """The objects of deploy/<path> with ``components`` added, as a user's own kustomization would."""
    target = DEPLOY / path
    with tempfile.TemporaryDirectory(prefix="cbir-deploy-") as tmp:
        if components:
            # kustomize wants relative paths to other kustomizations.
            rel = lambda p: os.path.relpath(p, tmp)  # noqa: E731
            (Path(tmp) / "kustomization.yaml").write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "kustomize.config.k8s.io/v1beta1",
                        "kind": "Kustomization",
                        "resources": [rel(target)],
                        "components": [rel(DEPLOY / "components" / c) for c in components],
                    }
                )
            )
            target = Path(tmp)
        proc = subprocess.run([*kustomize_command(), str(target)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"rendering {combination_id(path, components)} failed:\n{proc.stderr}")
    # libyaml's loader: the pure-Python one would dominate the test time.
    return tuple(doc for doc in yaml.load_all(proc.stdout, Loader=yaml.CSafeLoader) if doc)


def find(objects, kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_template(workload: dict) -> dict:
    """The pod template (metadata and spec) of a workload; a CronJob's is inside its Job template."""
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]
    return workload["spec"]["template"]


def pod_specs(objects) -> Iterator[tuple[dict, dict]]:
    """(workload, pod spec) for every object that runs pods."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet", "CronJob"):
            yield obj, pod_template(obj)["spec"]


def containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]
