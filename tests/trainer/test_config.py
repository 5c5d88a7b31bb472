"""Training configs: the 12 shipped originals load, overrides apply, and mistakes name their field."""

from __future__ import annotations

import json

import pytest

from trainer.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    resolve_data_dir,
    shipped_configs,
)

ORIGINAL_NAMES = {
    f"{ds}_resnet_v1_50_normalize_adam_{tag}.json"
    for ds in ("bags", "bags_40", "bags_40_v2")
    for tag in (
        "angular_loss_alpha_30",
        "angular_loss_alpha_45",
        "triplet_semihard_loss_m_0.2",
        "triplet_semihard_loss_m_0.5",
    )
}


def _base() -> dict:
    return json.loads(shipped_configs()[0].read_text())


def test_the_twelve_original_configs_ship_with_their_names():
    assert {p.name for p in shipped_configs()} == ORIGINAL_NAMES


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    dataset = path.name.split("_resnet")[0]
    assert config.dataset == dataset
    assert config.model.name == "resnet_v1_50" and config.model.head == "direct_normalize"
    assert (config.model.input.height, config.model.crop.height) == (224, 256)
    assert (config.model.batch.P, config.model.batch.K) == (20, 2)
    if "angular" in path.name:
        assert config.model.fit.loss == "angular_loss"
        assert path.stem.endswith(f"alpha_{config.model.fit.alpha}")
        assert (
            config.run_name
            == f"{dataset}_resnet_v1_50_direct_normalize_adam_angular_loss_alpha_{config.model.fit.alpha}"
        )
    else:
        assert config.model.fit.loss == "semi_hard_triplet"
        assert path.stem.endswith(f"m_{config.model.fit.margin}")
        assert config.run_name.endswith(f"_adam_semi_hard_triplet_m_{config.model.fit.margin}")


def test_a_shipped_config_is_found_by_name():
    assert load_config("bags_resnet_v1_50_normalize_adam_angular_loss_alpha_30").dataset == "bags"


def test_overrides_use_dotted_paths_and_json_values():
    config = load_config(
        shipped_configs()[0],
        [
            "model.fit.epochs=20",
            "model.batch.P=8",
            "model.name=small_cnn",
            "model.weights=null",
            "model.crop=null",
        ],
    )
    assert config.model.fit.epochs == 20 and config.model.batch.P == 8
    assert config.model.name == "small_cnn" and config.model.weights is None
    assert config.model.crop is None and config.model.resize == config.model.input


def test_overrides_do_not_mutate_the_input():
    data = _base()
    apply_overrides(data, ["model.fit.lr=0.1"])
    assert data["model"]["fit"]["lr"] == 0.0003


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.fit.epochs=-1", "model.fit.epochs"),
        ("model.batch.P=1", "model.batch.P"),
        ("model.batch.K=3", "model.batch.K"),  # angular loss needs pairs
        ('model.batch.K="two"', "model.batch.K"),
        ("model.fit.loss=hinge", "model.fit.loss"),
        ("model.fit.metric=manhattan", "model.fit.metric"),
        ("model.name=vgg", "model.name"),
        ("model.head=mlp", "model.head"),
        ("model.fit.alpha=120", "model.fit.alpha"),
        ("model.crop.height=100", "model.crop.height"),
        ("model.fit.typo=1", "model.fit.typo"),
        ("extra=1", "extra"),
        ("model.embedding_dim=true", "model.embedding_dim"),
        ("model.input=3", "model.input"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"{field.replace('.', '[.]')}\b"):
        load_config(shipped_configs()[0], [override])


def test_missing_fields_are_named():
    data = _base()
    del data["model"]["batch"]["K"]
    with pytest.raises(ConfigError, match=r"model\.batch\.K: missing"):
        config_from_dict(data)


def test_triplet_configs_reject_alpha():
    with pytest.raises(ConfigError, match=r"model\.fit\.alpha"):
        load_config("bags_resnet_v1_50_normalize_adam_triplet_semihard_loss_m_0.2", ["model.fit.alpha=30"])


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match="dotted.path=value"):
        load_config(shipped_configs()[0], ["model.fit.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


SEMI_HARD = "bags_resnet_v1_50_normalize_adam_triplet_semihard_loss_m_0.2"


def test_finetune_and_proxy_loss_fields():
    config = load_config(
        SEMI_HARD,
        [
            "model.fit.loss=proxy_anchor",
            "model.fit.scale=16",
            "model.fit.margin=0.1",
            "model.finetune.train_from=block11_expand_conv",
            "model.finetune.freeze_batchnorm=true",
            "model.finetune.cached_views=4",
        ],
    )
    finetune = config.model.finetune
    assert (finetune.train_from, finetune.freeze_batchnorm, finetune.cached_views) == (
        "block11_expand_conv",
        True,
        4,
    )
    assert config.model.fit.scale == 16.0 and isinstance(config.model.fit.scale, float)
    assert config_from_dict(config.to_json()) == config
    # The original configs keep their resolved form: no finetune block, no scale.
    original = load_config(SEMI_HARD).to_json()
    assert "finetune" not in original["model"] and "scale" not in original["model"]["fit"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.finetune.cached_views=2"], r"model\.finetune\.cached_views: caching needs a frozen part"),
        (["model.finetune.cached_views=-1"], r"model\.finetune\.cached_views: must be >= 0"),
        (["model.finetune.cached_views=1000", "model.finetune.train_from=head_conv"], r"at most 64"),
        (["model.finetune.freeze_batchnorm=1"], r"model\.finetune\.freeze_batchnorm: expected bool"),
        (["model.finetune.cached_views=true"], r"model\.finetune\.cached_views: expected int"),
        (["model.finetune.layers=3"], r"model\.finetune\.layers: unknown field"),
        (["model.fit.scale=16"], r"model\.fit\.scale: only the proxy losses"),
        (["model.fit.loss=normalized_softmax", "model.fit.scale=0"], r"model\.fit\.scale: must be > 0"),
        (["model.fit.loss=normalized_softmax", "model.fit.margin=soft"], r"takes a number, not \"soft\""),
    ],
)
def test_finetune_and_proxy_mistakes_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SEMI_HARD, overrides)


def test_resolved_config_round_trips():
    config = load_config(shipped_configs()[0], ["model.fit.epochs=3"])
    assert config_from_dict(config.to_json()) == config


def test_data_dir_precedence(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"data_dir": "data"}))
    env = {"CBIR_SETTINGS": str(settings)}
    assert resolve_data_dir(None, env).root == (tmp_path / "data").resolve()
    env["CBIR_DATA_DIR"] = str(tmp_path / "env")
    assert resolve_data_dir(None, env).root == (tmp_path / "env").resolve()
    dirs = resolve_data_dir(str(tmp_path / "flag"), env)
    assert dirs.root == (tmp_path / "flag").resolve()
    assert dirs.embeddings_file("run") == dirs.root / "emb" / "run.h5"
    assert dirs.run_dir("run") == dirs.root / "checkpoints" / "run"
    with pytest.raises(ConfigError, match="--data-dir"):
        resolve_data_dir(None, {"CBIR_SETTINGS": str(tmp_path / "missing.json")})
