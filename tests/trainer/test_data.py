"""Dataset splits: the original layout, folder-per-class and manifests; unreadable images are reported."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from cbir.errors import InvalidInput
from trainer.config import DataDirs
from trainer.data import load_splits
from trainer.synthetic import CLASS_NAMES, make_image, write_original_dataset


def test_original_layout_gives_one_label_mapping_for_all_splits(tmp_path):
    write_original_dataset(tmp_path, per_class_train=2, per_class_test=1)
    splits = load_splits("bags", DataDirs(tmp_path))
    train, test = splits["train"], splits["test"]
    assert len(train) == 8 and len(test) == 4
    assert train.class_names == test.class_names and set(train.class_names) == set(CLASS_NAMES)
    for split in (train, test):
        for path, label in zip(split.paths, split.labels, strict=True):
            assert f"/{split.label_name(label)}/" in path  # the folder is the class name here
    assert train.ids[0].endswith(".png") and not train.ids[0].startswith("/")


def test_folder_per_class_and_manifest(tmp_path):
    root = tmp_path / "datasets" / "clothes"
    rows = []
    for split in ("train", "test"):
        for label in ("hat", "shoes"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                (folder / f"{i}.png").write_bytes(make_image(i, label=len(label)))
                rows.append(
                    {
                        "id": f"{split}-{label}-{i}",
                        "path": f"clothes/{split}/{label}/{i}.png",
                        "label": label,
                        "split": split,
                    }
                )
    folders = load_splits("clothes", DataDirs(tmp_path))
    assert folders["train"].class_names == ["hat", "shoes"] and len(folders["test"]) == 4
    manifest = tmp_path / "datasets" / "items.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_manifest = load_splits(str(manifest), DataDirs(tmp_path))
    np.testing.assert_array_equal(by_manifest["train"].labels, folders["train"].labels)


def test_broken_and_missing_images_are_skipped_with_their_path(tmp_path, caplog):
    base = write_original_dataset(tmp_path, per_class_train=2, per_class_test=1)
    broken = base / "images" / "tote" / "train_0.png"
    broken.write_bytes(b"this is not an image")
    (base / "images" / "clutch" / "train_1.png").unlink()
    with caplog.at_level(logging.WARNING):
        train = load_splits("bags", DataDirs(tmp_path), ("train",))["train"]
    assert len(train) == 6 and len(train.skipped) == 2
    assert str(broken) in caplog.text and "clutch/train_1.png" in caplog.text


def test_unknown_dataset_and_empty_split_are_clear_errors(tmp_path):
    with pytest.raises(InvalidInput, match="does not exist"):
        load_splits("no_such_dataset", DataDirs(tmp_path))
    base = write_original_dataset(tmp_path, per_class_train=1, per_class_test=1)
    for image in (base / "images").rglob("test_*.png"):
        image.write_bytes(b"")
    with pytest.raises(InvalidInput, match="split 'test': no readable image"):
        load_splits("bags", DataDirs(tmp_path))
