"""Readers for image catalogues and datasets: folder-per-class, the original CSV layout, manifests.

Shared by the trainer (datasets) and the reindex CLI (catalogues), so both accept the same inputs.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbir.errors import InvalidInput

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})

# The original code's dataset names -> (folder under <data_dir>/datasets, CSV file prefix).
ORIGINAL_DATASETS: Mapping[str, tuple[str, str]] = {
    "bags": ("BAGS", "bags"),
    "bags_40": ("BAGS_40", "bags"),
    "bags_40_v2": ("BAGS_40_v2", "bags"),
    "cub": ("CUB_200_2011", "cub"),
}
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class CatalogueEntry:
    """One image of a catalogue: a stable id, where the image is, its class, free attributes."""

    id: str
    path: str
    label: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    split: str | None = None


def read_catalogue(
    source: str | Path,
    *,
    layout: str = "auto",
    split: str | None = None,
    dataset: str | None = None,
) -> list[CatalogueEntry]:
    """Reads a catalogue, sorted by id.

    ``layout``: "folders" (``<root>/<split>/<class>/<image>`` or ``<root>/<class>/<image>``),
    "original" (``source`` is the data dir, ``dataset`` one of :data:`ORIGINAL_DATASETS`),
    "manifest" (a .csv or .jsonl file), or "auto" (manifest for a file, original when ``dataset`` is
    given, else folders). ``split`` keeps only that split (required for "original").
    """
    source = Path(source)
    if layout == "auto":
        layout = "manifest" if source.is_file() else "original" if dataset else "folders"
    if layout == "folders":
        entries = _read_folders(source, split)
    elif layout == "original":
        entries = _read_original(source, dataset, split)
    elif layout == "manifest":
        entries = _read_manifest(source, split)
    else:
        raise InvalidInput(f"unknown catalogue layout {layout!r} (use folders, original or manifest)")
    if not entries:
        where = f" (split {split!r})" if split else ""
        raise InvalidInput(f"catalogue {source} has no images{where}")
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        for dup in ids:
            if dup in seen:
                break
            seen.add(dup)
        raise InvalidInput(f"catalogue {source} has the id {dup!r} more than once")
    return sorted(entries, key=lambda e: e.id)


def read_image_bytes(entry_or_path: CatalogueEntry | str | Path) -> bytes:
    """The encoded bytes of an image file; a missing or unreadable file is an error naming it."""
    path = Path(entry_or_path.path if isinstance(entry_or_path, CatalogueEntry) else entry_or_path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read image {path}: {exc.strerror or exc}") from exc
    if not data:
        raise InvalidInput(f"image file {path} is empty")
    return data


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _read_folders(root: Path, split: str | None) -> list[CatalogueEntry]:
    if not root.is_dir():
        raise InvalidInput(f"catalogue folder {root} does not exist")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    has_splits = bool(subdirs) and all(p.name in SPLITS for p in subdirs)
    if split and not has_splits:
        raise InvalidInput(
            f"{root} has no split folders ({', '.join(SPLITS)}), so split {split!r} cannot be chosen"
        )
    split_dirs = [(p.name, p) for p in subdirs if split in (None, p.name)] if has_splits else [(None, root)]
    if has_splits and not split_dirs:
        raise InvalidInput(f"{root} has no split folder {split!r}")
    entries = []
    for split_name, split_dir in split_dirs:
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for image in sorted(class_dir.iterdir()):
                if _is_image(image):
                    entries.append(
                        CatalogueEntry(
                            id=image.relative_to(root).as_posix(),
                            path=str(image),
                            label=class_dir.name,
                            split=split_name,
                        )
                    )
    return entries


def _read_original(data_dir: Path, dataset: str | None, split: str | None) -> list[CatalogueEntry]:
    if dataset is None or dataset not in ORIGINAL_DATASETS:
        raise InvalidInput(
            f"unknown dataset {dataset!r} for the original layout (known: {', '.join(ORIGINAL_DATASETS)})"
        )
    folder, prefix = ORIGINAL_DATASETS[dataset]
    base = data_dir / "datasets" / folder
    images = base / "images"
    if not images.is_dir():
        raise InvalidInput(f"dataset {dataset!r}: image folder {images} does not exist")
    names = _read_label_names(base, prefix)
    splits = [split] if split else ["train", "test"]
    entries = []
    for split_name in splits:
        csv_path = base / f"{prefix}_{split_name}.csv"
        if not csv_path.is_file():
            raise InvalidInput(f"dataset {dataset!r}: split file {csv_path} does not exist")
        with csv_path.open(newline="") as fh:
            for line_no, row in enumerate(csv.reader(fh), start=1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 2:
                    raise InvalidInput(f"{csv_path}:{line_no}: expected 'pid,relative/path', got {row!r}")
                pid, rel = row[0].strip(), row[1].strip()
                entries.append(
                    CatalogueEntry(
                        id=rel,
                        path=str(images / rel),
                        label=names.get(pid, pid),
                        attributes={"pid": pid},
                        split=split_name,
                    )
                )
    return entries


def _read_label_names(base: Path, prefix: str) -> dict[str, str]:
    """pid -> class name from ``<prefix>_labels.csv`` (or CUB's classes.txt); empty if absent."""
    names: dict[str, str] = {}
    labels_csv = base / f"{prefix}_labels.csv"
    classes_txt = base / "classes.txt"
    if labels_csv.is_file():
        with labels_csv.open(newline="") as fh:
            for row in csv.reader(fh):
                if len(row) >= 2:
                    names[row[0].strip()] = row[1].strip()
    elif classes_txt.is_file():
        for line in classes_txt.read_text().splitlines():
            parts = line.split(maxsplit=1)
            if len(parts) == 2:
                names[parts[0]] = parts[1]
    return names


def _read_manifest(path: Path, split: str | None) -> list[CatalogueEntry]:
    if path.suffix.lower() == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    else:
        raise InvalidInput(f"manifest {path} must be a .csv or .jsonl file")
    entries = []
    for where, row in rows:
        item_id = str(row.get("id") or "").strip()
        location = str(row.get("path") or row.get("uri") or "").strip()
        if not item_id:
            raise InvalidInput(f"{where}: missing 'id'")
        if not location:
            raise InvalidInput(f"{where}: missing 'path' (or 'uri')")
        image = Path(location)
        if not image.is_absolute() and "://" not in location:
            image = path.parent / image
        attributes = row.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise InvalidInput(f"{where}: 'attributes' must be an object")
        row_split = row.get("split") or None
        if split and row_split and row_split != split:
            continue
        entries.append(
            CatalogueEntry(
                id=item_id,
                path=str(image),
                label=str(row.get("label") or ""),
                attributes={str(k): str(v) for k, v in attributes.items()},
                split=row_split,
            )
        )
    return entries


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open() as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise InvalidInput(f"{path}:{line_no}: each line must be a JSON object")
            yield f"{path}:{line_no}", row


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    reserved = {"id", "path", "uri", "label", "split"}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "id" not in reader.fieldnames:
            raise InvalidInput(f"{path}: the header must have an 'id' column (and 'path' or 'uri', 'label')")
        for line_no, row in enumerate(reader, start=2):
            attributes = {k: v for k, v in row.items() if k and k not in reserved and v not in (None, "")}
            yield f"{path}:{line_no}", {**{k: row.get(k) for k in reserved}, "attributes": attributes}
