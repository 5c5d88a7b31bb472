"""A corpus of malformed (and oddly-formed but valid) requests against the real stack: each gets its status."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from PIL import Image

from cbir.v1 import search_pb2, types_pb2
from tests.gateway import badimages as bad
from tests.gateway.stack import AUTH
from trainer.synthetic import make_image

pytestmark = pytest.mark.slow

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
# The e2e gateway runs with --max-image-bytes 2000000 --max-image-pixels 4000000 --max-message-bytes 8 MiB.


@dataclass(frozen=True)
class Case:
    name: str
    request: object
    code: grpc.StatusCode
    fragment: str = ""


def _bmp_bomb() -> bytes:
    data = bytearray(bad.encode(bad.photo(8), "BMP"))
    data[18:26] = struct.pack("<ii", 30_000, 30_000)
    return bytes(data)


def _image_cases() -> list[Case]:
    photo = bad.photo(64)
    jpeg, png = bad.encode(photo, "JPEG"), bad.encode(photo, "PNG")
    gif, webp, bmp = (
        bad.encode(photo.convert("P"), "GIF"),
        bad.encode(photo, "WEBP"),
        bad.encode(photo, "BMP"),
    )
    rng = np.random.default_rng(7)
    invalid = {
        "zero_bytes": b"",
        **{f"jpeg_truncated_{int(k * 100)}": bad.truncated(jpeg, k) for k in (0.1, 0.5, 0.9)},
        **{f"png_truncated_{int(k * 100)}": bad.truncated(png, k) for k in (0.1, 0.5, 0.9)},
        "gif_truncated": bad.truncated(gif, 0.5),
        "webp_truncated": bad.truncated(webp, 0.5),
        "bmp_truncated": bad.truncated(bmp, 0.5),
        "png_corrupt_data": bad.corrupt(png, 1),
        "jpeg_corrupt_header": jpeg[:2] + rng.integers(0, 256, 30, dtype=np.uint8).tobytes() + jpeg[32:],
        **{
            f"random_bytes_{i}": rng.integers(0, 256, 500 * (i + 1), dtype=np.uint8).tobytes()
            for i in range(3)
        },
        "text": b"this is not an image",
        "html": b"<html><body><img src='x.png'></body></html>",
        "pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
        "zip": b"PK\x03\x04" + b"\0" * 100,
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "tiff_unsupported": bad.encode(photo, "TIFF"),
        "ico_unsupported": bad.encode(photo, "ICO"),
        "png_signature_only": b"\x89PNG\r\n\x1a\n",
        "jpeg_soi_only": b"\xff\xd8\xff\xe0",
        "gif_magic_only": b"GIF89a",
        "webp_magic_only": b"RIFF\x10\0\0\0WEBPVP8 ",
        "bmp_magic_only": b"BM\0\0",
    }
    too_big = {
        "bytes_over_gateway_limit": png + b"\0" * 2_000_000,
        "message_over_grpc_limit": b"\xff\xd8" + b"\0" * (9 * 1024 * 1024),
        "png_bomb_50000x50000": bad.png_bomb(50_000, 50_000),
        "png_bomb_just_over": bad.png_bomb(2001, 2000),
        "gif_bomb_65535x65535": bad.gif_bomb(65535, 65535),
        "bmp_bomb_30000x30000": _bmp_bomb(),
        "jpeg_real_3000x1500": bad.encode(Image.new("RGB", (3000, 1500), (10, 200, 30)), "JPEG"),
        "webp_real_2500x2000": bad.encode(Image.new("RGB", (2500, 2000), (10, 200, 30)), "WEBP"),
    }
    valid = {
        name: data
        for name, data in bad.valid_variants().items()
        if name
        in (
            "gif_animated",
            "png_animated",
            "webp_animated",
            "jpeg_cmyk",
            "jpeg_grey",
            "png_rgba",
            "png_grey_alpha",
            "png_16bit",
            "bmp_palette",
            "bmp_1bit",
            "tiny_1x1",
        )
    }
    cases = [Case(f"image_{n}", search_pb2.SearchRequest(image=d), INVALID) for n, d in invalid.items()]
    cases += [Case(f"image_{n}", search_pb2.SearchRequest(image=d), TOO_BIG) for n, d in too_big.items()]
    cases += [Case(f"image_{n}", search_pb2.SearchRequest(image=d, k=3), OK) for n, d in valid.items()]
    return cases


def _parameter_cases() -> list[Case]:
    image = make_image(3, size=32, label=1)

    def req(**kwargs):
        return search_pb2.SearchRequest(image=image, **kwargs)

    def flt(**kwargs):
        return types_pb2.Filter(**kwargs)

    attr = types_pb2.AttributeFilter
    return [
        Case("k_negative", req(k=-1), INVALID, "k must be between 1 and 1000"),
        Case("k_over_max", req(k=1001), INVALID, "k must be between"),
        Case("k_int32_max", req(k=2**31 - 1), INVALID, "k must be between"),
        Case("ef_negative", req(ef=-1), INVALID, "ef must be"),
        Case("ef_huge", req(ef=1_000_000), INVALID, "ef must be"),
        Case("min_score_nan", req(min_score=float("nan")), INVALID, "min_score"),
        Case("min_score_inf", req(min_score=float("inf")), INVALID, "min_score"),
        Case("filter_empty_label", req(filter=flt(labels=["class1", ""])), INVALID, "empty label"),
        Case(
            "filter_empty_key",
            req(filter=flt(attributes=[attr(key="", values=["red"])])),
            INVALID,
            "empty key",
        ),
        Case("filter_no_values", req(filter=flt(attributes=[attr(key="colour")])), INVALID, "no values"),
        Case("filter_matching_nothing", req(filter=flt(labels=["no-such-label"])), OK),
        Case("no_query", search_pb2.SearchRequest(k=3), INVALID, "exactly one"),
        Case("id_unknown", search_pb2.SearchRequest(item_id="item-999"), NOT_FOUND, "item-999"),
        Case("id_unknown_unicode", search_pb2.SearchRequest(item_id="ümlaut-☃"), NOT_FOUND),
        Case("id_empty", search_pb2.SearchRequest(item_id=""), INVALID, "item_id must be 1..256 bytes"),
        Case(
            "id_too_long",
            search_pb2.SearchRequest(item_id="x" * 300),
            INVALID,
            "item_id must be 1..256 bytes",
        ),
        Case("id_control_chars", search_pb2.SearchRequest(item_id="item\n001"), INVALID, "control"),
        Case("batch_empty", search_pb2.BatchSearchRequest(), INVALID, "at least one"),
        Case("batch_too_many", search_pb2.BatchSearchRequest(queries=[req()] * 65), INVALID, "--max-batch"),
        Case(
            "batch_bad_third_query",
            search_pb2.BatchSearchRequest(queries=[req(), req(), search_pb2.SearchRequest(image=b"junk")]),
            INVALID,
            "queries[2]",
        ),
        Case(
            "batch_bad_k_second",
            search_pb2.BatchSearchRequest(queries=[req(), req(k=5000)]),
            INVALID,
            "queries[1]: k must",
        ),
    ]


CASES = _image_cases() + _parameter_cases()


def _name(case: Case) -> str:
    return case.name


def test_corpus_is_large_enough():
    assert len(CASES) >= 50 and len({_name(c) for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def stub(e2e):
    with e2e.gateway.channel() as channel:
        yield e2e.gateway.stub(channel)


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_bad_input_gets_its_status(stub, case):
    call = stub.BatchSearch if isinstance(case.request, search_pb2.BatchSearchRequest) else stub.Search
    try:
        response = call(case.request, metadata=AUTH, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() == case.code, f"{case.name}: {exc.code().name}: {exc.details()}"
        assert case.fragment in exc.details()
        assert "internal error" not in exc.details()
        return
    assert case.code == OK, f"{case.name} succeeded, expected {case.code.name}"
    if case.name != "filter_matching_nothing":
        assert response.hits and response.generation.name


def test_services_are_still_up_after_the_corpus(e2e, stub):
    for proc in (e2e.gateway.proc, e2e.indexer_proc, e2e.serving_proc):
        assert proc.alive()
    image = e2e.catalogue.images["item-020"]
    assert (
        stub.Search(search_pb2.SearchRequest(image=image, k=1), metadata=AUTH, timeout=30).hits[0].id
        == "item-020"
    )
    log = e2e.gateway.proc.log_text()
    assert "unhandled error" not in log and "Traceback" not in log
