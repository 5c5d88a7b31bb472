"""Query image checks: limits from the header, formats, corruption, animated / CMYK / palette handling."""

import io

import numpy as np
import pytest
from PIL import Image

from cbir.errors import InvalidInput, ResourceExhausted
from gateway.images import ImageLimits, prepare_image
from tests.gateway import badimages as bad

LIMITS = ImageLimits(max_bytes=200_000, max_pixels=1_000_000)


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
