"""Demo data: Fashion-MNIST IDX parsing, balanced subsets, a user's folder-per-class catalogue."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from cbir.catalogue import read_catalogue
from cbir.errors import InvalidInput, NotReady
from quickstart import data
from trainer.synthetic import make_image


def write_idx(folder, split, images, labels):
    images_name, labels_name = data.FILES[split]
    with gzip.open(folder / images_name, "wb") as fh:
        fh.write(b"\x00" * 16 + images.astype(np.uint8).tobytes())
    with gzip.open(folder / labels_name, "wb") as fh:
        fh.write(b"\x00" * 8 + labels.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path, monkeypatch):
    folder = tmp_path / "fmnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 30)):
        labels = np.arange(n) % 3
        images = labels[:, None, None] * 80 + rng.integers(0, 20, (n, 28, 28))
        write_idx(folder, split, images, labels)
    monkeypatch.setattr(data, "DEBIAN_DIR", folder)
    monkeypatch.setattr(data, "KERAS_DIR", tmp_path / "nothing")
    return folder


def test_read_idx_offsets(fake_fashion_mnist):
    images, labels = data.read_idx(
        fake_fashion_mnist / data.FILES["test"][0], fake_fashion_mnist / data.FILES["test"][1]
    )
    assert images.shape == (30, 28, 28) and labels.tolist() == [i % 3 for i in range(30)]
    assert images[1].min() >= 80 and images[0].max() < 20


def test_balanced_indices():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    chosen = data.balanced_indices(labels, 4, seed=1)
    assert np.bincount(labels[chosen]).tolist() == [4, 3, 4]
    assert chosen.tolist() == data.balanced_indices(labels, 4, seed=1).tolist()


def test_fashion_mnist_catalogue_is_balanced_readable_and_reused(fake_fashion_mnist, tmp_path):
    out = tmp_path / "demo"
    messages = []
    prepared = data.prepare_demo_data(out, train_per_class=5, test_per_class=2, log=messages.append)
    assert prepared.classes == ("dress", "t-shirt", "trouser") or set(prepared.classes) == {
        "t-shirt",
        "trouser",
        "pullover",
    }
    assert (prepared.train_count, prepared.test_count) == (15, 6)
    train = read_catalogue(prepared.train_dir)
    assert len(train) == 15 and {e.label for e in train} == set(prepared.classes)
    assert {e.label for e in read_catalogue(prepared.test_dir)} == set(prepared.classes)
    again = data.prepare_demo_data(out, train_per_class=5, test_per_class=2, log=messages.append)
    assert again == prepared and any("reusing" in m for m in messages)
    bigger = data.prepare_demo_data(out, train_per_class=6, test_per_class=2, log=messages.append)
    assert bigger.train_count == 18


def test_no_source_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "a")
    monkeypatch.setattr(data, "KERAS_DIR", tmp_path / "b")
    with pytest.raises(NotReady, match="DATA=<folder"):
        data.prepare_demo_data(
            tmp_path / "out",
            train_per_class=1,
            test_per_class=1,
            install_package=False,
            allow_download=False,
            log=lambda _: None,
        )


def make_folder(root, classes, per_class):
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(make_image(i, 16, label=label))


def test_user_catalogue_without_split(tmp_path):
    source = tmp_path / "mine"
    make_folder(source, ["cats", "dogs", "owls"], 6)
    prepared = data.prepare_demo_data(tmp_path / "out", data=source, train_per_class=3, test_per_class=2)
    assert (prepared.train_count, prepared.test_count) == (9, 6)
    train = {e.path for e in read_catalogue(prepared.train_dir)}
    test = {e.path for e in read_catalogue(prepared.test_dir)}
    assert not {p.rsplit("/", 1)[-1] + p.split("/")[-2] for p in train} & {
        p.rsplit("/", 1)[-1] + p.split("/")[-2] for p in test
    }


def test_user_catalogue_with_split(tmp_path):
    source = tmp_path / "mine"
    make_folder(source / "train", ["a", "b"], 4)
    make_folder(source / "test", ["a", "b"], 2)
    prepared = data.prepare_demo_data(tmp_path / "out", data=source, train_per_class=10, test_per_class=10)
    assert (prepared.train_count, prepared.test_count) == (8, 4)


@pytest.mark.parametrize("layout", ["missing", "one_class"])
def test_bad_user_catalogue(tmp_path, layout):
    source = tmp_path / "mine"
    if layout == "one_class":
        make_folder(source, ["only"], 3)
    with pytest.raises(InvalidInput, match="DATA="):
        data.prepare_demo_data(tmp_path / "out", data=source, train_per_class=2, test_per_class=1)
