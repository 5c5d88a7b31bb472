"""Query image checks: limits from the header, formats, corruption, animated / CMYK / palette handling."""

import io
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.errors import InvalidInput, ResourceExhausted
from gateway.images import (
    PILLOW_BOMB_LIMIT,
    DecodeBudget,
    ImageLimits,
    check_png_stream,
    decode_cost,
    prepare_image,
)
from tests.gateway import badimages as bad

LIMITS = ImageLimits(max_bytes=200_000, max_pixels=1_000_000)
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name, data", sorted(bad.valid_variants().items()))
def test_valid_variants_are_accepted(name, data):
    prepared = prepare_image(data, LIMITS)
    # Whatever is sent on must be a plain image Pillow (and TF) can decode as RGB.
    decoded = Image.open(io.BytesIO(prepared.data))
    decoded.load()
    assert decoded.size == (prepared.width, prepared.height)


@pytest.mark.parametrize(
    "name", ["jpeg_rgb", "jpeg_cmyk", "png_rgba", "png_16bit", "gif_still", "webp", "bmp_rgb"]
)
def test_formats_the_model_decodes_are_passed_through_unchanged(name):
    data = bad.valid_variants()[name]
    prepared = prepare_image(data, LIMITS)
    assert not prepared.reencoded and prepared.data == data


@pytest.mark.parametrize("name", ["gif_animated", "png_animated", "webp_animated"])
def test_animated_images_become_their_first_frame(name):
    prepared = prepare_image(bad.valid_variants()[name], LIMITS)
    assert prepared.reencoded and prepared.reason.startswith("animated")
    frame = Image.open(io.BytesIO(prepared.data))
    assert frame.format == "PNG" and not getattr(frame, "is_animated", False)
    mean = np.asarray(frame.convert("RGB"), dtype=float).reshape(-1, 3).mean(axis=0)
    assert np.abs(mean - bad.FRAME_COLOURS[0]).max() < 12, mean  # frame 0 (red), give or take the codec


@pytest.mark.parametrize("name", ["bmp_palette", "bmp_1bit"])
def test_bmp_variants_the_model_misreads_are_reencoded(name):
    prepared = prepare_image(bad.valid_variants()[name], LIMITS)
    assert prepared.reencoded and Image.open(io.BytesIO(prepared.data)).mode == "RGB"


def test_empty_image():
    with pytest.raises(InvalidInput, match="empty"):
        prepare_image(b"", LIMITS)


def test_too_many_bytes_is_resource_exhausted():
    with pytest.raises(ResourceExhausted, match="--max-image-bytes"):
        prepare_image(b"\xff" * (LIMITS.max_bytes + 1), LIMITS)


@pytest.mark.parametrize(
    "bomb", [bad.png_bomb(50_000, 50_000), bad.png_bomb(1001, 1000), bad.gif_bomb(65535, 65535)]
)
def test_pixel_bombs_are_rejected_from_the_header(bomb):
    assert len(bomb) < 2000
    with pytest.raises(ResourceExhausted, match="--max-image-pixels"):
        prepare_image(bomb, LIMITS)


@pytest.mark.parametrize(
    "data", [b"hello world", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"\0" * 100]
)
def test_not_an_image(data):
    with pytest.raises(InvalidInput):
        prepare_image(data, LIMITS)


def test_unsupported_format_is_rejected_with_the_accepted_list():
    with pytest.raises(InvalidInput, match="JPEG, PNG, GIF, BMP or WebP"):
        prepare_image(bad.encode(bad.photo(), "TIFF"), LIMITS)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP"])
@pytest.mark.parametrize("keep", [0.3, 0.7])
def test_truncated_images_are_invalid(fmt, keep):
    image = bad.photo(64)
    data = bad.encode(image.convert("P") if fmt == "GIF" else image, fmt)
    with pytest.raises(InvalidInput):
        prepare_image(bad.truncated(data, keep), LIMITS)


def test_corrupt_png_data_is_invalid():
    data = bad.encode(bad.photo(64), "PNG")
    with pytest.raises(InvalidInput, match="decoded|corrupt"):
        prepare_image(bad.corrupt(data, 1), LIMITS)


# ------------------------------------------------------------------ PNG checked as a stream

RNG = np.random.default_rng(11)
PNG_ARRAYS = {
    "rgb": RNG.integers(0, 256, (37, 23, 3), dtype=np.uint8),
    "rgba": RNG.integers(0, 256, (17, 31, 4), dtype=np.uint8),
    "grey": RNG.integers(0, 256, (9, 5), dtype=np.uint8),
    "grey_alpha": RNG.integers(0, 256, (13, 11, 2), dtype=np.uint8),
    "grey16": RNG.integers(0, 65536, (12, 7), dtype=np.uint16),
    "one_pixel": RNG.integers(0, 256, (1, 1, 3), dtype=np.uint8),
    "one_column": RNG.integers(0, 256, (3, 1), dtype=np.uint8),
}


def _png_variants() -> dict[str, bytes]:
    """Every PNG layout the stream check must accept: colour types, depths 1-16, Adam7, split IDATs."""
    variants = {n: v for n, v in bad.valid_variants().items() if n.startswith("png") and "animated" not in n}
    variants["png_1bit"] = bad.encode(bad.photo().convert("1"), "PNG")
    variants["png_4bit_palette"] = bad.encode(bad.photo().convert("P", colors=16), "PNG", bits=4)
    for name, array in PNG_ARRAYS.items():
        variants[f"png_{name}"] = bad.png_from_array(array)
        variants[f"png_{name}_interlaced"] = bad.png_from_array(array, interlace=True, idat_size=5)
    return variants


PNG_VARIANTS = _png_variants()


def test_handwritten_pngs_are_what_pillow_decodes():
    # The interlaced test images are written by hand (Pillow cannot): make sure they are right.
    for name, array in PNG_ARRAYS.items():
        for interlace in (False, True):
            image = Image.open(io.BytesIO(bad.png_from_array(array, interlace=interlace)))
            np.testing.assert_array_equal(np.asarray(image).reshape(array.shape), array, err_msg=name)


@pytest.mark.parametrize("name", sorted(PNG_VARIANTS))
def test_every_png_layout_passes_the_stream_check(name):
    check_png_stream(PNG_VARIANTS[name])
    prepared = prepare_image(PNG_VARIANTS[name], LIMITS)
    assert not prepared.reencoded and prepared.data == PNG_VARIANTS[name]


@pytest.mark.parametrize("name", sorted(PNG_VARIANTS))
def test_every_truncation_of_a_png_is_invalid(name):
    data = PNG_VARIANTS[name]
    # Everything up to the last byte of the IEND chunk is needed (its CRC included).
    for end in range(9, len(data) - 1, max(1, len(data) // 97)):
        with pytest.raises(InvalidInput, match="PNG image cannot be decoded|corrupt"):
            prepare_image(data[:end], LIMITS)


def test_the_stream_check_never_accepts_what_pillow_cannot_decode():
    """Random truncations and overwrites of each layout: whatever the check accepts, Pillow decodes.

    (It also refuses some files Pillow decodes: a CRC error in the image data or a missing IEND,
    which libpng, and so the model graph, refuses too.)"""
    rng = np.random.default_rng(5)
    accepted = 0
    for data in PNG_VARIANTS.values():
        for trial in range(60):
            mutated = bytearray(data)
            at = int(rng.integers(8, len(data)))
            if trial % 3 == 0:
                mutated = mutated[:at]
            elif trial % 3 == 1:
                mutated[at] = int(rng.integers(0, 256))
            else:
                mutated[at : at + 6] = rng.integers(0, 256, 6, dtype=np.uint8).tobytes()
            try:
                check_png_stream(bytes(mutated))
            except InvalidInput:
                continue
            accepted += 1
            image = Image.open(io.BytesIO(bytes(mutated)))
            image.load()  # raises if the check let a broken file through
    assert accepted < 20  # mostly no-op overwrites of ancillary bytes


def test_bad_filter_bytes_and_missing_rows_are_invalid_although_every_checksum_holds():
    width, height = 6, 4
    good = b"".join(b"\x01" + bytes(range(width)) for _ in range(height))
    check_png_stream(bad.png_with_raw_rows(width, height, good))
    bad_filter = good[: 2 * (width + 1)] + b"\x05" + good[2 * (width + 1) + 1 :]
    with pytest.raises(InvalidInput, match="filter type 5"):
        check_png_stream(bad.png_with_raw_rows(width, height, bad_filter))
    with pytest.raises(InvalidInput, match="truncated"):
        check_png_stream(bad.png_with_raw_rows(width, height, good[:-1]))
    # Extra inflated bytes are ignored, as decoders do.
    check_png_stream(bad.png_with_raw_rows(width, height, good + b"\0\0"))


def test_a_corrupt_zlib_stream_with_valid_crcs_is_invalid():
    data = bytearray(bad.png_from_array(PNG_ARRAYS["rgb"]))
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4 : idat], "big")
    data[idat + 4 + 2 : idat + 4 + 12] = b"\xff" * 10  # inside the deflate stream
    data[idat + 4 + length : idat + 8 + length] = zlib.crc32(data[idat : idat + 4 + length]).to_bytes(
        4, "big"
    )
    with pytest.raises(InvalidInput, match="inflate"):
        check_png_stream(bytes(data))


PEAK_OF_ONE_CHECK = """
import sys
from pathlib import Path
from gateway.images import ImageLimits, prepare_image
from tests.gateway import badimages as bad

def peak_kib():
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])

data = bad.flat_png(5000, 5000)
before = peak_kib()
prepared = prepare_image(data, ImageLimits())
assert not prepared.reencoded and (prepared.width, prepared.height) == (5000, 5000)
print(peak_kib() - before)
"""


def test_a_maximum_pixel_png_is_checked_without_holding_its_frame():
    # In a fresh process, whose peak RSS (VmHWM) is this check's alone: Pillow would hold the 25 Mpx
    # frame (100 MB); the stream check holds its 1 MiB inflate steps.
    done = subprocess.run(
        [sys.executable, "-c", PEAK_OF_ONE_CHECK], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 16 * 1024, f"peak RSS grew by {done.stdout.strip()} KiB"


def test_the_default_pixel_limit_admits_6000x4000_photos_and_not_more_than_pillow_allows():
    limits = ImageLimits()
    assert 6000 * 4000 <= limits.max_pixels <= PILLOW_BOMB_LIMIT
    with pytest.raises(ResourceExhausted, match="--max-image-pixels"):
        prepare_image(bad.png_bomb(6000, 6000), limits)
    # Pillow's own guard (twice its limit) fires inside open(): the same clear status.
    with pytest.raises(ResourceExhausted, match="--max-image-pixels"):
        prepare_image(bad.png_bomb(20_000, 10_000), limits)


# ------------------------------------------------------------------ the decode budget


def test_reservations_never_exceed_the_budget_and_are_served_in_order():
    budget = DecodeBudget(100)
    holding = threading.Event()
    release = threading.Event()
    order: list[str] = []
    reserved: list[int] = []

    def hold(name: str, nbytes: int) -> None:
        with budget.reserve(nbytes, timeout=30):
            order.append(name)
            reserved.append(budget.reserved)
            if name == "first":
                holding.set()
                release.wait(30)

    first = threading.Thread(target=hold, args=("first", 70))
    first.start()
    assert holding.wait(30)
    # 50 does not fit next to 70; 10 would, but waits its turn behind 50 (no starvation of big ones).
    big = threading.Thread(target=hold, args=("big", 50))
    big.start()
    _wait_for(lambda: len(budget._waiting) == 1)
    small = threading.Thread(target=hold, args=("small", 10))
    small.start()
    _wait_for(lambda: len(budget._waiting) == 2)
    assert order == ["first"] and budget.reserved == 70
    release.set()
    for thread in (first, big, small):
        thread.join(30)
    assert order == ["first", "big", "small"] and budget.reserved == 0
    assert reserved[:2] == [70, 50] and max(reserved) <= budget.capacity


def test_a_reservation_larger_than_the_whole_budget_is_refused_at_once():
    budget = DecodeBudget(100)
    with pytest.raises(
        ResourceExhausted,
        match=r"estimated 101 bytes, more than the gateway's budget of 100 bytes .*--max-decode-bytes",
    ):
        with budget.reserve(101, timeout=None):  # no timeout: it must not wait for what cannot come
            pass
    with budget.reserve(100, timeout=1):
        assert budget.reserved == 100
        with pytest.raises(ResourceExhausted, match="busy decoding"):
            with budget.reserve(1, timeout=0.05):
                pass
    assert budget.reserved == 0


def test_a_decode_that_cannot_get_its_share_in_time_is_resource_exhausted():
    webp = bad.encode(bad.photo(64), "WEBP")
    cost = decode_cost(Image.open(io.BytesIO(webp)))
    budget = DecodeBudget(cost)
    with budget.reserve(1, timeout=1):
        with pytest.raises(ResourceExhausted, match="busy decoding other large images"):
            prepare_image(webp, LIMITS, budget, timeout=0.05)
    assert prepare_image(webp, LIMITS, budget, timeout=1).format == "WEBP"
    with pytest.raises(ResourceExhausted, match="--max-decode-bytes-in-flight"):
        prepare_image(webp, LIMITS, DecodeBudget(cost - 1), timeout=1)
    assert budget.reserved == 0


@pytest.mark.parametrize(
    "name, reserves",
    [
        ("png_rgba", False),
        ("jpeg_rgb", True),
        ("jpeg_progressive", True),
        ("webp", True),
        ("gif_still", True),
    ],
)
def test_only_decodes_that_hold_a_frame_reserve_memory(name, reserves):
    seen: list[int] = []

    class Recording(DecodeBudget):
        def reserve(self, nbytes, timeout=None):
            seen.append(nbytes)
            return super().reserve(nbytes, timeout)

    prepare_image(bad.valid_variants()[name], LIMITS, Recording(10**9))
    assert bool(seen) == reserves and all(n > 0 for n in seen)


def test_progressive_jpegs_are_costed_by_their_coefficients():
    photo = bad.photo(64)
    baseline = Image.open(io.BytesIO(bad.encode(photo, "JPEG")))
    progressive = Image.open(io.BytesIO(bad.encode(photo, "JPEG", progressive=True, subsampling=0)))
    # 4:4:4: three full-size components of 2-byte coefficients, on top of the 1/8-scale output.
    assert decode_cost(progressive) == decode_cost(baseline) + 64 * 64 * 3 * 2


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_without_decoding_only_the_header_is_checked_and_the_reason_is_told_on_demand(fmt):
    from gateway.images import explain_undecodable

    data = bad.encode(bad.photo(), fmt)
    broken = bad.truncated(data, 0.6)
    assert prepare_image(broken, LIMITS, decode=False).data == broken  # left to the model graph
    assert "cannot be decoded" in explain_undecodable(broken, LIMITS)
    assert explain_undecodable(data, LIMITS) is None
    with pytest.raises(ResourceExhausted):
        prepare_image(bad.png_bomb(50_000, 50_000), LIMITS, decode=False)  # limits still hold
