"""Dataset splits for training and evaluation: catalogue entries -> paths + integer labels.

A config's ``dataset`` is either one of the original names (bags, bags_40, bags_40_v2, cub: the original
layout under ``<data_dir>/datasets/``), or a path (absolute, or relative to ``<data_dir>/datasets/``) to a
folder-per-class tree (``<root>/<split>/<class>/*.jpg``) or a .csv/.jsonl manifest with a split column.
The readers themselves are cbir/catalogue.py, shared with the reindex CLI.

Unreadable images are skipped with one warning line per file naming its path (a dataset of thousands of
photos usually has a few bad ones, and stopping a long training for them helps nobody); a split left
without any readable image is an error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbir.catalogue import ORIGINAL_DATASETS, CatalogueEntry, read_catalogue
from cbir.errors import InvalidInput
from trainer.config import DataDirs

log = logging.getLogger(__name__)

# First bytes of the formats tf.io.decode_image reads; anything else cannot be decoded.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF87a", b"GIF89a", b"BM")


def looks_like_image(head: bytes) -> bool:
    """True when ``head`` (the first bytes of a file) starts like a JPEG/PNG/GIF/BMP/WebP image."""
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


@dataclass(frozen=True)
class Split:
    """The images of one split: parallel arrays, plus the class names shared by every split."""

    name: str
    ids: list[str]
    paths: list[str]
    labels: np.ndarray  # int64 class ids into class_names
    class_names: list[str]
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def label_name(self, label: int) -> str:
        return self.class_names[int(label)]


def _natural_key(text: str):
    # Original pids are integers written as strings: sort "10" after "9".
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def dataset_source(dataset: str, dirs: DataDirs) -> tuple[Path, str, str | None]:
    """(source, layout, original dataset name) for a config's ``dataset`` value."""
    if dataset in ORIGINAL_DATASETS:
        return dirs.root, "original", dataset
    path = Path(dataset).expanduser()
    if not path.is_absolute():
        path = dirs.datasets / path
    if not path.exists():
        raise InvalidInput(
            f"dataset {dataset!r}: {path} does not exist (use one of {', '.join(ORIGINAL_DATASETS)} "
            "for the original layout, or a folder-per-class tree / manifest path)"
        )
    return path, "manifest" if path.is_file() else "folders", None


def read_entries(dataset: str, dirs: DataDirs, split: str) -> list[CatalogueEntry]:
    source, layout, name = dataset_source(dataset, dirs)
    return read_catalogue(source, layout=layout, split=split, dataset=name)


def check_images(entries: Sequence[CatalogueEntry]) -> tuple[list[CatalogueEntry], list[str]]:
    """Keeps entries whose file exists and starts like an image; returns (kept, messages for the rest)."""
    kept, problems = [], []
    for entry in entries:
        try:
            with open(entry.path, "rb") as fh:
                head = fh.read(16)
        except OSError as exc:
            problems.append(f"{entry.path}: cannot read ({exc.strerror or exc})")
            continue
        if not head:
            problems.append(f"{entry.path}: empty file")
        elif not looks_like_image(head):
            problems.append(f"{entry.path}: not a JPEG/PNG/GIF/BMP/WebP image")
        else:
            kept.append(entry)
    return kept, problems


def load_splits(dataset: str, dirs: DataDirs, splits: Sequence[str] = ("train", "test")) -> dict[str, Split]:
    """Reads ``splits`` with one label -> id mapping over all of them (sorted, numbers numerically)."""
    raw = {name: read_entries(dataset, dirs, name) for name in splits}
    class_names = sorted({e.label for entries in raw.values() for e in entries}, key=_natural_key)
    index = {name: i for i, name in enumerate(class_names)}
    result = {}
    for name, entries in raw.items():
        kept, problems = check_images(entries)
        for problem in problems:
            log.warning("skipping unreadable image %s", problem)
        if not kept:
            raise InvalidInput(
                f"dataset {dataset!r}, split {name!r}: no readable image ({len(entries)} listed)"
            )
        result[name] = Split(
            name=name,
            ids=[e.id for e in kept],
            paths=[e.path for e in kept],
            labels=np.array([index[e.label] for e in kept], dtype=np.int64),
            class_names=class_names,
            skipped=problems,
        )
    return result
