"""Load-generator process of the benchmarks: closed-loop unary gRPC calls (or HTTP POSTs) with
pre-serialised requests.

Run by :func:`benchmarks.measure.run_load`, never by hand: ``python -m benchmarks.loadgen SPEC.json``.
The process connects, warms up, prints ``ready``, waits for ``go`` on stdin, then runs ``threads``
clients (one channel each, as independent clients would) that send the requests of the spec's
request file back to back for ``seconds``, and prints one JSON line: calls, failures, latencies and
its own CPU time. Requests are sent as bytes and answers kept as bytes (no protobuf work), so the
load costs as little CPU as a gRPC client can, and what it costs is reported, not hidden.

With ``content_type`` in the spec, each client instead POSTs the requests as HTTP bodies of that
type to the path ``method`` on ``target``, over one keep-alive ``http.client`` connection (a light
client: what is measured is the server's path, not a client library's); ``metadata`` become headers.
"""

from __future__ import annotations

import http.client
import json
import os
import struct
import sys
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path

import grpc


def read_requests(path: Path) -> list[bytes]:
    """The requests of a file written by :func:`write_requests`."""
    data = Path(path).read_bytes()
    out, offset = [], 0
    while offset < len(data):
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        out.append(data[offset : offset + size])
        offset += size
    return out


def write_requests(path: Path, requests: list[bytes]) -> None:
    """Length-prefixed serialised requests, the load generator's input."""
    with open(path, "wb") as fh:
        for request in requests:
            fh.write(struct.pack("<I", len(request)))
            fh.write(request)


def _channel(spec: dict) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.so_reuseport", 0)]
    tls = spec.get("tls")
    if not tls:
        return grpc.insecure_channel(spec["target"], options=options)
    read = lambda key: Path(tls[key]).read_bytes() if tls.get(key) else None  # noqa: E731
    credentials = grpc.ssl_channel_credentials(read("ca"), read("key"), read("cert"))
    if tls.get("server_name"):
        options.append(("grpc.ssl_target_name_override", tls["server_name"]))
    return grpc.secure_channel(spec["target"], credentials, options=options)


class HttpFailure(Exception):
    """An HTTP answer other than 200 OK."""


class _HttpPost:
    """POSTs bodies to one path over one keep-alive connection, as one real HTTP client would."""

    def __init__(self, target: str, path: str, headers: dict[str, str], timeout: float):
        host, _, port = target.rpartition(":")
        self._connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
        self._path, self._headers = path, headers

    def __call__(self, body: bytes) -> bytes:
        try:
            self._connection.request("POST", self._path, body, self._headers)
            answer = self._connection.getresponse()
            data = answer.read()
        except (OSError, http.client.HTTPException):
            self._connection.close()  # the next call reconnects
            raise
        if answer.status != 200:
            raise HttpFailure(f"HTTP {answer.status}: {data[:200]!r}")
        return data

    def close(self) -> None:
        self._connection.close()


def _clients(spec: dict, threads: int) -> tuple[list[Callable[[bytes], object]], Callable[[], None]]:
    """One call per client thread (request bytes -> answer) and what closes them all."""
    timeout = float(spec.get("timeout", 30.0))
    metadata = tuple((k, v) for k, v in spec.get("metadata", []))
    if spec.get("content_type"):
        headers = {"Content-Type": spec["content_type"], **dict(metadata)}
        posts = [_HttpPost(spec["target"], spec["method"], headers, timeout) for _ in range(threads)]

        def close_posts() -> None:
            for post in posts:
                post.close()

        return list(posts), close_posts
    channels = [_channel(spec) for _ in range(threads)]
    stubs = [c.unary_unary(spec["method"]) for c in channels]

    def call_with(stub: grpc.UnaryUnaryMultiCallable) -> Callable[[bytes], object]:
        return lambda request: stub(request, timeout=timeout, metadata=metadata)

    def close_channels() -> None:
        for channel in channels:
            channel.close()

    return [call_with(stub) for stub in stubs], close_channels


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    requests = read_requests(Path(spec["requests"]))
    threads = int(spec["threads"])
    seconds = float(spec["seconds"])
    calls, close = _clients(spec, threads)
    for i, call in enumerate(calls):  # connect and warm up both sides, not measured
        for j in range(int(spec.get("warmup", 3))):
            call(requests[(i + j) % len(requests)])
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    latencies = [array("d") for _ in range(threads)]
    failures: list[str] = []
    started = time.perf_counter()
    cpu_before = os.times()
    end = started + seconds

    def client(index: int) -> None:
        call, out = calls[index], latencies[index]
        i = int(spec.get("offset", 0)) * threads + index
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            try:
                call(requests[i % len(requests)])
            except (grpc.RpcError, HttpFailure, OSError, http.client.HTTPException) as exc:
                failures.append(_describe(exc))
                if len(failures) > 100:
                    return
                continue
            out.append(time.perf_counter() - t0)
            i += threads

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    cpu_after = os.times()
    close()
    flat = [x for per_client in latencies for x in per_client]
    print(
        json.dumps(
            {
                "calls": len(flat),
                "failures": failures[:5],
                "failure_count": len(failures),
                "elapsed": elapsed,
                "cpu": (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system),
                "latencies": flat,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
