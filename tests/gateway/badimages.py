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
