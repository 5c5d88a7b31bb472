"""Gateway HTTP/JSON benchmark: HTTP Search (JSON with a base64 image) against gRPC Search, same queries.

Stack as in bench_gateway (model server with the bench model, indexer with the catalogue's vectors,
gateway), with the gateway's HTTP port on. Both transports send the same JPEG queries (k=10) to the
same gateway from load-generator processes (benchmarks/loadgen.py), in alternating rounds so
background load hits both alike:
- gRPC: ``SearchService/Search`` with serialised requests;
- HTTP: ``POST /v1/search`` with the proto3 JSON body, one keep-alive ``http.client`` connection per
  client (a light client: the figure is the server's path, not a client library's);
- HTTP upload: ``POST /v1/search:upload`` with the JPEG as a multipart file.
CPU per request is the gateway process's own (utime + stime from /proc) over a load window
(benchmarks/measure.py). Each figure is the best of several alternating rounds (after a warm-up of
every path).
Goal (issue 13): HTTP adds at most 20% to gRPC's p50 at 1 client.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import urllib.request
import uuid
from pathlib import Path

import grpc

from benchmarks import measure
from benchmarks.bench_embedder import export_bench_model, make_jpegs
from benchmarks.bench_gateway import SEARCH, K, Stack, build_catalogue
from cbir.v1 import search_pb2, search_pb2_grpc

JSON = "application/json"


def _multipart(image: bytes, boundary: str) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )


def _http_hit_ids(target: str, body: bytes) -> list[str]:
    request = urllib.request.Request(
        f"http://{target}/v1/search", data=body, headers={"Content-Type": JSON}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return [hit["id"] for hit in json.loads(answer.read())["hits"]]


def run(quick: bool, workdir: Path) -> list[dict]:
    # Several short alternating rounds, best of each: on a shared machine one round's figure is
    # mostly the neighbours' load.
    seconds = 2.0 if quick else 5.0
    rounds = 3 if quick else 5
    work = Path(workdir) / "gateway-http-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = export_bench_model(work / "models")
    stack = Stack(work / "stack", work / "models", http=True)
    results: dict[str, list[measure.LoadRun]] = {
        "grpc": [],
        "http": [],
        "upload": [],
        "grpc16": [],
        "http16": [],
    }
    try:
        stack.start_gateway()
        images = make_jpegs(300 if quick else 1000)
        queries = images[:64]
        vectors = build_catalogue(model_dir, images)
        stack.ready(vectors)

        searches = [search_pb2.SearchRequest(image=q, k=K).SerializeToString() for q in queries]
        bodies = [json.dumps({"image": base64.b64encode(q).decode(), "k": K}).encode() for q in queries]
        boundary = uuid.uuid4().hex
        forms = [_multipart(q, boundary) for q in queries]
        upload_type = f"multipart/form-data; boundary={boundary}"

        # Both answer the same hits (the same core behind both ports).
        with grpc.insecure_channel(stack.gateway) as channel:
            answer = search_pb2_grpc.SearchServiceStub(channel).Search(
                search_pb2.SearchRequest(image=queries[0], k=K), timeout=30
            )
        assert _http_hit_ids(stack.http, bodies[0]) == [hit.id for hit in answer.hits]

        grpc_load = {"target": stack.gateway, "method": SEARCH, "requests": searches}
        http_load = {"target": stack.http, "method": "/v1/search", "requests": bodies, "content_type": JSON}
        upload_load = {
            "target": stack.http,
            "method": "/v1/search:upload",
            "requests": forms,
            "content_type": upload_type,
        }
        for load in (grpc_load, http_load, upload_load):  # first-use costs are not measured
            stack.load(**load, clients=4, seconds=1.0)
        for _ in range(rounds):
            for name, load, clients in (
                ("grpc", grpc_load, 1),
                ("http", http_load, 1),
                ("upload", upload_load, 1),
                ("grpc16", grpc_load, 16),
                ("http16", http_load, 16),
            ):
                length = seconds if clients == 1 else seconds / 2
                results[name].append(stack.load(**load, clients=clients, seconds=length))
    finally:
        stack.stop()

    def best(name: str, key: str) -> float:
        runs = results[name]
        if key == "throughput":
            return max(r.throughput for r in runs)
        if key == "cpu_ms":
            return min(r.cpu_ms("gateway") for r in runs)
        return min(r.ms(float(key.removeprefix("p"))) for r in runs)

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
