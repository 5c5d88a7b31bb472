"""Every overlay x component combination renders, validates against Kubernetes' schemas, and follows
the deployment policy (security, resources, probes, GPU, topology, TF Serving configuration)."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from unittest import mock

import kubernetes_validate
import pytest
import yaml

from cbir import defaults
from tests.deploy import rendering
from tests.deploy.rendering import DEPLOY, containers, find, pod_specs, pod_template

VALIDATE_VERSIONS = (rendering.MIN_KUBERNETES, kubernetes_validate.utils.latest_version())


def _env_value(container: dict, name: str) -> str | None:
    for env in container.get("env", []):
        if env["name"] == name:
            return env.get("value")
    return None


def _arg(container: dict, flag: str) -> str | None:
    """Value of ``--flag=value`` among the container's command and args."""
    for arg in [*container.get("command", []), *container.get("args", [])]:
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _topology(objects) -> dict[str, str]:
    return find(objects, "ConfigMap", "cbir-topology")["data"]


def _container(objects, kind: str, name: str, container: str) -> dict:
    spec = find(objects, kind, name)["spec"]["template"]["spec"]
    return next(c for c in containers(spec) if c["name"] == container)


# --------------------------------------------------------------------------- render + schema


def test_every_combination_renders(rendered):
    stack_combos = 2 ** len(rendering.COMPONENTS)
    job_combos = 2 ** (len(rendering.COMPONENTS) - len(rendering.STACK_ONLY_COMPONENTS))
    overlays = len(rendering.STACK_OVERLAYS)
    assert len(rendered) == overlays * (stack_combos + len(rendering.JOB_KUSTOMIZATIONS) * job_combos)
    for key, objects in rendered.items():
        assert objects, f"{rendering.combination_id(*key)} rendered nothing"


def test_every_object_validates_against_kubernetes_schemas(rendered):
    unique = {json.dumps(obj, sort_keys=True): obj for objects in rendered.values() for obj in objects}
    for example in sorted(DEPLOY.glob("**/*.example.yaml")):
        for obj in yaml.safe_load_all(example.read_text()):
            unique[json.dumps(obj, sort_keys=True)] = obj
    failures = []
    # The library re-reads a 2 MB definitions file for every object; read each schema file once.
    cached = functools.cache(kubernetes_validate.utils.schema_contents)
    with mock.patch.object(kubernetes_validate.utils, "schema_contents", cached):
        for obj in unique.values():
            failures.extend(_validation_errors(obj))
    assert not failures, "\n".join(failures)


def _validation_errors(obj: dict) -> list[str]:
    failures = []
    for version in VALIDATE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(
                f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}): {exc.message} at "
                f"{'.'.join(map(str, exc.path))}"
            )
    return failures


def test_every_object_of_an_overlay_is_namespaced_and_labelled(rendered):
    for (path, components), objects in rendered.items():
        overlay = path.split("/")[1]
        for obj in objects:
            meta = obj["metadata"]
            where = f"{rendering.combination_id(path, components)}: {obj['kind']}/{meta['name']}"
            if obj["kind"] == "Namespace":
                assert meta["name"] == "cbir"
                assert meta["labels"]["pod-security.kubernetes.io/enforce"] == "restricted", where
                continue
            assert meta.get("namespace") == "cbir", where
            assert meta["labels"]["app.kubernetes.io/part-of"] == "cbir", where
            assert meta["labels"]["app.kubernetes.io/instance"] == f"cbir-{overlay}", where


# --------------------------------------------------------------------------- layout rules (STYLE 15)


def test_base_has_one_kind_per_file():
    for path in sorted((DEPLOY / "base").rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        kinds = {doc["kind"] for doc in yaml.safe_load_all(path.read_text()) if doc}
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        assert len(docs) == 1 and len(kinds) == 1, f"{path.relative_to(DEPLOY)} holds {len(docs)} objects"
        expected = docs[0]["kind"].lower()
        assert path.stem.startswith(expected), f"{path.name} holds a {docs[0]['kind']}"


# What an overlay may change: namespace, labels, images and sizes (resources, replicas).
OVERLAY_KEYS = {"apiVersion", "kind", "resources", "components", "namespace", "labels", "images", "patches"}
SIZE_PATHS = re.compile(r"^/spec/(replicas|template/spec/(init)?[cC]ontainers/\d+/resources)$")


def test_overlays_change_only_namespace_labels_images_and_sizes():
    for kustomization in sorted((DEPLOY / "overlays").rglob("kustomization.yaml")):
        data = yaml.safe_load(kustomization.read_text())
        extra = set(data) - OVERLAY_KEYS
        assert not extra, f"{kustomization.relative_to(DEPLOY)} changes {sorted(extra)}"
        for resource in data.get("resources", []):
            target = kustomization.parent / resource
            assert target.is_dir() or yaml.safe_load(target.read_text())["kind"] == "Namespace", resource
        for patch in data.get("patches", []):
            ops = yaml.safe_load((kustomization.parent / patch["path"]).read_text())
            assert isinstance(ops, list), f"{patch['path']}: use JSON6902 operations on sizes only"
            for op in ops:
                assert SIZE_PATHS.match(op["path"]), f"{patch['path']} changes {op['path']}, not a size"


# --------------------------------------------------------------------------- every container


def test_every_container_is_locked_down_and_sized(rendered):
    for key, objects in rendered.items():
        for workload, spec in pod_specs(objects):
            pod_ctx = spec.get("securityContext", {})
            assert spec.get("automountServiceAccountToken") is False, workload["metadata"]["name"]
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            if any("secret" in v for v in volumes.values()):
                # Secret files are not world-readable: the non-root user reads them through fsGroup.
                assert pod_ctx.get("fsGroup") == pod_ctx.get("runAsGroup"), workload["metadata"]["name"]
            for c in containers(spec):
                where = f"{rendering.combination_id(*key)}: {workload['metadata']['name']}/{c['name']}"
                ctx = c.get("securityContext", {})
                assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
                assert ctx.get("runAsUser", pod_ctx.get("runAsUser", 0)) != 0, where
                assert ctx.get("readOnlyRootFilesystem") is True, where
                assert ctx.get("allowPrivilegeEscalation") is False, where
                assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
                assert not ctx.get("capabilities", {}).get("add"), where
                seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
                assert seccomp.get("type") == "RuntimeDefault", where
                for bound in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c.get("resources", {}).get(bound, {})), (
                        f"{where}: {bound}"
                    )
                # A read-only root needs somewhere to write temporary files.
                tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: no emptyDir at /tmp"
                for mount in c.get("volumeMounts", []):
                    assert "subPath" not in mount, f"{where}: subPath mounts never see updates"
                for port in c.get("ports", []):
                    assert port.get("name"), f"{where}: unnamed port {port['containerPort']}"


def test_every_long_running_container_has_probes(rendered):
    for key, objects in rendered.items():
        for workload, spec in pod_specs(objects):
            if workload["kind"] in ("Job", "CronJob"):
                continue
            for c in spec["containers"]:
                where = f"{rendering.combination_id(*key)}: {workload['metadata']['name']}/{c['name']}"
                assert "readinessProbe" in c and "livenessProbe" in c, where


def test_images_are_pinned(rendered):
    for _key, objects in rendered.items():
        for workload, spec in pod_specs(objects):
            for c in containers(spec):
                image = c["image"]
                name, _, tag = image.rpartition(":")
                assert name and tag and tag != "latest" and "/" not in tag, (
                    f"{workload['metadata']['name']}: {image}"
                )


# --------------------------------------------------------------------------- GPU


def _gpu(container: dict, bound: str) -> str | None:
    return container["resources"].get(bound, {}).get("nvidia.com/gpu")


def test_gpu_overlay_puts_serving_and_training_on_a_gpu(rendered):
    for (path, components), objects in rendered.items():
        if not path.startswith("overlays/gpu"):
            continue
        for workload, spec in pod_specs(objects):
            name = workload["metadata"]["name"]
            if name == "cbir-tf-serving" and rendering.LOCAL_MODEL_SERVER in components:
                # Our model server is CPU only: it must not hold a GPU it cannot use.
                c = spec["containers"][0]
                assert _gpu(c, "limits") is None and "cbir/services" in c["image"], path
                continue
            if name == "cbir-tf-serving":
                c = spec["containers"][0]
                assert _gpu(c, "limits") == "1" and c["image"] == "tensorflow/serving:2.21.0-gpu", path
            if name == "cbir-train":
                assert _gpu(spec["initContainers"][0], "limits") == "1", path
            if name in ("cbir-tf-serving", "cbir-train"):
                assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]), name


def test_cpu_overlay_asks_for_no_gpu(rendered):
    for (path, _components), objects in rendered.items():
        if not path.startswith("overlays/cpu"):
            continue
        for workload, spec in pod_specs(objects):
            for c in containers(spec):
                assert _gpu(c, "limits") is None and _gpu(c, "requests") is None, workload["metadata"]["name"]
                assert "-gpu" not in c["image"], c["image"]


# --------------------------------------------------------------------------- topology and ports


def test_shard_topology_agrees_with_the_statefulset(stacks):
    for key, objects in stacks.items():
        topology = _topology(objects)
        replicas = find(objects, "StatefulSet", "cbir-indexer")["spec"]["replicas"]
        targets = topology["INDEXER_TARGETS"].split(",")
        assert int(topology["INDEXER_SHARD_COUNT"]) == replicas == len(targets), rendering.combination_id(
            *key
        )
        expected_count = 4 if "shards-4" in key[1] else 2
        assert replicas == expected_count
        for shard, target in enumerate(targets):
            # Shard i is the StatefulSet's pod i, reached through the headless governing Service.
            assert target == f"cbir-indexer-{shard}.cbir-indexer:{defaults.INDEXER_PORT}"
        statefulset = find(objects, "StatefulSet", "cbir-indexer")
        if "shards-4" in key[1]:
            # Shards and gateway read the topology at start-up: both templates change, so both roll.
            for workload in (statefulset, find(objects, "Deployment", "cbir-gateway")):
                assert (
                    workload["spec"]["template"]["metadata"]["annotations"]["cbir.io/indexer-shards"] == "4"
                )
        service = find(objects, "Service", "cbir-indexer")
        assert statefulset["spec"]["serviceName"] == "cbir-indexer" and service["spec"]["clusterIP"] == "None"
        indexer = statefulset["spec"]["template"]["spec"]["containers"][0]
        pod_index = next(e for e in indexer["env"] if e["name"] == "POD_INDEX")
        assert (
            pod_index["valueFrom"]["fieldRef"]["fieldPath"]
            == "metadata.labels['apps.kubernetes.io/pod-index']"
        )
        assert _arg(indexer, "--shard-id") == "$(POD_INDEX)"
        assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
            m["name"] for m in indexer["volumeMounts"]
        }


def test_clients_reach_serving_round_robin_through_a_headless_service(stacks):
    for _key, objects in stacks.items():
        target = _topology(objects)["SERVING_TARGET"]
        match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", target)
        assert match, target
        service = find(objects, "Service", match.group(1))
        assert service["spec"]["clusterIP"] == "None"
        assert int(match.group(2)) == defaults.SERVING_GRPC_PORT
        assert {p["port"] for p in service["spec"]["ports"]} == {
            defaults.SERVING_GRPC_PORT,
            defaults.SERVING_REST_PORT,
        }
        gateway = _container(objects, "Deployment", "cbir-gateway", "gateway")
        assert _arg(gateway, "--serving") == "$(SERVING_TARGET)"
        assert _arg(gateway, "--indexer") == "$(INDEXER_TARGETS)"
        assert {"configMapRef": {"name": "cbir-topology"}} in gateway["envFrom"]


SERVICE_PORTS = {
    "cbir-gateway": (defaults.GATEWAY_PORT, defaults.GATEWAY_METRICS_PORT),
    "cbir-indexer": (defaults.INDEXER_PORT, defaults.INDEXER_METRICS_PORT),
    "cbir-rollout": (defaults.ROLLOUT_PORT, defaults.ROLLOUT_METRICS_PORT),
}
# Ports besides grpc and metrics.
EXTRA_PORTS = {"cbir-gateway": {"http": defaults.GATEWAY_HTTP_PORT}, "cbir-indexer": {}, "cbir-rollout": {}}


def test_ports_are_the_services_defaults(stacks):
    for _key, objects in stacks.items():
        for workload, spec in pod_specs(objects):
            name = workload["metadata"]["name"]
            c = spec["containers"][0]
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            if name in SERVICE_PORTS:
                grpc_port, metrics_port = SERVICE_PORTS[name]
                assert ports == {"grpc": grpc_port, "metrics": metrics_port, **EXTRA_PORTS[name]}, name
                assert int(_arg(c, "--port")) == grpc_port and int(_arg(c, "--metrics-port")) == metrics_port
                if "http" in ports:
                    assert int(_arg(c, "--http-port")) == ports["http"]
                annotations = workload["spec"]["template"]["metadata"]["annotations"]
                assert int(annotations["prometheus.io/port"]) == metrics_port
            elif name == "cbir-tf-serving":
                assert ports == {"grpc": defaults.SERVING_GRPC_PORT, "http": defaults.SERVING_REST_PORT}
                assert int(_arg(c, "--port")) == defaults.SERVING_GRPC_PORT
                assert int(_arg(c, "--rest_api_port")) == defaults.SERVING_REST_PORT
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                grpc_probe = c.get(probe, {}).get("grpc")
                if grpc_probe:
                    assert grpc_probe["port"] == ports["grpc"], f"{name} {probe}"
                exec_probe = c.get(probe, {}).get("exec")
                if exec_probe:
                    assert f"--port={ports['grpc']}" in exec_probe["command"], f"{name} {probe}"
        for service in (o for o in objects if o["kind"] == "Service"):
            pods = [
                spec
                for w, spec in pod_specs(objects)
                if pod_template(w)["metadata"]["labels"].items() >= service["spec"]["selector"].items()
            ]
            assert len(pods) == 1, service["metadata"]["name"]
            named = {p["name"]: p["containerPort"] for p in pods[0]["containers"][0]["ports"]}
            for port in service["spec"]["ports"]:
                assert named[port["targetPort"]] == port["port"], f"{service['metadata']['name']} {port}"


def test_gateway_http_port_is_served_probed_and_reads_the_catalogue_read_only(stacks):
    for (path, components), objects in stacks.items():
        where = rendering.combination_id(path, components)
        gateway = _container(objects, "Deployment", "cbir-gateway", "gateway")
        probe = gateway["livenessProbe"]["httpGet"]
        assert probe["path"] == "/healthz" and probe["port"] == "http", where
        # With TLS the HTTP port speaks HTTPS (the gRPC port's certificate).
        assert probe.get("scheme", "HTTP") == ("HTTPS" if "tls" in components else "HTTP"), where
        service = find(objects, "Service", "cbir-gateway")
        http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
        assert (http["port"], http["targetPort"]) == (defaults.GATEWAY_HTTP_PORT, "http"), where
        root = _arg(gateway, "--catalogue-root")
        mount = next(m for m in gateway["volumeMounts"] if m["mountPath"] == root)
        assert mount["readOnly"] is True, where
        volumes = find(objects, "Deployment", "cbir-gateway")["spec"]["template"]["spec"]["volumes"]
        claim = next(v for v in volumes if v["name"] == mount["name"])["persistentVolumeClaim"]
        assert claim == {"claimName": "cbir-data", "readOnly": True}, where


def test_indexer_accepts_only_the_gateway_the_reindex_job_and_the_rollout_controller(rendered):
    for (path, components), objects in rendered.items():
        if not rendering.is_stack(path):
            continue
        job_components = tuple(c for c in components if c not in rendering.STACK_ONLY_COMPONENTS)
        policy = find(objects, "NetworkPolicy", "cbir-indexer")
        statefulset = find(objects, "StatefulSet", "cbir-indexer")
        assert (
            policy["spec"]["podSelector"]["matchLabels"].items()
            <= statefulset["spec"]["template"]["metadata"]["labels"].items()
        )
        grpc_rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "grpc")
        allowed = [peer["podSelector"]["matchLabels"] for peer in grpc_rule["from"]]
        reindex = rendering.render(path + "/reindex", job_components)
        parallel = find(objects, "CronJob", "cbir-reindex-parallel")["spec"]["jobTemplate"]
        clients = [
            find(objects, "Deployment", "cbir-gateway"),
            find(objects, "Deployment", "cbir-rollout"),
            find(reindex, "Job", "cbir-reindex"),
            parallel,
        ]
        for client in clients:
            labels = client["spec"]["template"]["metadata"]["labels"]
            assert any(sel.items() <= labels.items() for sel in allowed), labels
        train = find(rendering.render(path + "/train", job_components), "Job", "cbir-train")
        assert not any(
            sel.items() <= train["spec"]["template"]["metadata"]["labels"].items() for sel in allowed
        )
        # Metrics only: everything else from outside is refused.
        other = [r for r in policy["spec"]["ingress"] if r is not grpc_rule]
        assert all(p["port"] == "metrics" for r in other for p in r["ports"])


def test_disruption_budgets_and_autoscaling(stacks):
    for _key, objects in stacks.items():
        for name in ("cbir-gateway", "cbir-indexer", "cbir-tf-serving"):
            budget = find(objects, "PodDisruptionBudget", name)
            assert budget["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        hpa = find(objects, "HorizontalPodAutoscaler", "cbir-gateway")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "cbir-gateway",
        }
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        # The HPA owns the replica count; a fixed one would be reset on every apply.
        assert "replicas" not in find(objects, "Deployment", "cbir-gateway")["spec"]


# --------------------------------------------------------------------------- TF Serving


def _tf_serving(objects) -> tuple[dict, dict]:
    deployment = find(objects, "Deployment", "cbir-tf-serving")
    return deployment, deployment["spec"]["template"]["spec"]


def _mounted_file(objects, spec: dict, container: dict, path: str) -> str:
    """Content of the ConfigMap key mounted at ``path`` (a whole-ConfigMap directory mount)."""
    directory, _, key = path.rpartition("/")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == directory)
    assert "subPath" not in mount
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    return find(objects, "ConfigMap", volume["configMap"]["name"])["data"][key]


def test_tf_serving_model_config_parses_with_the_model_servers_parser(stacks):
    from embedder.model_config import model_entries, parse_batching_parameters, parse_model_server_config

    for key, objects in stacks.items():
        deployment, spec = _tf_serving(objects)
        c = spec["containers"][0]
        entries = model_entries(
            parse_model_server_config(_mounted_file(objects, spec, c, _arg(c, "--model_config_file")))
        )
        model_name = _topology(objects)["MODEL_NAME"]
        assert [e.name for e in entries] == [model_name]
        entry = entries[0]
        # Two versions stay loaded while the reindex Job builds the new generation.
        assert entry.policy.kind == "latest" and entry.policy.num_versions >= 2
        models_mount = next(m for m in c["volumeMounts"] if m["name"] == "models")
        assert entry.base_path == f"{models_mount['mountPath']}/{model_name}"
        assert int(_arg(c, "--model_config_file_poll_wait_seconds")) > 0
        assert c["readinessProbe"]["httpGet"]["path"] == f"/v1/models/{model_name}/metadata"
        assert c["readinessProbe"]["httpGet"]["port"] == "http"

        batching = parse_batching_parameters(
            _mounted_file(objects, spec, c, _arg(c, "--batching_parameters_file"))
        )
        assert _arg(c, "--enable_batching") == "true"
        assert batching.allowed_batch_sizes[-1] == batching.max_batch_size
        assert list(batching.allowed_batch_sizes) == sorted(batching.allowed_batch_sizes)

        monitoring = _mounted_file(objects, spec, c, _arg(c, "--monitoring_config_file"))
        path = re.search(r'path:\s*"([^"]+)"', monitoring).group(1)
        assert re.search(r"enable:\s*true", monitoring)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/path"] == path
        assert int(annotations["prometheus.io/port"]) == defaults.SERVING_REST_PORT

        # The model config must be re-read in place: mounted as a directory from a fixed-name ConfigMap.
        models_volume = next(v for v in spec["volumes"] if v["name"] == "model-config")
        assert models_volume["configMap"]["name"] == "cbir-tf-serving-models"
        if rendering.LOCAL_MODEL_SERVER in key[1]:
            # Same flags, read by `python -m embedder serve` (checked against its parser in test_flags).
            assert c["args"][:3] == ["-m", "embedder", "serve"] and "command" not in c
        else:
            # GPU memory: capped per process and grown on demand.
            assert 0 < float(_arg(c, "--per_process_gpu_memory_fraction")) < 1
            assert _env_value(c, "TF_FORCE_GPU_ALLOW_GROWTH") == "true"
            assert c["command"] == ["tensorflow_model_server"]
        claim = next(v for v in spec["volumes"] if v["name"] == "models")["persistentVolumeClaim"][
            "claimName"
        ]
        assert find(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]


def test_pinned_model_config_example_parses_and_labels_loaded_versions():
    from embedder.model_config import model_entries, parse_model_server_config

    text = (DEPLOY / "base/tf-serving/examples/models.pinned.config").read_text()
    (entry,) = model_entries(parse_model_server_config(text))
    assert entry.policy.kind == "specific" and len(entry.policy.versions) == 2
    assert set(entry.labels.values()) <= set(entry.policy.versions)
    assert set(entry.labels) == {"stable", "canary"}


# --------------------------------------------------------------------------- Jobs


def test_training_job_exports_into_the_models_volume_that_serving_reads(rendered):
    for (path, components), objects in rendered.items():
        if not path.endswith("/train"):
            continue
        job = find(objects, "Job", "cbir-train")
        spec = job["spec"]["template"]["spec"]
        assert spec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] <= 2
        export = spec["containers"][0]
        assert export["args"][:3] == ["-m", "trainer", "export"]
        repo_mount = next(m for m in export["volumeMounts"] if m["mountPath"] == _arg(export, "--model-repo"))
        assert not repo_mount.get("readOnly")
        claim = next(v for v in spec["volumes"] if v["name"] == repo_mount["name"])["persistentVolumeClaim"]
        stack = rendering.render(path.rsplit("/", 1)[0], components)
        _, serving = _tf_serving(stack)
        assert (
            claim["claimName"]
            == next(v for v in serving["volumes"] if v["name"] == "models")["persistentVolumeClaim"][
                "claimName"
            ]
        )
        train = spec["initContainers"][0]
        assert train["args"][:3] == ["-m", "trainer", "train"]


def test_rollout_controller_is_one_replica_that_reindexes_through_the_indexed_job_template(stacks):
    for key, objects in stacks.items():
        where = rendering.combination_id(*key)
        deployment = find(objects, "Deployment", "cbir-rollout")
        assert deployment["spec"]["replicas"] == 1, where
        # Never two controllers at once, not even during an update.
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}, where
        spec = deployment["spec"]["template"]["spec"]
        c = _container(objects, "Deployment", "cbir-rollout", "rollout")
        assert c["args"][:3] == ["-m", "indexer", "follow"]
        assert _arg(c, "--indexer") == "$(INDEXER_TARGETS)" and _arg(c, "--eval"), where
        template_name = _env_value(c, "CBIR_ROLLOUT_REINDEX_JOB")
        cronjob = find(objects, "CronJob", template_name)
        assert cronjob["spec"]["suspend"] is True, f"{where}: the template must never run on its own"
        job = cronjob["spec"]["jobTemplate"]["spec"]
        assert job["completionMode"] == "Indexed", where
        worker = job["template"]["spec"]["containers"][0]
        assert worker["args"][:3] == ["-m", "indexer", "reindex"]
        partition = _arg(worker, "--partition")
        index, _, count = partition.partition("/")
        assert index == "$(JOB_COMPLETION_INDEX)" and int(count) == job["completions"], where
        assert 1 <= job["parallelism"] <= job["completions"], where
        index_env = next(e for e in worker["env"] if e["name"] == "JOB_COMPLETION_INDEX")
        assert index_env["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        )
        # Its own service account may read the template and manage Jobs, nothing else.
        binding = find(objects, "RoleBinding", "cbir-rollout")
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": spec["serviceAccountName"],
                "namespace": deployment["metadata"]["namespace"],
            }
        ]
        role = find(objects, "Role", binding["roleRef"]["name"])
        assert {
            (tuple(r["resources"]), tuple(r.get("resourceNames", ())), tuple(r["verbs"]))
            for r in role["rules"]
        } == {
            (("cronjobs",), (template_name,), ("get",)),
            (("jobs",), (), ("create", "get", "delete")),
        }
        # The token reaches the controller container only, at the path in-cluster clients read.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        token = mounts["/var/run/secrets/kubernetes.io/serviceaccount"]
        sources = next(v for v in spec["volumes"] if v["name"] == token)["projected"]["sources"]
        assert any("serviceAccountToken" in source for source in sources)
        for workload, other in pod_specs(objects):
            if workload is deployment:
                continue
            for volume in other.get("volumes", []):
                assert "projected" not in volume, f"{where}: {workload['metadata']['name']}"


def test_every_indexer_client_trusts_the_indexer_ca_with_tls(rendered):
    for (path, components), objects in rendered.items():
        if "tls" not in components:
            continue
        for workload, spec in pod_specs(objects):
            for c in containers(spec):
                if _arg(c, "--indexer") != "$(INDEXER_TARGETS)":
                    continue
                where = f"{rendering.combination_id(path, components)}: {workload['metadata']['name']}"
                ca = _env_value(c, "CBIR_INDEXER_TLS_CA") or _env_value(c, "CBIR_GATEWAY_INDEXER_TLS_CA")
                assert ca, where
                mount = next(m for m in c["volumeMounts"] if ca.startswith(m["mountPath"] + "/"))
                volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
                assert volume["secret"]["secretName"] == "cbir-indexer-tls", where
                assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}], where


def test_reindex_job_activates_a_generation_on_every_shard(rendered):
    for (path, _components), objects in rendered.items():
        if not path.endswith("/reindex"):
            continue
        c = find(objects, "Job", "cbir-reindex")["spec"]["template"]["spec"]["containers"][0]
        assert c["args"][:3] == ["-m", "indexer", "reindex"]
        assert _arg(c, "--indexer") == "$(INDEXER_TARGETS)"
        assert {"configMapRef": {"name": "cbir-topology"}} in c["envFrom"]


# --------------------------------------------------------------------------- secrets


def test_secret_examples_hold_placeholders_only():
    examples = sorted(DEPLOY.glob("**/*.example.yaml"))
    assert examples
    for example in examples:
        for secret in yaml.safe_load_all(example.read_text()):
            assert secret["kind"] == "Secret"
            for value in secret["stringData"].values():
                assert "PLACEHOLDER" in value and "-----BEGIN" not in value, example.name


def test_no_overlay_ships_a_secret(rendered):
    # Secrets are created by the operator; a placeholder must never become a working key or certificate.
    for key, objects in rendered.items():
        assert not [o for o in objects if o["kind"] == "Secret"], rendering.combination_id(*key)
        assert "PLACEHOLDER" not in json.dumps(objects), rendering.combination_id(*key)


def test_components_mount_the_secrets_the_examples_describe(rendered):
    secret_names = {
        s["metadata"]["name"]
        for ex in DEPLOY.glob("**/*.example.yaml")
        for s in yaml.safe_load_all(ex.read_text())
    }
    used = set()
    for objects in rendered.values():
        for _, spec in pod_specs(objects):
            used |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
    assert used == secret_names


def test_every_file_under_deploy_is_used():
    referenced: set[Path] = set()
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        data = yaml.safe_load(kustomization.read_text())
        for item in data.get("resources", []) + data.get("components", []):
            referenced.add((kustomization.parent / item).resolve())
        for patch in data.get("patches", []):
            referenced.add((kustomization.parent / patch["path"]).resolve())
        for generator in data.get("configMapGenerator", []):
            for entry in generator.get("files", []):
                referenced.add((kustomization.parent / entry.split("=", 1)[-1]).resolve())
    for path in DEPLOY.rglob("*"):
        if (
            path.is_file()
            and path.suffix in (".yaml", ".config", ".txt")
            and path.name != "kustomization.yaml"
        ):
            if ".example." in path.name or "examples" in path.parts:
                continue
            assert path.resolve() in referenced, (
                f"{path.relative_to(DEPLOY)} is not used by any kustomization"
            )


@pytest.mark.parametrize("overlay", rendering.STACK_OVERLAYS)
def test_jobs_and_stack_of_an_overlay_agree(overlay):
    stack_images = {
        c["image"] for _, s in pod_specs(rendering.render(f"overlays/{overlay}")) for c in containers(s)
    }
    for job in rendering.JOB_KUSTOMIZATIONS:
        objects = rendering.render(f"overlays/{overlay}/{job}")
        for _, spec in pod_specs(objects):
            for c in containers(spec):
                if "services" in c["image"]:
                    assert c["image"] in stack_images, c["image"]
