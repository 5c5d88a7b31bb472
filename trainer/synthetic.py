"""Generated images and tiny datasets, in the original layout (CSV splits + images) and as a
folder-per-class catalogue, with configs at their scale: for tests, benchmarks and smoke runs."""

from __future__ import annotations

import io
from pathlib import Path

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


CLASS_NAMES = ("tote", "clutch", "satchel", "backpack")


def write_original_dataset(
    data_dir: Path,
    *,
    dataset_dir: str = "BAGS",
    per_class_train: int = 4,
    per_class_test: int = 3,
    size: int = 40,
) -> Path:
    """<data_dir>/datasets/<dataset_dir>/ with images/, bags_train.csv, bags_test.csv, bags_labels.csv."""
    base = data_dir / "datasets" / dataset_dir
    images = base / "images"
    rows: dict[str, list[str]] = {"train": [], "test": []}
    seed = 0
    for pid, name in enumerate(CLASS_NAMES, start=1):
        folder = images / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, count in (("train", per_class_train), ("test", per_class_test)):
            for i in range(count):
                seed += 1
                rel = f"{name}/{split}_{i}.png"
                (images / rel).write_bytes(make_image(seed, size=size, label=pid))
                rows[split].append(f"{pid},{rel}")
    for split, lines in rows.items():
        (base / f"bags_{split}.csv").write_text("\n".join(lines) + "\n")
    (base / "bags_labels.csv").write_text(
        "\n".join(f"{pid},{n}" for pid, n in enumerate(CLASS_NAMES, 1)) + "\n"
    )
    return base


# A config at the scale of these datasets: 32x32 inputs, a small CNN, a 16-d head, 6 epochs.
TINY_OVERRIDES = [
    "model.name=small_cnn",
    "model.weights=null",
    "model.embedding_dim=16",
    "model.input.height=32",
    "model.input.width=32",
    "model.crop.height=40",
    "model.crop.width=40",
    "model.batch.P=3",
    "model.fit.epochs=6",
    "model.fit.lr=0.001",
    "checkpoint_frequency=3",
    "loading_threads=2",
]


def write_folder_dataset(
    root: Path, *, classes: int = 4, train: int = 6, test: int = 2, size: int = 48
) -> Path:
    """``root/{train,test}/<class>/*.jpg``: a user's folder-per-class catalogue, one colour per class."""
    for split, count in (("train", train), ("test", test)):
        for label in range(classes):
            folder = root / split / f"class-{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed = 10_000 * label + i + (5_000 if split == "test" else 0)
                (folder / f"{split}-{i}.jpg").write_bytes(
                    make_image(seed, size=size, fmt="JPEG", label=label)
                )
    return root


# The default recipe at a test's scale: 32x32 inputs, 2 views, a 8-d head, 4 steps.
TINY_RECIPE = [
    "model.input.height=32",
    "model.input.width=32",
    "model.crop.height=40",
    "model.crop.width=40",
    "model.finetune.cached_views=2",
    "model.embedding_dim=8",
    "model.fit.epochs=4",
    "checkpoint_frequency=2",
]
