"""Demo data: a small folder-per-class catalogue of PNGs, from the user's images or Fashion-MNIST.

Sources, in order: ``--data <folder-per-class catalogue>`` when given; otherwise Fashion-MNIST from a
local copy (the Debian package ``dataset-fashion-mnist``, installed on the fly where apt is available
and we run as root; or the Keras cache), or a download when online. The result is always
``<out>/{train,test}/<class>/<image>``: the train split is the catalogue that gets indexed, the test
split holds the queries (as the original ``embed.py`` / ``evaluation.py`` do).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cbir.errors import InvalidInput, NotReady

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
KERAS_DIR = Path.home() / ".keras" / "datasets" / "fashion-mnist"
DOWNLOAD_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Fashion-MNIST's class ids, as folder names.
CLASS_NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"}
MARKER = "demo_data.json"

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoData:
    """A prepared catalogue: ``root/train/<class>/*`` (indexed) and ``root/test/<class>/*`` (queries)."""

    root: Path
    source: str
    classes: tuple[str, ...]
    train_count: int
    test_count: int

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def test_dir(self) -> Path:
        return self.root / "test"


def prepare_demo_data(
    out: Path,
    *,
    data: Path | None = None,
    train_per_class: int,
    test_per_class: int,
    seed: int = 0,
    install_package: bool = True,
    allow_download: bool = True,
    log: Log = print,
) -> DemoData:
    """Writes the demo catalogue into ``out`` (reused when already built with the same settings)."""
    settings = {
        "data": str(Path(data).resolve()) if data else None,
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "seed": seed,
    }
    marker = out / MARKER
    if marker.exists():
        try:
            saved = json.loads(marker.read_text())
        except ValueError:
            saved = {}
        if saved.get("settings") == settings:
            log(f"reusing the demo catalogue in {out}")
            return _described(out, saved)
    if out.exists():
        shutil.rmtree(out)
    staging = out.with_name(f".{out.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    if data is not None:
        source = _subset_of_folders(Path(data), staging, train_per_class, test_per_class, seed)
    else:
        gz_dir = find_fashion_mnist(install_package=install_package, allow_download=allow_download, log=log)
        _write_fashion_mnist(gz_dir, staging, train_per_class, test_per_class, seed)
        source = f"Fashion-MNIST ({gz_dir})"
    summary = {"settings": settings, "source": source}
    (staging / MARKER).write_text(json.dumps(summary, indent=2))
    os.replace(staging, out)
    return _described(out, summary)


def _described(root: Path, summary: dict) -> DemoData:
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())

    def count(split: str) -> int:
        return sum(1 for p in (root / split).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)

    return DemoData(root, summary["source"], tuple(classes), count("train"), count("test"))


# --------------------------------------------------------------------------- Fashion-MNIST


def _has_files(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FILES.values() for name in pair)


def find_fashion_mnist(
    *, install_package: bool = True, allow_download: bool = True, log: Log = print
) -> Path:
    """A folder with the four original ``.gz`` files; installs or downloads them if it can."""
    for folder in (DEBIAN_DIR, KERAS_DIR):
        if _has_files(folder):
            return folder
    if install_package and _can_apt_install():
        log(f"installing the Debian package {DEBIAN_PACKAGE} (Fashion-MNIST, 30 MB)")
        if _apt_install(DEBIAN_PACKAGE) and _has_files(DEBIAN_DIR):
            return DEBIAN_DIR
    if allow_download:
        log(f"downloading Fashion-MNIST into {KERAS_DIR}")
        try:
            _download(KERAS_DIR)
            return KERAS_DIR
        except OSError as exc:
            log(f"download failed: {exc}")
    raise NotReady(
        "no demo data: Fashion-MNIST is not installed and could not be installed or downloaded. Either "
        f"`sudo apt-get install {DEBIAN_PACKAGE}` (files in {DEBIAN_DIR}), put the four .gz files in "
        f"{KERAS_DIR}, or run with DATA=<folder with one sub-folder of images per class>."
    )


def _can_apt_install() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def _apt_install(package: str) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", package]
    if subprocess.run(command, env=env, capture_output=True).returncode == 0:
        return True
    # A fresh machine often has empty package lists.
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
    return subprocess.run(command, env=env, capture_output=True).returncode == 0


def _download(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for pair in FILES.values():
        for name in pair:
            target = folder / name
            if target.is_file():
                continue
            partial = target.with_suffix(".part")
            with (
                urllib.request.urlopen(DOWNLOAD_URL + name, timeout=30) as response,
                open(partial, "wb") as out,
            ):
                shutil.copyfileobj(response, out)
            os.replace(partial, target)


def read_idx(images_gz: Path, labels_gz: Path) -> tuple[np.ndarray, np.ndarray]:
    """The original IDX files: images [n, 28, 28] uint8 (offset 16), labels [n] uint8 (offset 8)."""
    with gzip.open(images_gz, "rb") as handle:
        images = np.frombuffer(handle.read(), np.uint8, offset=16)
    with gzip.open(labels_gz, "rb") as handle:
        labels = np.frombuffer(handle.read(), np.uint8, offset=8)
    if images.size != labels.size * 28 * 28:
        raise InvalidInput(
            f"{images_gz} and {labels_gz} disagree: {images.size} pixels for {labels.size} labels"
        )
    return images.reshape(-1, 28, 28), labels


def balanced_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` random indices of every label (fewer if a label has fewer), sorted."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(rng.choice(members, size=min(per_class, members.size), replace=False))
    return np.sort(np.concatenate(chosen))


def _write_fashion_mnist(
    gz_dir: Path, out: Path, train_per_class: int, test_per_class: int, seed: int
) -> None:
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = read_idx(gz_dir / FILES[split][0], gz_dir / FILES[split][1])
        for index in balanced_indices(labels, per_class, seed):
            folder = out / split / CLASS_NAMES[labels[index]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index], mode="L").save(folder / f"{split}-{index:05d}.png")


# --------------------------------------------------------------------------- a user's catalogue


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _subset_of_folders(data: Path, out: Path, train_per_class: int, test_per_class: int, seed: int) -> str:
    """Links a balanced subset of ``data`` (``<split>/<class>/*`` or ``<class>/*``) into ``out``."""
    if not data.is_dir():
        raise InvalidInput(
            f"DATA={data} is not a folder (expected <class>/<image> or <split>/<class>/<image>)"
        )
    splits = {p.name: p for p in _class_dirs(data)}
    if "train" in splits and ("test" in splits or "validation" in splits):
        # An explicit split: queries come from test (or validation), the catalogue from train.
        queries = splits.get("test") or splits["validation"]
        plan = {
            "train": _pick(splits["train"], train_per_class, seed),
            "test": _pick(queries, test_per_class, seed),
        }
    else:
        # No split: a deterministic pick per class, the first test_per_class as queries, the rest indexed.
        plan = {"train": {}, "test": {}}
        for class_dir in _class_dirs(data):
            images = _shuffled(_images_in(class_dir), seed)
            plan["test"][class_dir.name] = images[:test_per_class]
            plan["train"][class_dir.name] = images[test_per_class : test_per_class + train_per_class]
    kept = {split: {c: files for c, files in by_class.items() if files} for split, by_class in plan.items()}
    classes = sorted(set(kept["train"]) & set(kept["test"]))
    if len(classes) < 2:
        raise InvalidInput(
            f"DATA={data}: need at least 2 classes with images for both the catalogue and the queries "
            f"(found {len(classes)}); expected sub-folders of images named after their class"
        )
    for split, by_class in kept.items():
        for class_name in classes:
            folder = out / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for image in by_class[class_name]:
                # Symlinks: the catalogue reader follows them; no copy of someone's photos.
                (folder / image.name).symlink_to(image.resolve())
    return f"{data} ({len(classes)} classes)"


def _pick(split_dir: Path, per_class: int, seed: int) -> dict[str, list[Path]]:
    return {c.name: _shuffled(_images_in(c), seed)[:per_class] for c in _class_dirs(split_dir)}


def _shuffled(paths: list[Path], seed: int) -> list[Path]:
    # A stable order that does not depend on the file system: sort by a keyed hash of the name.
    key = str(seed).encode()
    return sorted(paths, key=lambda p: hashlib.sha1(key + p.name.encode()).hexdigest())
