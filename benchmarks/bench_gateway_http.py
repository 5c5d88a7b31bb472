"""Gateway HTTP/JSON benchmark: HTTP Search (JSON with a base64 image) against gRPC Search, same queries.

Stack as in bench_gateway (model server with the bench model, indexer with the catalogue's vectors,
gateway), with the gateway's HTTP port on. Both transports send the same JPEG queries (k=10) to the
same gateway, one client at a time, in alternating rounds so background load hits both alike:
- gRPC: ``SearchService/Search`` through the generated stub;
- HTTP: ``POST /v1/search`` with the proto3 JSON body, over one keep-alive ``http.client`` connection
  (a light client: the figure is the server's path, not a client library's);
- HTTP upload: ``POST /v1/search:upload`` with the JPEG as a multipart file.
CPU per request is the gateway process's own (utime + stime from /proc) over a round. Each figure is
the best of several alternating rounds (after a warm-up of every path).
Goal (issue 13): HTTP adds at most 20% to gRPC's p50 at 1 client.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

from benchmarks.bench_embedder import BATCHING, export_bench_model, make_jpegs
from benchmarks.bench_gateway import K, _closed_loop, _load_generation, build_catalogue
from cbir.v1 import search_pb2, search_pb2_grpc
from tests.support.processes import ServiceProcess, free_port, wait_for_health, wait_for_port_file


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _with_cpu(pid: int, measure, seconds: float) -> dict:
    """``measure()``'s figures plus the gateway's CPU milliseconds per call during it."""
    before = _cpu_seconds(pid)
    result = measure()
    calls = result["throughput"] * seconds
    result["cpu_ms"] = (_cpu_seconds(pid) - before) / max(calls, 1) * 1e3
    return result


class _HttpClient:
    """One keep-alive connection per thread, as a real client keeps it."""

    def __init__(self, port: int):
        self.port = port
        self._connections: dict[int, http.client.HTTPConnection] = {}

    def _connection(self) -> http.client.HTTPConnection:
        key = threading.get_ident()
        if key not in self._connections:
            self._connections[key] = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        return self._connections[key]

    def post(self, path: str, body: bytes, content_type: str) -> bytes:
        connection = self._connection()
        connection.request("POST", path, body, {"Content-Type": content_type})
        answer = connection.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"HTTP {answer.status}: {data[:200]!r}")
        return data

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()


def _multipart(image: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def run(quick: bool, workdir: Path) -> list[dict]:
    # Several short alternating rounds, best of each: on a shared machine one round's figure is
    # mostly the neighbours' load.
    seconds = 2.0 if quick else 5.0
    rounds = 3 if quick else 5
    work = Path(workdir) / "gateway-http-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = export_bench_model(work / "models")
    (work / "batching.config").write_text(BATCHING)
    procs: list[ServiceProcess] = []

    def start(module: str, args: list[str]) -> tuple[ServiceProcess, Path]:
        port_file = work / f"{module}.port"
        proc = ServiceProcess(
            [
                "-m",
                module,
                "serve",
                *args,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--log-level",
                "warning",
            ],
            work / f"{module}.log",
        )
        procs.append(proc)
        return proc, port_file

    def ready(proc: ServiceProcess, port_file: Path) -> str:
        target = f"127.0.0.1:{wait_for_port_file(port_file, proc, 180)}"
        wait_for_health(target, "", 180, proc)
        return target

    try:
        serving_port = free_port()
        serving_proc = ServiceProcess(
            [
                "-m",
                "embedder",
                "serve",
                "--model_name",
                "bench",
                "--model_base_path",
                str(work / "models" / "bench"),
                "--enable_batching",
                "--batching_parameters_file",
                str(work / "batching.config"),
                "--host",
                "127.0.0.1",
                "--port",
                str(serving_port),
                "--log-level",
                "warning",
            ],
            work / "embedder.log",
        )
        procs.append(serving_proc)
        indexer_proc, indexer_port_file = start(
            "indexer", ["--data-dir", str(work / "index"), "--metrics-port", "-1"]
        )
        indexer = ready(indexer_proc, indexer_port_file)
        http_port_file = work / "gateway.http-port"
        gateway_proc, gateway_port_file = start(
            "gateway",
            [
                "--serving",
                f"127.0.0.1:{serving_port}",
                "--indexer",
                indexer,
                "--metrics-port",
                "-1",
                "--http-port",
                "0",
                "--http-port-file",
                str(http_port_file),
                "--probe-period",
                "0.5",
            ],
        )
        images = make_jpegs(300 if quick else 1000)
        queries = images[:64]
        vectors = build_catalogue(model_dir, images)
        wait_for_health(f"127.0.0.1:{serving_port}", "", 180, serving_proc)
        _load_generation(indexer, vectors)
        gateway = ready(gateway_proc, gateway_port_file)
        http_port = wait_for_port_file(http_port_file, gateway_proc, 30)

        import grpc

        json_bodies = {
            q: json.dumps({"image": base64.b64encode(q).decode(), "k": K}).encode() for q in queries
        }
        forms = {q: _multipart(q) for q in queries}
        client = _HttpClient(http_port)
        results: dict[str, list[dict]] = {"grpc": [], "http": [], "upload": [], "grpc16": [], "http16": []}
        with grpc.insecure_channel(gateway) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)

            def grpc_search(image: bytes):
                return stub.Search(search_pb2.SearchRequest(image=image, k=K), timeout=30)

            def http_search(image: bytes):
                return client.post("/v1/search", json_bodies[image], "application/json")

            def http_upload(image: bytes):
                body, content_type = forms[image]
                return client.post("/v1/search:upload", body, content_type)

            # Both answer the same hits (the same core behind both ports).
            first = queries[0]
            assert [h["id"] for h in json.loads(http_search(first))["hits"]] == [
                h.id for h in grpc_search(first).hits
            ]
            pid = gateway_proc.pid
            for call in (grpc_search, http_search, http_upload):  # first-use costs are not measured
                for image in queries[:32]:
                    call(image)
            for _ in range(rounds):
                for name, call, clients in (
                    ("grpc", grpc_search, 1),
                    ("http", http_search, 1),
                    ("upload", http_upload, 1),
                    ("grpc16", grpc_search, 16),
                    ("http16", http_search, 16),
                ):
                    length = seconds if clients == 1 else seconds / 2
                    results[name].append(
                        _with_cpu(
                            pid, lambda c=call, n=clients, t=length: _closed_loop(c, queries, n, t), length
                        )
                    )
        client.close()
    finally:
        for proc in reversed(procs):
            proc.stop()

    def best(name: str, key: str) -> float:
        values = [r[key] for r in results[name]]
        return float(max(values) if key == "throughput" else min(values))

    grpc_p50, http_p50, upload_p50 = best("grpc", "p50"), best("http", "p50"), best("upload", "p50")
    grpc_cpu, http_cpu = best("grpc", "cpu_ms"), best("http", "cpu_ms")
    return [
        {
            "name": "HTTP Search p50, 1 client (POST /v1/search, JSON with base64 JPEG, k=10)",
            "value": round(http_p50, 2),
            "unit": "ms",
            "baseline_name": "gRPC Search p50, 1 client, same queries and gateway",
            "baseline": round(grpc_p50, 2),
            "ratio": round(http_p50 / grpc_p50, 3),
            "goal": "ratio <= 1.2",
            "higher_is_better": False,
        },
        {
            "name": "HTTP upload Search p50, 1 client (POST /v1/search:upload, multipart JPEG)",
            "value": round(upload_p50, 2),
            "unit": "ms",
            "baseline_name": "gRPC Search p50, 1 client",
            "baseline": round(grpc_p50, 2),
            "ratio": round(upload_p50 / grpc_p50, 3),
            "goal": "report",
            "higher_is_better": False,
        },
        {
            "name": "gateway CPU per HTTP Search, 1 client",
            "value": round(http_cpu, 3),
            "unit": "ms",
            "baseline_name": "gateway CPU per gRPC Search, 1 client",
            "baseline": round(grpc_cpu, 3),
            "ratio": round(http_cpu / grpc_cpu, 3),
            "goal": "report",
            "higher_is_better": False,
        },
        {
            "name": "HTTP Search p99, 1 client",
            "value": round(best("http", "p99"), 2),
            "unit": "ms",
            "baseline_name": "gRPC Search p99, 1 client",
            "baseline": round(best("grpc", "p99"), 2),
            "ratio": round(best("http", "p99") / best("grpc", "p99"), 3),
            "goal": "report",
            "higher_is_better": False,
        },
        {
            "name": "HTTP Search throughput, 16 clients",
            "value": round(best("http16", "throughput"), 1),
            "unit": "searches/s",
            "baseline_name": "gRPC Search throughput, 16 clients",
            "baseline": round(best("grpc16", "throughput"), 1),
            "ratio": round(best("http16", "throughput") / best("grpc16", "throughput"), 3),
            "goal": "report",
            "higher_is_better": True,
        },
        {
            "name": "gateway CPU per HTTP Search, 16 clients",
            "value": round(best("http16", "cpu_ms"), 3),
            "unit": "ms",
            "baseline_name": "gateway CPU per gRPC Search, 16 clients",
            "baseline": round(best("grpc16", "cpu_ms"), 3),
            "ratio": round(best("http16", "cpu_ms") / best("grpc16", "cpu_ms"), 3),
            "goal": "report",
            "higher_is_better": False,
        },
    ]


if __name__ == "__main__":
    import sys

    quick = "--full" not in sys.argv
    out = Path(tempfile.mkdtemp(prefix="bench-gateway-http-"))
    for figure in run(quick, out):
        print(json.dumps(figure))
