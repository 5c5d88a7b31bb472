"""Tiny generated datasets in the original layout (CSV splits + images) for trainer tests."""

from __future__ import annotations

from pathlib import Path

from tests.support.images import make_image

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
    rows = {"train": [], "test": []}
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
