"""Malformed and unusual query images, shared by the unit tests and the end-to-end bad-input corpus."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(size: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width x height; the pixel data is a tiny stub."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def gif_bomb(width: int, height: int) -> bytes:
    """A GIF whose logical screen claims width x height."""
    data = bytearray(encode(photo(8).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


FRAME_COLOURS = ((220, 30, 30), (30, 220, 30), (30, 30, 220))


def animated(fmt: str, frames: int = 3) -> bytes:
    """Frames of distinct flat colours (red, green, blue, ...)."""
    images = [Image.new("RGB", (32, 32), FRAME_COLOURS[i % 3]) for i in range(frames)]
    if fmt == "GIF":
        images = [i.convert("P") for i in images]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], duration=100, loop=0)


def truncated(data: bytes, keep: float) -> bytes:
    return data[: max(1, int(len(data) * keep))]


def corrupt(data: bytes, seed: int, start: int = 64) -> bytes:
    """Overwrites a run of bytes after the header with noise."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    end = min(len(out), start + 64)
    out[start:end] = rng.integers(0, 256, end - start, dtype=np.uint8).tobytes()
    return bytes(out)


def valid_variants() -> dict[str, bytes]:
    """Unusual but valid images that must be embedded (passed through or re-encoded)."""
    base = photo()
    return {
        "jpeg_rgb": encode(base, "JPEG"),
        "jpeg_grey": encode(base.convert("L"), "JPEG"),
        "jpeg_cmyk": encode(base.convert("CMYK"), "JPEG"),
        "jpeg_progressive": encode(base, "JPEG", progressive=True),
        "png_rgba": encode(base.convert("RGBA"), "PNG"),
        "png_grey_alpha": encode(base.convert("LA"), "PNG"),
        "png_palette": encode(base.convert("P"), "PNG"),
        "png_16bit": encode(Image.fromarray(np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 20), "PNG"),
        "gif_still": encode(base.convert("P"), "GIF"),
        "gif_animated": animated("GIF"),
        "png_animated": animated("PNG"),
        "webp": encode(base, "WEBP"),
        "webp_animated": animated("WEBP"),
        "bmp_rgb": encode(base, "BMP"),
        "bmp_palette": encode(base.convert("P"), "BMP"),
        "bmp_1bit": encode(base.convert("1"), "BMP"),
        "tiny_1x1": encode(photo(1), "PNG"),
        "wide_300x3": encode(Image.new("RGB", (300, 3), (200, 10, 10)), "PNG"),
    }


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # samples per pixel -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_from_array(pixels: np.ndarray, *, interlace: bool = False, idat_size: int = 1 << 16) -> bytes:
    """A PNG written by hand (filter 0 rows) from uint8/uint16 [H, W] or [H, W, C]; Pillow cannot
    write interlaced PNGs, so the Adam7 case is only reachable this way."""
    array = pixels if pixels.ndim == 3 else pixels[:, :, None]
    height, width, samples = array.shape
    depth = 16 if array.dtype == np.uint16 else 8
    big_endian = array.astype(">u2") if depth == 16 else array
    header = struct.pack(">IIBBBBB", width, height, depth, _COLOUR_TYPES[samples], 0, 0, int(interlace))
    passes = [(0, 0, 1, 1)] if not interlace else ADAM7
    raw = bytearray()
    for x0, y0, dx, dy in passes:
        sub = big_endian[y0::dy, x0::dx]
        if sub.size == 0:
            continue
        for row in sub:
            raw += b"\0" + row.tobytes()
    compressed = zlib.compress(bytes(raw), 9)
    idats = b"".join(
        _png_chunk(b"IDAT", compressed[i : i + idat_size]) for i in range(0, len(compressed), idat_size)
    )
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + idats + _png_chunk(b"IEND", b"")


def flat_png(width: int, height: int) -> bytes:
    """A valid RGB PNG of ``width`` x ``height`` that compresses to almost nothing (written row by row,
    so a maximum-pixel image never exists in memory here either)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\0" + bytes([90, 140, 200]) * width
    compressed = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", compressed)
        + _png_chunk(b"IEND", b"")
    )


def png_with_raw_rows(width: int, height: int, raw: bytes) -> bytes:
    """An 8-bit greyscale PNG whose inflated image data is exactly ``raw`` (valid CRCs and zlib):
    for data a decoder must refuse although every checksum holds (bad filter bytes, too few bytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )
