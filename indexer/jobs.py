"""Parallel reindexing as Kubernetes Indexed Jobs, started by the rollout controller through the Kubernetes API.

A Job is made from a suspended CronJob that is only its template (deploy/base/rollout/cronjob.yaml),
exactly as ``kubectl create job NAME --from=cronjob/TEMPLATE`` does, with the version's arguments added
to its container: ``--model-version``, ``--generation`` and ``--no-activate``. The name is
``<template>-v<version>``, so a restarted controller finds the Job it started instead of starting
another one. Plain HTTPS with the pod's service-account token: the controller needs four calls (get
a CronJob; create, get and delete a Job), not a client library.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbir.errors import AlreadyExists, CbirError, FailedPrecondition, InvalidInput, NotFound, NotReady

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
VERSION_LABEL = "cbir.io/model-version"


@dataclass(frozen=True)
class KubernetesAPI:
    """Where the API server is and how to authenticate (the pod's own service account by default)."""

    url: str = ""
    token_file: str = str(SERVICE_ACCOUNT / "token")
    ca_file: str = str(SERVICE_ACCOUNT / "ca.crt")
    namespace: str = ""

    def resolved(self) -> KubernetesAPI:
        """Fills the URL and the namespace in from the pod's environment when they are not given."""
        url = self.url
        if not url:
            host, port = (
                os.environ.get("KUBERNETES_SERVICE_HOST"),
                os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
            )
            if not host:
                raise InvalidInput(
                    "--reindex-job needs the Kubernetes API: not running in a pod (no KUBERNETES_SERVICE_HOST); "
                    "pass --kubernetes-api"
                )
            url = f"https://{host}:{port}"
        namespace = self.namespace
        if not namespace:
            try:
                namespace = (SERVICE_ACCOUNT / "namespace").read_text().strip()
            except OSError as exc:
                raise InvalidInput(
                    f"--kubernetes-namespace is required ({exc.strerror} reading the pod's)"
                ) from None
        return KubernetesAPI(url.rstrip("/"), self.token_file, self.ca_file, namespace)


class ReindexJobs:
    """Creates, reads and deletes the reindex Jobs of one template in one namespace."""

    def __init__(self, api: KubernetesAPI, template: str, *, timeout: float = 30.0):
        self.api = api.resolved()
        self.template = template
        self.timeout = timeout
        self._tls = None
        if self.api.url.startswith("https://"):
            self._tls = ssl.create_default_context(
                cafile=self.api.ca_file if Path(self.api.ca_file).exists() else None
            )

    def name(self, version: int) -> str:
        return f"{self.template}-v{version}"

    def start(self, version: int, generation: str) -> str:
        """Creates the Job of ``version`` (a no-op if it exists); returns its name."""
        template = self._call("GET", f"cronjobs/{self.template}")
        spec = copy.deepcopy(template["spec"]["jobTemplate"])
        metadata = spec.get("metadata", {})
        labels = {**metadata.get("labels", {}), VERSION_LABEL: str(version)}
        job_spec = spec["spec"]
        container = job_spec["template"]["spec"]["containers"][0]
        container["args"] = [
            *container.get("args", []),
            f"--model-version={version}",
            f"--generation={generation}",
            "--no-activate",
        ]
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": self.name(version),
                "labels": labels,
                "annotations": {
                    **metadata.get("annotations", {}),
                    "cronjob.kubernetes.io/instantiate": "manual",
                },
            },
            "spec": job_spec,
        }
        try:
            self._call("POST", "jobs", job)
            log.info(
                "reindex job created",
                extra={"job": self.name(version), "model_version": version, "generation": generation},
            )
        except AlreadyExists:
            pass
        return self.name(version)

    def state(self, name: str) -> str:
        """ "missing", "running", "succeeded" or "failed" (the Job's Complete / Failed condition)."""
        try:
            job = self._call("GET", f"jobs/{name}")
        except NotFound:
            return "missing"
        if job.get("metadata", {}).get("deletionTimestamp"):
            return "running"  # still going away; it cannot be created again yet
        for condition in job.get("status", {}).get("conditions", []):
            if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
                return "succeeded" if condition["type"] == "Complete" else "failed"
        return "running"

    def delete(self, name: str) -> None:
        """Deletes a Job and (in the background) its pods."""
        try:
            self._call("DELETE", f"jobs/{name}", {"propagationPolicy": "Background"})
        except NotFound:
            pass

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.api.url}/apis/batch/v1/namespaces/{self.api.namespace}/{path}"
        try:
            # Read on every call: a projected token is rotated by the kubelet.
            token = Path(self.api.token_file).read_text().strip()
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot read the service-account token {self.api.token_file}: {exc.strerror}"
            ) from None
        request = urllib.request.Request(
            url,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._tls) as answer:
                decoded: dict[str, Any] = json.loads(answer.read() or b"{}")
                return decoded
        except urllib.error.HTTPError as exc:
            detail = _message(exc)
            what = f"Kubernetes API {method} {path}: HTTP {exc.code}: {detail}"
            if exc.code == 404:
                raise NotFound(what) from None
            if exc.code == 409:
                raise AlreadyExists(what) from None
            if exc.code in (401, 403):
                raise FailedPrecondition(
                    f"{what} (check the rollout controller's Role and RoleBinding)"
                ) from None
            if exc.code == 422:
                raise InvalidInput(what) from None
            if exc.code in (429, 500, 502, 503, 504):
                raise NotReady(what) from None
            raise CbirError(what) from None
        except (urllib.error.URLError, OSError) as exc:
            raise NotReady(f"Kubernetes API {self.api.url} is unreachable: {exc}") from None


def _message(exc: urllib.error.HTTPError) -> str:
    try:
        message: str = json.loads(exc.read()).get("message", "")
        return message
    except (ValueError, OSError):
        return exc.reason or ""
