"""Checks a query image before it reaches Serving: size, format, pixel count (from the header), decodability.

Policy (documented in gateway/README.md):
- Only JPEG, PNG, GIF, BMP and WebP are accepted (Pillow is restricted to those parsers, so exotic
  decoders never see untrusted bytes).
- The pixel count is read from the header by Pillow's lazy ``open`` and checked BEFORE anything is
  decoded: a decompression bomb costs a few hundred bytes of parsing, not gigabytes of memory.
- The image is then decoded once by Pillow (JPEG in DCT-scaled "draft" mode, which still reads every
  byte but decodes at 1/8 scale) so that truncated or corrupt files get a precise INVALID_ARGUMENT
  here instead of an opaque error from inside the model graph.
- Images the model graph decodes itself (``tf.io.decode_image``: JPEG incl. greyscale and CMYK, PNG
  incl. 16-bit, palette and alpha, still GIF, WebP, 24/32-bit and greyscale BMP) are passed on
  byte for byte: the query is then embedded exactly like the same file during reindexing, so a
  catalogue image used as a query gets exactly its catalogue vector. Alpha is dropped by the graph
  (not composited), as for catalogue images.
- Animated images (GIF, APNG, WebP) are reduced to their FIRST frame, re-encoded as PNG: TF would
  decode every frame of a GIF before keeping the first, which is a bomb of its own.
- Palette and 1-bit BMPs, which TF decodes wrongly or not at all, are re-encoded as PNG (RGB).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from cbir.errors import InvalidInput, ResourceExhausted

ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
# BMP modes that tf.io.decode_bmp handles correctly (palette BMPs decode as grey indices, 1-bit fails).
_TF_BMP_MODES = frozenset({"RGB", "RGBA", "L"})

# Pillow's own bomb guard would warn or raise at its global limit; ours is per-gateway and checked
# first, so Pillow's must never fire before it (and never be a process-wide mutable surprise).
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits; both are checked before any pixel is decoded."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class PreparedImage:
    """What will be sent to Serving, and what was done to get it."""

    data: bytes
    format: str
    width: int
    height: int
    mode: str
    reencoded: bool
    # Why the bytes were re-encoded ("" when passed through unchanged).
    reason: str = ""


def prepare_image(data: bytes, limits: ImageLimits) -> PreparedImage:
    """Validates ``data`` and returns the bytes to embed. Raises InvalidInput or ResourceExhausted."""
    if not data:
        raise InvalidInput("image is empty (0 bytes); send an encoded JPEG, PNG, GIF, BMP or WebP")
    if len(data) > limits.max_bytes:
        raise ResourceExhausted(
            f"image is {len(data)} bytes, more than the gateway's limit of {limits.max_bytes} bytes "
            "(--max-image-bytes); downscale or recompress it"
        )
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidInput(
            f"image data ({len(data)} bytes, starting {data[:8].hex()}) is not a JPEG, PNG, GIF, BMP or "
            "WebP image, or its header is corrupt"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidInput(f"image header is corrupt: {exc}") from None
    with image:
        width, height = image.size
        fmt = image.format or "unknown"
        if width <= 0 or height <= 0:
            raise InvalidInput(f"{fmt} image has an empty size {width}x{height}")
        pixels = width * height
        if pixels > limits.max_pixels:
            raise ResourceExhausted(
                f"{fmt} image is {width}x{height} = {pixels} pixels, more than the gateway's limit of "
                f"{limits.max_pixels} (--max-image-pixels); downscale it"
            )
        try:
            animated = bool(getattr(image, "is_animated", False))
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise InvalidInput(f"{fmt} image is corrupt (reading its frames failed: {exc})") from None
        if animated:
            return _reencode(image, fmt, "animated: first frame only")
        if fmt == "BMP" and image.mode not in _TF_BMP_MODES:
            return _reencode(image, fmt, f"{image.mode} BMP is not decoded correctly by the model graph")
        mode = image.mode
        _decode_fully(image, fmt, draft=fmt == "JPEG")
    return PreparedImage(data, fmt, width, height, mode, reencoded=False)


def _decode_fully(image: Image.Image, fmt: str, *, draft: bool = False) -> None:
    """Decodes every byte of the image data, so truncation and corruption are caught here."""
    if draft:
        # DCT scaling: all entropy-coded data is still read and checked, at 1/8 of the pixel work.
        image.draft(image.mode, (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
    try:
        with warnings.catch_warnings():
            # Pillow warns (instead of failing) on some corrupt EXIF/ICC data; those images decode.
            warnings.simplefilter("ignore")
            image.load()
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise InvalidInput(f"{fmt} image cannot be decoded (truncated or corrupt): {exc}") from None


def _reencode(image: Image.Image, fmt: str, reason: str) -> PreparedImage:
    image.seek(0)
    _decode_fully(image, fmt)
    frame = image.convert("RGB")
    buffer = io.BytesIO()
    # Fast zlib level: this PNG lives for one RPC; size matters less than latency.
    frame.save(buffer, format="PNG", compress_level=1)
    return PreparedImage(
        buffer.getvalue(), fmt, frame.width, frame.height, image.mode, reencoded=True, reason=reason
    )
