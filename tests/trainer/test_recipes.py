"""The default recipe for a user's catalogue: one command without a config, the whole network exported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from trainer import recipes
from trainer.cli import main
from trainer.config import DataDirs
from trainer.embedding import build_model
from trainer.export import METADATA_FILE
from trainer.preprocessing import preprocess_image_bytes
from trainer.runs import RunDir, checkpoint_path, restore_model
from trainer.synthetic import TINY_RECIPE, write_folder_dataset

CLOTHING = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "clothing-small"


def _frozen_and_tail_weights(model, train_from):
    backbone = model.get_layer("backbone")
    names = [layer.name for layer in backbone.layers]
    cut = names.index(train_from)
    frozen = [w.numpy().copy() for layer in backbone.layers[:cut] for w in layer.weights]
    tail = [w.numpy().copy() for layer in backbone.layers[cut:] for w in layer.trainable_weights]
    return frozen, tail


def test_the_recipe_adapts_p_to_the_classes_and_validates_overrides(tmp_path):
    data = write_folder_dataset(tmp_path / "photos", classes=3, train=2, test=1, size=16)
    config = recipes.recipe_config(str(data), DataDirs(tmp_path))
    assert config.model.name == "efficientnet_lite0" and config.model.weights == "imagenet"
    assert config.model.batch.P == 3 and config.model.finetune.cached_views == recipes.CACHED_VIEWS
    assert config.model.fit.loss == recipes.LOSS and config.eval_frequency == -1
    # A relative dataset is read below <data_dir>/datasets, as in a config.
    (tmp_path / "datasets").mkdir()
    (data).rename(tmp_path / "datasets" / "photos")
    assert recipes.recipe_config("photos", DataDirs(tmp_path)).model.batch.P == 3
    with pytest.raises(ValueError, match="the default recipe with your --set: model.fit.lr: must be > 0"):
        recipes.recipe_config("photos", DataDirs(tmp_path), ["model.fit.lr=0"])


@pytest.mark.slow
def test_one_command_trains_a_folder_catalogue_and_the_export_is_the_whole_network(tmp_path, capsys):
    data = write_folder_dataset(tmp_path / "photos")
    work = tmp_path / "work"
    sets = [arg for item in TINY_RECIPE for arg in ("--set", item)]
    common = ["--dataset", str(data), "--data-dir", str(work), *sets]
    assert main(["train", *common, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Cached 24 x 2 views" in out

    config = recipes.recipe_config(str(data), DataDirs(work), TINY_RECIPE)
    run = RunDir(DataDirs(work).run_dir(config.run_name))
    saved = json.loads(run.config_file.read_text())
    assert saved["model"]["finetune"] == {
        "train_from": recipes.TRAIN_FROM,
        "freeze_batchnorm": True,
        "cached_views": 2,
    }
    assert len(list((run.path / "activation_cache").glob("*.npy"))) == 1
    # The proxies are trained and checkpointed with the model...
    names = [name for name, _ in tf.train.list_variables(tf.train.latest_checkpoint(str(run.latest_dir)))]
    assert any(name.startswith("proxies/") for name in names)

    # ... the frozen layers kept their ImageNet weights and the layers from train_from on moved.
    trained = build_model(config, weights=None)
    restore_model(trained, checkpoint_path(run, "latest"))
    pretrained = build_model(config, weights="imagenet")
    frozen_before, tail_before = _frozen_and_tail_weights(pretrained, recipes.TRAIN_FROM)
    frozen_after, tail_after = _frozen_and_tail_weights(trained, recipes.TRAIN_FROM)
    assert all(np.array_equal(a, b) for a, b in zip(frozen_before, frozen_after, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(tail_before, tail_after, strict=True))

    # A resumed run reuses the cache.
    assert main(["train", *common, "--set", "model.fit.epochs=5", "--resume", "--no-progress"]) == 0
    assert "Cached" not in capsys.readouterr().out

    repo = tmp_path / "models"
    assert (
        main(
            [
                "export",
                *common,
                "--set",
                "model.fit.epochs=5",
                "--model-repo",
                str(repo),
                "--model-name",
                "shop",
            ]
        )
        == 0
    )
    restore_model(trained, checkpoint_path(run, "latest"))
    loaded = tf.saved_model.load(str(repo / "shop" / "1"))
    images = [p.read_bytes() for p in sorted((data / "test").rglob("*.jpg"))]
    got = loaded.signatures["serving_default"](image_bytes=tf.constant(images))["embedding"].numpy()
    pixels = tf.stack(
        [preprocess_image_bytes(tf.constant(b), config.model.input, config.model.resize) for b in images]
    )
    expected = tf.math.l2_normalize(trained(pixels, training=False), axis=1).numpy()
    np.testing.assert_allclose(got, expected, atol=100 * np.finfo(np.float32).eps)
    # The whole network and nothing else: every model weight, no proxies.
    saved_variables = loaded.signatures["serving_default"].variables
    assert {v.name for v in saved_variables} == {v.path + ":0" for v in trained.weights}

    assert (
        main(["export", *common, "--frozen-backbone", "--model-repo", str(repo), "--model-name", "shop"]) == 0
    )
    meta = json.loads((repo / "shop" / "2" / "assets.extra" / METADATA_FILE).read_text())
    assert meta["frozen_backbone"] is True and meta["head"] == "none" and meta["embedding_dim"] == 1280


def test_a_dataset_and_a_config_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "-c", "x.json", "--dataset", str(tmp_path), "--data-dir", str(tmp_path)])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main(["train", "--dataset", str(tmp_path / "nope"), "--data-dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.needs_clothing
@pytest.mark.skipif(not CLOTHING.is_dir(), reason="clothing-small is not on this machine")
def test_the_recipe_for_clothing_small():
    config = recipes.recipe_config(str(CLOTHING), DataDirs(CLOTHING.parent))
    assert config.model.batch.P == min(recipes.BATCH_P, 10)
