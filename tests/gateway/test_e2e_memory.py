"""Peak memory of a real gateway process under concurrent maximum-size query images.

The gateway runs with its default image limits and no reachable dependencies: every search is
decoded and checked in full, then fails UNAVAILABLE at the indexer, so what is measured is the
image checks' memory alone (peak RSS, VmHWM from /proc). The bounds hold however the machine
schedules the requests: the stream check never holds a frame, and the decode budget admits
frame-holding decodes one share at a time.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
from PIL import Image

from cbir.processes import ServiceProcess, free_port, wait_for_port_file
from cbir.v1 import search_pb2, search_pb2_grpc
from gateway.images import DEFAULT_MAX_PIXELS
from tests.gateway import badimages as bad

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
CONCURRENT = 16
# Stated in gateway/README.md ("Memory") and deploy/README.md.
PNG_PEAK_LIMIT = 64 * MIB  # 16 concurrent 25 Mpx PNGs
BUDGET = 100 * MIB  # one 4 Mpx WebP (66 MB estimated) at a time
BUDGET_PEAK_LIMIT = BUDGET + 64 * MIB  # 16 concurrent 4 Mpx WebPs


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    kib = next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]
    return int(kib) * 1024


def start_gateway(tmp_path: Path, *extra: str) -> tuple[ServiceProcess, str]:
    port_file = tmp_path / "gateway.port"
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens: searches fail after the image checks
    proc = ServiceProcess(
        [
            "-m",
            "gateway",
            "serve",
            "--serving",
            nowhere,
            "--indexer",
            nowhere,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--metrics-port",
            "-1",
            "--max-workers",
            str(CONCURRENT),
            # Queued decodes wait for the budget as long as the test's calls allow.
            "--dependency-timeout",
            "300",
            *extra,
        ],
        tmp_path / "gateway.log",
    )
    return proc, f"127.0.0.1:{wait_for_port_file(port_file, proc, 60)}"


def search_concurrently(target: str, images: list[bytes]) -> list[grpc.StatusCode]:
    codes: list[grpc.StatusCode] = [grpc.StatusCode.UNKNOWN] * len(images)
    barrier = threading.Barrier(len(images))

    def one(i: int) -> None:
        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * MIB)]) as ch:
            stub = search_pb2_grpc.SearchServiceStub(ch)
            barrier.wait()
            try:
                stub.Search(search_pb2.SearchRequest(image=images[i], k=1), timeout=300)
                codes[i] = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                codes[i] = exc.code()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return codes


def measure(proc: ServiceProcess, target: str, image: bytes) -> int:
    """Peak RSS growth of the gateway over a warm-up search, for CONCURRENT searches of ``image``."""
    assert search_concurrently(target, [bad.encode(bad.photo(32), "PNG")]) == [grpc.StatusCode.UNAVAILABLE]
    before = peak_rss(proc.pid)
    codes = search_concurrently(target, [image] * CONCURRENT)
    # UNAVAILABLE comes from the (absent) indexer, i.e. after the image was accepted.
    assert codes == [grpc.StatusCode.UNAVAILABLE] * CONCURRENT, (codes, proc.log_text()[-3000:])
    return peak_rss(proc.pid) - before


def test_concurrent_maximum_pixel_pngs_stay_under_the_stated_peak(tmp_path):
    side = int(DEFAULT_MAX_PIXELS**0.5)
    image = bad.flat_png(side, side)  # the largest PNG the default limit admits, ~85 KB encoded
    proc, target = start_gateway(tmp_path)
    try:
        grown = measure(proc, target, image)
    finally:
        proc.stop()
    # Decoded by Pillow, each would hold a 100 MB frame: 1.6 GB for the 16.
    assert grown < PNG_PEAK_LIMIT, f"peak RSS grew by {grown / MIB:.0f} MiB"


def test_frame_holding_decodes_stay_within_the_decode_budget(tmp_path):
    # 4 Mpx: ~66 MB for Pillow to decode, whatever the content (flat keeps the file small).
    image = bad.encode(Image.new("RGB", (2000, 2000), (90, 140, 200)), "WEBP", lossless=True)
    proc, target = start_gateway(tmp_path, "--max-decode-bytes-in-flight", str(BUDGET))
    try:
        grown = measure(proc, target, image)
    finally:
        proc.stop()
    # Without the budget the 16 decodes overlap: about 1 GB.
    assert grown < BUDGET_PEAK_LIMIT, f"peak RSS grew by {grown / MIB:.0f} MiB"
