"""Small generated images (encoded bytes) for tests: distinct colours and patterns per class."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def make_image(seed: int, size: int = 32, fmt: str = "PNG", label: int | None = None) -> bytes:
    """An encoded image; images with the same ``label`` share a base colour, ``seed`` adds noise."""
    rng = np.random.default_rng(seed)
    base = np.array(
        [(label or 0) * 53 % 256, (label or 0) * 97 % 256, (label or 0) * 151 % 256], dtype=np.float32
    )
    noise = rng.normal(0, 25 if label is not None else 80, (size, size, 3))
    pixels = np.clip(base + noise + (0 if label is not None else 128), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()
