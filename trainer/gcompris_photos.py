"""A second real-photo dataset, built offline from the photos Debian's gcompris-qt-data package ships.

`python -m trainer.gcompris_photos OUT` reads the Qt resource files (.rcc) of GCompris' categorization
and monument-exploration activities and writes ``OUT/{train,test}/<class>/*.webp``: real photos
(about 320x240; GPL/CC licensed, see the package's copyright file) of fishes, monuments, renewable
energy installations and tools, every fourth photo of a class (by name) a test photo. It checks that
the default recipe for a user's catalogue is not tuned to clothing-small alone (trainer/README.md).
Install the package first: ``apt-get install gcompris-qt-data`` (or pass ``--rcc-dir`` to the folder
of an extracted .deb).
"""

from __future__ import annotations

import argparse
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

from cbir.cli import run_main
from cbir.errors import NotFound

RCC_DIR = Path("/usr/share/gcompris-qt/rcc")
# class -> (resource file, folders inside it whose photos are of that class)
CLASSES = {
    "fishes": ("categorization.rcc", ("images/fishes",)),
    "tools": ("categorization.rcc", ("images/tools",)),
    "renewable_energy": ("categorization.rcc", ("images/renewable",)),
    "monuments": ("categorization.rcc", ("images/monuments",)),
}
PHOTO_SUFFIXES = (".webp", ".jpg", ".jpeg", ".png")
TEST_EVERY = 4


def read_rcc(path: Path) -> Iterator[tuple[str, bytes]]:
    """(resource path, bytes) of every file in a Qt .rcc (format versions 1-3; zlib or stored)."""
    data = path.read_bytes()
    if data[:4] != b"qres":
        raise ValueError(f"{path} is not a Qt resource file")
    version, tree, payloads, names = struct.unpack(">IIII", data[4:20])
    entry_size = 14 if version == 1 else 22  # version 2 added an 8-byte modification time

    def name_at(offset: int) -> str:
        length = struct.unpack(">H", data[names + offset : names + offset + 2])[0]
        start = names + offset + 6  # after the length and a 4-byte hash
        return data[start : start + 2 * length].decode("utf-16-be")

    def walk(index: int, prefix: str) -> Iterator[tuple[str, bytes]]:
        at = tree + index * entry_size
        name_offset, flags = struct.unpack(">IH", data[at : at + 6])
        name = name_at(name_offset) if index else ""
        here = f"{prefix}/{name}" if name else prefix
        if flags & 2:  # a directory: child count, first child
            count, first = struct.unpack(">II", data[at + 6 : at + 14])
            for child in range(first, first + count):
                yield from walk(child, here)
            return
        offset = struct.unpack(">I", data[at + 10 : at + 14])[0]
        size = struct.unpack(">I", data[payloads + offset : payloads + offset + 4])[0]
        payload = data[payloads + offset + 4 : payloads + offset + 4 + size]
        if flags & 1:  # zlib, after the uncompressed size
            payload = zlib.decompress(payload[4:])
        elif flags & 4:
            raise ValueError(f"{path}: zstd-compressed resources are not supported")
        yield here, payload

    yield from walk(0, "")


def build(out: Path, rcc_dir: Path = RCC_DIR) -> dict[str, tuple[int, int]]:
    """Writes the dataset; returns {class: (train photos, test photos)}."""
    counts = {}
    resources: dict[str, list[tuple[str, bytes]]] = {}
    for name, (rcc, folders) in CLASSES.items():
        if rcc not in resources:
            rcc_path = rcc_dir / rcc
            if not rcc_path.is_file():
                raise NotFound(f"{rcc_path} not found: apt-get install gcompris-qt-data, or pass --rcc-dir")
            resources[rcc] = list(read_rcc(rcc_path))
        photos = sorted(
            (path, payload)
            for path, payload in resources[rcc]
            if any(f"/{folder}/" in path for folder in folders) and path.lower().endswith(PHOTO_SUFFIXES)
        )
        split_counts = {"train": 0, "test": 0}
        for i, (path, payload) in enumerate(photos):
            split = "test" if i % TEST_EVERY == TEST_EVERY - 1 else "train"
            target = out / split / name / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(payload)
            split_counts[split] += 1
        counts[name] = (split_counts["train"], split_counts["test"])
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.gcompris_photos", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out", type=Path, help="folder to write <split>/<class>/ into")
    parser.add_argument(
        "--rcc-dir", type=Path, default=RCC_DIR, help=f"folder of the .rcc files (default {RCC_DIR})"
    )
    args = parser.parse_args(argv)
    # Exit 1 on an error, as this script always has.
    return run_main(lambda: _build(args.out, args.rcc_dir), error_exit=1)


def _build(out: Path, rcc_dir: Path) -> int:
    for name, (train, test) in build(out, rcc_dir).items():
        print(f"{name}: {train} train, {test} test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
