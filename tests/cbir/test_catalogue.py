"""Catalogue readers: the three layouts, their errors, and image reading."""

import json

import pytest

from cbir.catalogue import read_catalogue, read_image_bytes
from cbir.errors import InvalidInput


def touch(path, data=b"\x89PNG fake"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folders_with_splits(tmp_path):
    for split in ("train", "test"):
        for cls in ("hat", "shoes"):
            touch(tmp_path / split / cls / f"{cls}-1.jpg")
    touch(tmp_path / "train" / "hat" / "notes.txt")
    entries = read_catalogue(tmp_path)
    assert len(entries) == 4
    train = read_catalogue(tmp_path, split="train")
    assert [e.id for e in train] == ["train/hat/hat-1.jpg", "train/shoes/shoes-1.jpg"]
    assert {e.label for e in train} == {"hat", "shoes"} and {e.split for e in train} == {"train"}


def test_folders_without_splits(tmp_path):
    touch(tmp_path / "bags" / "a.png")
    touch(tmp_path / "bags" / "b.PNG")
    entries = read_catalogue(tmp_path, layout="folders")
    assert [(e.id, e.label, e.split) for e in entries] == [
        ("bags/a.png", "bags", None),
        ("bags/b.PNG", "bags", None),
    ]
    with pytest.raises(InvalidInput, match="no split folders"):
        read_catalogue(tmp_path, split="train")


def test_original_layout(tmp_path):
    base = tmp_path / "datasets" / "BAGS_40"
    touch(base / "images" / "c1" / "x.jpg")
    touch(base / "images" / "c2" / "y.jpg")
    (base / "bags_train.csv").write_text("1,c1/x.jpg\n")
    (base / "bags_test.csv").write_text("2,c2/y.jpg\n\n")
    (base / "bags_labels.csv").write_text("1,tote\n2,saddle\n")
    train = read_catalogue(tmp_path, dataset="bags_40", split="train")
    assert [(e.id, e.label, e.attributes["pid"]) for e in train] == [("c1/x.jpg", "tote", "1")]
    assert train[0].path == str(base / "images" / "c1" / "x.jpg")
    assert len(read_catalogue(tmp_path, dataset="bags_40")) == 2
    with pytest.raises(InvalidInput, match="unknown dataset"):
        read_catalogue(tmp_path, dataset="shoes", layout="original")


def test_original_layout_bad_row(tmp_path):
    base = tmp_path / "datasets" / "BAGS"
    (base / "images").mkdir(parents=True)
    (base / "bags_train.csv").write_text("1,a.jpg\n7\n")
    with pytest.raises(InvalidInput, match=r"bags_train.csv:2"):
        read_catalogue(tmp_path, dataset="bags", split="train")


def test_manifest_csv_and_jsonl(tmp_path):
    touch(tmp_path / "img" / "a.jpg")
    (tmp_path / "m.csv").write_text("id,path,label,color\nsku-1,img/a.jpg,dress,red\n")
    [entry] = read_catalogue(tmp_path / "m.csv")
    assert entry.id == "sku-1" and entry.label == "dress" and entry.attributes == {"color": "red"}
    assert entry.path == str(tmp_path / "img" / "a.jpg")
    rows = [
        {"id": "a", "uri": "img/a.jpg", "label": "x", "attributes": {"size": 3}},
        {"id": "b", "path": "/abs.jpg"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    entries = read_catalogue(tmp_path / "m.jsonl")
    assert [e.id for e in entries] == ["a", "b"] and entries[0].attributes == {"size": "3"}


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": "a"}\n', "missing 'path'"),
        ('{"path": "x.jpg"}\n', "missing 'id'"),
        ("not json\n", "not valid JSON"),
        ('{"id": "a", "path": "x"}\n{"id": "a", "path": "y"}\n', "more than once"),
    ],
)
def test_manifest_errors_name_the_line(tmp_path, content, message):
    (tmp_path / "m.jsonl").write_text(content)
    with pytest.raises(InvalidInput, match=message):
        read_catalogue(tmp_path / "m.jsonl")


def test_empty_and_missing(tmp_path):
    with pytest.raises(InvalidInput, match="does not exist"):
        read_catalogue(tmp_path / "nope", layout="folders")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no images"):
        read_catalogue(tmp_path / "empty")


def test_read_image_bytes(tmp_path):
    assert read_image_bytes(touch(tmp_path / "a.png", b"abc")) == b"abc"
    with pytest.raises(InvalidInput, match="cannot read image"):
        read_image_bytes(tmp_path / "missing.png")
    with pytest.raises(InvalidInput, match="is empty"):
        read_image_bytes(touch(tmp_path / "e.png", b""))
