"""Shared helpers of the quickstart tests: processes left behind, a small demo catalogue."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quickstart import data
from trainer.synthetic import make_image


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes (not zombies) whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append((int(entry.name), cmdline))
    return found


def generated_catalogue(root: Path, classes: int = 4, train: int = 8, test: int = 3) -> Path:
    """``root/{train,test}/<class>/*.png``: distinct colours per class (for machines without Fashion-MNIST)."""
    for split, count in (("train", train), ("test", test)):
        for label in range(classes):
            folder = root / split / f"class-{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed = label * 1000 + i + (500 if split == "test" else 0)
                (folder / f"{i}.png").write_bytes(make_image(seed, 32, label=label))
    return root


@pytest.fixture
def demo_data_args(tmp_path) -> list[str]:
    """Fashion-MNIST when its Debian package is installed, else a generated catalogue via --data."""
    if all((data.DEBIAN_DIR / name).is_file() for pair in data.FILES.values() for name in pair):
        return ["--no-install"]
    return ["--data", str(generated_catalogue(tmp_path / "generated"))]
