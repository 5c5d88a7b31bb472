"""The second real-photo dataset's builder: a Qt resource file read back, split into train and test."""

from __future__ import annotations

import struct
import zlib

import pytest

from cbir.errors import NotFound
from trainer import gcompris_photos


def _name(text: str) -> bytes:
    encoded = text.encode("utf-16-be")
    return struct.pack(">HI", len(text), 0) + encoded


def write_rcc(path, folder: str, files: dict[str, bytes], compress: set[str]) -> None:
    """A version-2 .rcc: root -> folder -> files (the layout Qt's rcc tool writes)."""
    names = b""
    offsets = {}
    for text in [folder, *files]:
        offsets[text] = len(names)
        names += _name(text)
    payloads = b""
    data_offsets = {}
    for name, content in files.items():
        blob = struct.pack(">I", len(content)) + zlib.compress(content) if name in compress else content
        data_offsets[name] = len(payloads)
        payloads += struct.pack(">I", len(blob)) + blob
    entries = [
        struct.pack(">IHII", 0, 2, 1, 1) + bytes(8),  # root: 1 child at index 1
        struct.pack(">IHII", offsets[folder], 2, len(files), 2) + bytes(8),
    ]
    for name in files:
        flags = 1 if name in compress else 0
        entries.append(struct.pack(">IHHHI", offsets[name], flags, 0, 0, data_offsets[name]) + bytes(8))
    tree = b"".join(entries)
    header_size = 20
    tree_at, data_at = header_size, header_size + len(tree)
    names_at = data_at + len(payloads)
    path.write_bytes(b"qres" + struct.pack(">IIII", 2, tree_at, data_at, names_at) + tree + payloads + names)


def test_reads_stored_and_zlib_resources(tmp_path):
    files = {"a.webp": b"RIFF-a" * 10, "b.webp": b"RIFF-b" * 10, "notes.txt": b"hello"}
    write_rcc(tmp_path / "x.rcc", "images", files, compress={"b.webp"})
    assert dict(gcompris_photos.read_rcc(tmp_path / "x.rcc")) == {f"/images/{k}": v for k, v in files.items()}
    (tmp_path / "bad.rcc").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a Qt resource file"):
        list(gcompris_photos.read_rcc(tmp_path / "bad.rcc"))


def test_builds_a_folder_per_class_split(tmp_path, monkeypatch, capsys):
    rcc_dir = tmp_path / "rcc"
    rcc_dir.mkdir()
    photos = {f"p{i}.webp": bytes([i]) * 20 for i in range(8)}
    write_rcc(rcc_dir / "cats.rcc", "images", {**photos, "README": b"x"}, compress=set())
    # The real layout nests the folders deeper; any path containing /images/ matches here.
    monkeypatch.setattr(gcompris_photos, "CLASSES", {"things": ("cats.rcc", ("images",))})
    monkeypatch.setattr(
        gcompris_photos,
        "read_rcc",
        lambda p, read=gcompris_photos.read_rcc: ((f"/x{path}", data) for path, data in read(p)),
    )
    counts = gcompris_photos.build(tmp_path / "out", rcc_dir)
    assert counts == {"things": (6, 2)}
    assert sorted(p.name for p in (tmp_path / "out" / "test" / "things").iterdir()) == ["p3.webp", "p7.webp"]
    assert (tmp_path / "out" / "train" / "things" / "p0.webp").read_bytes() == photos["p0.webp"]
    with pytest.raises(NotFound, match="not found"):
        gcompris_photos.build(tmp_path / "out2", tmp_path / "missing")
    assert gcompris_photos.main([str(tmp_path / "out2"), "--rcc-dir", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cats.rcc not found: apt-get install gcompris-qt-data" in err
