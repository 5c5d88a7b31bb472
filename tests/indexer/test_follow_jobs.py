"""`follow --reindex-job`: the controller reindexes through Indexed Jobs made from the deploy/ CronJob template.

A stand-in for the Kubernetes API and Job controller (just enough of both) serves the CronJob rendered
from deploy/overlays/cpu, checks each Job the controller creates against Kubernetes' schema and its
token, and runs the Job's pods as local processes with the pod's own command line: JOB_COMPLETION_INDEX
set per completion index, `$(VAR)`s expanded from the pod's environment, the data volume at /data.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kubernetes_validate
import pytest

from cbir.processes import ServiceProcess, running_service
from cbir.v1 import indexer_pb2
from indexer.client import IndexerClient
from tests.deploy import rendering
from tests.gateway import stack as s
from tests.indexer.test_follow import settled, wait_for
from tests.support.tiny_model import export_tiny_model
from trainer.synthetic import make_image

pytestmark = pytest.mark.slow

TOKEN = "test-token-0123"
VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
N_TRAIN, N_TEST, LABELS = 60, 20, 4


class FakeCluster:
    """The Kubernetes API for one namespace's CronJobs and Jobs, and a Job controller running pods locally."""

    def __init__(self, cronjob: dict, env: dict[str, str], data_dir, log_dir, fail_first: int | None = None):
        self.cronjob, self.env, self.data_dir, self.log_dir = cronjob, env, data_dir, log_dir
        self.fail_first = fail_first  # this completion index fails on its first attempt (the whole run)
        self.jobs: dict[str, dict] = {}
        self.created: list[dict] = []
        self.pods: list[tuple[str, int, int]] = []  # job, index, exit code
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()

    def _handler(self):
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._answer(401, {"message": "Unauthorized"})
                match = re.fullmatch(
                    r"/apis/batch/v1/namespaces/cbir/(cronjobs|jobs)(?:/([\w.-]+))?", self.path
                )
                if not match:
                    return self._answer(404, {"message": f"no route {self.path}"})
                kind, name = match.groups()
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                code, answer = cluster.handle(method, kind, name, body)
                self._answer(code, answer)

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

        return Handler

    def handle(self, method: str, kind: str, name: str | None, body: dict) -> tuple[int, dict]:
        with self.lock:
            if kind == "cronjobs":
                if method == "GET" and name == self.cronjob["metadata"]["name"]:
                    return 200, self.cronjob
                return 404, {"message": f"cronjobs {name!r} not found"}
            if method == "POST":
                job = {**body, "metadata": {**body["metadata"], "namespace": "cbir"}}
                try:
                    kubernetes_validate.validate(job, rendering.MIN_KUBERNETES, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    return 422, {"message": f"invalid Job: {exc.message}"}
                if job["metadata"]["name"] in self.jobs:
                    return 409, {"message": "already exists"}
                job["status"] = {}
                self.jobs[job["metadata"]["name"]] = job
                self.created.append(copy.deepcopy(job))
                threading.Thread(target=self._run, args=(job,), daemon=True).start()
                return 201, job
            job = self.jobs.get(name)
            if job is None:
                return 404, {"message": f"jobs {name!r} not found"}
            if method == "DELETE":
                job["deleted"] = True
                del self.jobs[name]
                return 200, {"status": "Success"}
            return 200, job

    def _run(self, job: dict) -> None:
        """The Job controller: each completion index until it succeeds, `parallelism` at a time."""
        spec = job["spec"]
        pod = spec["template"]["spec"]["containers"][0]
        failures = 0
        todo = list(range(spec["completions"]))
        while todo and not job.get("deleted"):
            wave, todo = todo[: spec["parallelism"]], todo[spec["parallelism"] :]
            procs = [(i, self._start(job, pod, i)) for i in wave]
            for index, proc in procs:
                code = proc.proc.wait(180)
                proc.stop()
                self.pods.append((job["metadata"]["name"], index, code))
                if code != 0:
                    failures += 1
                    todo.append(index)
            if failures > spec["backoffLimit"]:
                job["status"] = {"failed": failures, "conditions": [{"type": "Failed", "status": "True"}]}
                return
        job["status"] = {
            "succeeded": spec["completions"],
            "conditions": [{"type": "Complete", "status": "True"}],
        }

    def _start(self, job: dict, container: dict, index: int) -> ServiceProcess:
        env = dict(self.env)
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            elif var["valueFrom"]["fieldRef"]["fieldPath"].endswith(
                "['batch.kubernetes.io/job-completion-index']"
            ):
                env[var["name"]] = str(index)
        env["JOB_COMPLETION_INDEX"] = str(index)  # the Job controller sets it too
        args = [VARIABLE.sub(lambda m: env[m.group(1)], a) for a in container["args"]]
        # The kubelet mounts the data volume at /data.
        args = [
            str(self.data_dir) + a[len("/data") :] if a == "/data" or a.startswith("/data/") else a
            for a in args
        ]
        if self.fail_first == index and not any(i == index for _, i, _ in self.pods):
            args = [*args, "--no-such-flag"]  # this pod fails (exit 2) before doing anything
        name = f"{job['metadata']['name']}-{index}-{len(self.pods)}"
        return ServiceProcess(args, self.log_dir / f"{name}.log", env)


def write_original_layout(data_dir) -> None:
    """datasets/BAGS in the original layout: images/, bags_train.csv, bags_test.csv, bags_labels.csv."""
    base = data_dir / "datasets" / "BAGS"
    for split, n, offset in (("train", N_TRAIN, 0), ("test", N_TEST, 1000)):
        rows = []
        for i in range(n):
            pid = i % LABELS
            rel = f"{split}/bag-{offset + i:04d}.png"
            path = base / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(make_image(seed=offset + i, size=32, label=pid))
            rows.append(f"{pid},{rel}")
        (base / f"bags_{split}.csv").write_text("\n".join(rows) + "\n")
    (base / "bags_labels.csv").write_text("\n".join(f"{p},kind{p}" for p in range(LABELS)) + "\n")


def test_follow_reindexes_through_indexed_jobs_and_retries_a_failed_one(tmp_path):
    cronjob = rendering.find(rendering.render("overlays/cpu"), "CronJob", "cbir-reindex-parallel")
    template = copy.deepcopy(cronjob)
    # A Job fails as soon as one pod does, so that the controller's own retry is exercised too.
    template["spec"]["jobTemplate"]["spec"]["backoffLimit"] = 0
    repo = tmp_path / "models"
    export_tiny_model(repo, s.MODEL, version=1, dim=s.DIM, seed=0)
    data = tmp_path / "data"
    write_original_layout(data)
    (tmp_path / "token").write_text(TOKEN + "\n")
    shard_args = ("--host", "127.0.0.1", "--metrics-port", "-1", "--log-format", "text", "--shard-count", "2")
    with (
        running_service(
            "embedder",
            "serve",
            "--model_name",
            s.MODEL,
            "--model_base_path",
            str(repo / s.MODEL),
            "--host",
            "127.0.0.1",
            log_dir=tmp_path,
        ) as (_e, serving),
        running_service(
            "indexer",
            "serve",
            "--data-dir",
            str(tmp_path / "i0"),
            "--shard-id",
            "0",
            *shard_args,
            log_dir=tmp_path,
        ) as (_i0, shard0),
        running_service(
            "indexer",
            "serve",
            "--data-dir",
            str(tmp_path / "i1"),
            "--shard-id",
            "1",
            *shard_args,
            log_dir=tmp_path,
        ) as (_i1, shard1),
    ):
        targets = [shard0, shard1]
        topology = {"INDEXER_TARGETS": ",".join(targets), "SERVING_TARGET": serving, "MODEL_NAME": s.MODEL}
        cluster = FakeCluster(template, topology, data, tmp_path, fail_first=1)
        controller = ServiceProcess(
            [
                "-m",
                "indexer",
                "follow",
                "--indexer",
                ",".join(targets),
                "--serving",
                serving,
                "--model",
                s.MODEL,
                "--eval",
                str(data),
                "--eval-layout",
                "original",
                "--eval-dataset",
                "bags",
                "--eval-split",
                "test",
                "--reindex-job",
                "cbir-reindex-parallel",
                "--kubernetes-api",
                cluster.url,
                "--kubernetes-token-file",
                str(tmp_path / "token"),
                "--kubernetes-namespace",
                "cbir",
                "--poll-seconds",
                "0.3",
                "--backoff-initial",
                "0.3",
                "--backoff-max",
                "1",
                "--port",
                "0",
                "--metrics-port",
                "-1",
                "--host",
                "127.0.0.1",
            ],
            tmp_path / "follow.log",
        )
        try:
            decision = wait_for(
                lambda: settled(shard0, 1), "version 1's decision", timeout=300, proc=controller
            )
        finally:
            controller.stop()
            cluster.close()
        assert decision.verdict == indexer_pb2.ROLLOUT_VERDICT_PASSED and decision.HasField("activated_at")
        assert decision.evaluation_queries == N_TEST

        # The controller created the Job twice from the template: the first failed (worker 1's pod),
        # it was deleted and created again, and the second one's workers finished the same generation.
        assert [j["metadata"]["name"] for j in cluster.created] == ["cbir-reindex-parallel-v1"] * 2
        base = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
        for job in cluster.created:
            args = job["spec"]["template"]["spec"]["containers"][0]["args"]
            assert args == [*base, "--model-version=1", "--generation=tiny-v1", "--no-activate"]
            assert job["spec"]["completionMode"] == "Indexed"
            assert job["metadata"]["labels"]["cbir.io/model-version"] == "1"
        assert "reindex Job cbir-reindex-parallel-v1 failed" in (tmp_path / "follow.log").read_text()
        assert [(i, code) for _, i, code in cluster.pods[:2]] == [(0, 0), (1, 2)]
        assert sorted(i for _, i, code in cluster.pods[2:] if code == 0) == [0, 1, 2, 3]
        # Worker 0 of the second Job found its partition written by the first one: nothing to redo.
        logs = [p.read_text() for p in tmp_path.glob("cbir-reindex-parallel-v1-0-*.log")]
        assert any(
            re.search(r"resuming generation tiny-v1: \d+ items already current, 0 to embed", t) for t in logs
        )
        with IndexerClient(targets) as client:
            active = client.active_generation()
            assert active.name == "tiny-v1" and active.pending_count == 0
            ids = [r.item.id for r in client.list_items("tiny-v1")]
        assert len(ids) == len(set(ids)) == N_TRAIN + N_TEST
