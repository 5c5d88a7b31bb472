"""Checks a query image before it reaches Serving: size, format, pixel count (from the header), decodability.

Policy (documented in gateway/README.md):
- Only JPEG, PNG, GIF, BMP and WebP are accepted (Pillow is restricted to those parsers, so exotic
  decoders never see untrusted bytes).
- The pixel count is read from the header by Pillow's lazy ``open`` and checked BEFORE anything is
  decoded: a decompression bomb costs a few hundred bytes of parsing, not gigabytes of memory.
- The pixels of an image passed through are decoded once, by the model graph, not here as well
  (checking them was a search's largest cost of our own: 0.4 ms of CPU for a 144x144 JPEG). When
  Serving rejects an image, :func:`explain_undecodable` checks every byte of it to say precisely what
  is wrong (truncated, corrupt) instead of repeating the graph's terse error. That check
  (``prepare_image(..., decode=True)``, the default) is done in the cheapest way the format allows: PNG is checked as a stream (every chunk's CRC, the zlib stream inflated in 1 MiB
  steps, every row's filter byte: as strict as a decode, without holding the frame); JPEG is decoded
  in DCT-scaled "draft" mode (every byte read, 1/8 of the pixels); GIF, BMP and WebP are decoded.
- Decodes that hold a frame reserve their memory (estimated per format, see :func:`decode_cost`)
  from a :class:`DecodeBudget` shared by all requests (``--max-decode-bytes-in-flight``), so memory is
  bounded by configuration, not by how many large images happen to arrive at once.
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

import collections
import io
import math
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from cbir.errors import InvalidInput, ResourceExhausted
from gateway import metrics

ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
# BMP modes that tf.io.decode_bmp handles correctly (palette BMPs decode as grey indices, 1-bit fails).
_TF_BMP_MODES = frozenset({"RGB", "RGBA", "L"})

MIB = 1024 * 1024

# Peak memory of decoding an image, per pixel of its header size, on top of the encoded bytes:
# measured with Pillow 13 / libwebp 1.6 on 6000x6000 and 3000x3000 images (extra peak RSS of one
# check in a fresh process; gateway/README.md, "Memory"). Pillow holds RGB as 4 bytes a pixel and
# palette images as 1; its WebP decoder holds four copies of an RGBA frame. Baseline JPEG is decoded
# at 1/8 scale; progressive JPEG is costed from its components (see decode_cost). Still PNGs are not
# decoded at all (check_png_stream), only re-encoded APNG frames are.
_DECODE_BYTES_PER_PIXEL = {"PNG": 4.0, "JPEG": 0.25, "GIF": 1.1, "BMP": 4.0, "WEBP": 16.5}
# Re-encoding adds the RGB copy and the PNG being written (measured: 5-8 bytes a pixel in all).
_REENCODE_EXTRA_BYTES_PER_PIXEL = 4.5
# libjpeg keeps every DCT coefficient (2 bytes per sample of each component) of a progressive JPEG.
_COEFFICIENT_BYTES = 2

# 6000x4000 (24 Mpx) is the largest photo common cameras and phones write by default; the model sees
# the image resized to its input size (e.g. 224x224), so more pixels only cost memory and CPU.
DEFAULT_MAX_PIXELS = 25_000_000
# Pillow warns above Image.MAX_IMAGE_PIXELS and refuses to open twice that; the gateway's limit stays
# at or below it, so its own check (with its own message) always decides. The global is left alone.
PILLOW_BOMB_LIMIT = Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits (checked before any pixel is decoded) and the memory decodes may hold at once."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Shared by all concurrent requests; a decode whose estimate exceeds it is refused. 400 MiB admits
    # one maximum-size WebP (the costliest format, 393 MiB) or five 24 Mpx progressive JPEGs at once.
    max_decode_bytes_in_flight: int = 400 * MIB


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


class DecodeBudget:
    """Bytes that image decodes may hold at once, handed out first come, first served.

    A decode whose estimate exceeds the whole budget is refused, so peak decode memory never
    exceeds ``capacity``.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"the decode budget must be at least 1 byte, got {capacity}")
        self.capacity = capacity
        self._reserved = 0
        self._waiting: collections.deque[object] = collections.deque()
        self._changed = threading.Condition()

    @property
    def reserved(self) -> int:
        return self._reserved

    @contextmanager
    def reserve(self, nbytes: int, timeout: float | None = None) -> Iterator[None]:
        """Holds ``nbytes`` for the block; ResourceExhausted if it exceeds the budget or ``timeout`` passes."""
        share = max(0, math.ceil(nbytes))
        if share > self.capacity:
            raise ResourceExhausted(
                f"decoding this image takes an estimated {_size(share)}, more than the gateway's "
                f"budget of {_size(self.capacity)} for decodes (--max-decode-bytes-in-flight); "
                "send fewer pixels (or a JPEG or PNG, which cost less to check)"
            )
        if share == 0:
            yield
            return
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            admitted = self._changed.wait_for(
                lambda: self._waiting[0] is ticket and self._reserved + share <= self.capacity, timeout
            )
            self._waiting.remove(ticket)
            if admitted:
                self._reserved += share
                metrics.DECODE_BYTES_IN_FLIGHT.set(self._reserved)
            # The next in line may fit now (or may have been waiting behind this one).
            self._changed.notify_all()
        if not admitted:
            raise ResourceExhausted(
                f"the gateway is busy decoding other large images ({_size(self._reserved)} of "
                f"{_size(self.capacity)} in use, --max-decode-bytes-in-flight); retry, or send a smaller image"
            )
        try:
            yield
        finally:
            with self._changed:
                self._reserved -= share
                metrics.DECODE_BYTES_IN_FLIGHT.set(self._reserved)
                self._changed.notify_all()


def _size(nbytes: int) -> str:
    return f"{nbytes / MIB:.0f} MiB" if nbytes >= 10 * MIB else f"{nbytes} bytes"


def prepare_image(
    data: bytes,
    limits: ImageLimits,
    budget: DecodeBudget | None = None,
    timeout: float | None = None,
    *,
    decode: bool = True,
) -> PreparedImage:
    """Validates ``data`` and returns the bytes to embed. Raises InvalidInput or ResourceExhausted.

    Decodes that hold a frame wait up to ``timeout`` seconds for their share of ``budget``. Without
    ``decode``, an image passed through is checked from its header only (its pixels are left to the
    model graph; see the module docstring); animated images and BMP variants are still re-encoded.
    """
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
    except Image.DecompressionBombError as exc:
        # Pillow's own guard (at twice Image.MAX_IMAGE_PIXELS) fired before ours could: same answer.
        raise ResourceExhausted(
            f"image is larger than the gateway's limit of {limits.max_pixels} pixels "
            f"(--max-image-pixels; {exc}); downscale it"
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
        budget = budget or DecodeBudget(max(1, limits.max_decode_bytes_in_flight))
        if animated:
            return _reencode(image, fmt, "animated: first frame only", budget, timeout)
        if fmt == "BMP" and image.mode not in _TF_BMP_MODES:
            reason = f"{image.mode} BMP is not decoded correctly by the model graph"
            return _reencode(image, fmt, reason, budget, timeout)
        mode = image.mode
        if decode and fmt == "PNG":
            check_png_stream(data)
        elif decode:
            with budget.reserve(decode_cost(image), timeout):
                _decode_fully(image, fmt, draft=fmt == "JPEG")
    return PreparedImage(data, fmt, width, height, mode, reencoded=False)


def explain_undecodable(
    data: bytes, limits: ImageLimits, budget: DecodeBudget | None = None, timeout: float | None = None
) -> str | None:
    """Why an image that passed ``prepare_image(..., decode=False)`` cannot be decoded, from the full
    check (None when it passes: the model rejected the image for another reason)."""
    try:
        prepare_image(data, limits, budget, timeout)
    except InvalidInput as exc:
        return exc.message
    except ResourceExhausted:
        return None  # no room to check it now: the model's own error stands
    return None


def decode_cost(image: Image.Image) -> int:
    """Estimated peak bytes of checking ``image`` (opened, not loaded) by decoding it."""
    width, height = image.size
    cost = width * height * _DECODE_BYTES_PER_PIXEL.get(image.format or "", 4.0)
    layers = getattr(image, "layer", None)
    if image.format == "JPEG" and image.info.get("progressive") and layers:
        # (id, horizontal sampling, vertical sampling, table) per component, as Pillow reads them.
        h_max, v_max = max(c[1] for c in layers), max(c[2] for c in layers)
        samples = sum(width * height * c[1] * c[2] / (h_max * v_max) for c in layers)
        cost += samples * _COEFFICIENT_BYTES
    return math.ceil(cost)


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


def _reencode(
    image: Image.Image, fmt: str, reason: str, budget: DecodeBudget, timeout: float | None
) -> PreparedImage:
    extra = image.size[0] * image.size[1] * _REENCODE_EXTRA_BYTES_PER_PIXEL
    cost = decode_cost(image) + math.ceil(extra)
    with budget.reserve(cost, timeout):
        image.seek(0)
        _decode_fully(image, fmt)
        frame = image.convert("RGB")
        buffer = io.BytesIO()
        # Fast zlib level: this PNG lives for one RPC; size matters less than latency.
        frame.save(buffer, format="PNG", compress_level=1)
    return PreparedImage(
        buffer.getvalue(), fmt, frame.width, frame.height, image.mode, reencoded=True, reason=reason
    )


# --------------------------------------------------------------------------- PNG as a stream

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
# Adam7 passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_STEP = MIB


def check_png_stream(data: bytes) -> None:
    """Raises InvalidInput unless ``data`` is a complete, uncorrupted PNG; holds at most ~1 MiB of pixels.

    Checks what a decoder would trip over: every chunk's length and CRC, IHDR's fields, that IDAT
    inflates without a zlib error into at least the bytes the image needs, and that every row starts
    with a valid filter type (0-4). Pixel values themselves cannot be invalid.
    """
    rows: _PngRows | None = None
    inflater = zlib.decompressobj()
    view = memoryview(data)
    pos = len(_PNG_SIGNATURE)
    while True:
        if pos + 12 > len(data):
            raise _png_error("is truncated (it ends before its IEND chunk)")
        length, kind = struct.unpack_from(">I4s", data, pos)
        body_end = pos + 8 + length
        if body_end + 4 > len(data):
            raise _png_error(f"is truncated (its {_chunk_name(kind)} chunk needs {length} bytes)")
        body = view[pos + 8 : body_end]
        (crc,) = struct.unpack_from(">I", data, body_end)
        if zlib.crc32(body, zlib.crc32(kind)) != crc:
            raise _png_error(f"is corrupt (CRC mismatch in its {_chunk_name(kind)} chunk)")
        if kind == b"IHDR":
            rows = _PngRows.from_header(bytes(body))
        elif kind == b"IDAT":
            if rows is None:
                raise _png_error("is corrupt (image data before the header)")
            _inflate(inflater, body, rows)
        elif kind == b"IEND":
            if rows is not None:
                _inflate(inflater, b"", rows)  # whatever zlib still holds
            break
        pos = body_end + 4
    if rows is None:
        raise _png_error("has no IHDR header")
    if not rows.complete:
        raise _png_error(f"is truncated (its image data ends after {rows.seen} of {rows.total} bytes)")


def _inflate(inflater: zlib._Decompress, compressed: memoryview | bytes, rows: _PngRows) -> None:
    pending = compressed
    while not rows.complete and not inflater.eof:
        try:
            out = inflater.decompress(pending, _INFLATE_STEP)
        except zlib.error as exc:
            raise _png_error(f"is corrupt (its image data does not inflate: {exc})") from None
        rows.feed(out)
        pending = inflater.unconsumed_tail
        # Output capped at the step may leave more in zlib's state even when all input was taken.
        if not pending and len(out) < _INFLATE_STEP:
            return


def _png_error(what: str) -> InvalidInput:
    return InvalidInput(f"PNG image cannot be decoded: it {what}")


def _chunk_name(kind: bytes) -> str:
    return kind.decode("latin-1") if kind.isalpha() else kind.hex()


class _PngRows:
    """Counts inflated PNG bytes against the image's rows and checks each row's filter-type byte."""

    def __init__(self, passes: list[tuple[int, int]]):
        self.passes = passes  # (rows, bytes per row including the filter byte) of each pass
        self.total = sum(r * stride for r, stride in passes)
        self.seen = 0
        self._pass = 0
        self._offset = 0  # bytes of the current pass already seen

    @classmethod
    def from_header(cls, header: bytes) -> _PngRows:
        if len(header) != 13:
            raise _png_error(f"is corrupt (its IHDR chunk has {len(header)} bytes, not 13)")
        width, height, depth, colour, _compression, _filter, interlace = struct.unpack(">IIBBBBB", header)
        if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16) or interlace not in (0, 1):
            raise _png_error(f"is corrupt (colour type {colour}, bit depth {depth}, interlace {interlace})")
        bits = _PNG_CHANNELS[colour] * depth
        if interlace == 0:
            return cls([(height, 1 + (width * bits + 7) // 8)])
        passes = []
        for x0, y0, dx, dy in _ADAM7:
            columns, lines = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
            if columns > 0 and lines > 0:
                passes.append((lines, 1 + (columns * bits + 7) // 8))
        return cls(passes)

    @property
    def complete(self) -> bool:
        return self.seen >= self.total

    def feed(self, out: bytes) -> None:
        data = np.frombuffer(out, dtype=np.uint8)
        start = 0
        while start < len(data) and self._pass < len(self.passes):
            lines, stride = self.passes[self._pass]
            take = min(len(data) - start, lines * stride - self._offset)
            segment = data[start : start + take]
            first = (-self._offset) % stride  # where the next row (its filter byte) begins
            filters = segment[first::stride]
            if filters.size and int(filters.max()) > 4:
                raise _png_error(f"is corrupt (a row has filter type {int(filters.max())}; 0-4 exist)")
            self._offset += take
            self.seen += take
            start += take
            if self._offset == lines * stride:
                self._pass, self._offset = self._pass + 1, 0
