"""Embedding models: shapes and normalisation for every backbone and head, weights, scaling, errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cbir.errors import InvalidInput
from trainer import models
from trainer.backbones import backbone_spec, build_backbone
from trainer.backbones.keras_applications import CaffePreprocessing

# Smallest sizes each architecture handles quickly; resnet as the brief asks, at 64x64.
SIZES = {
    "small_cnn": (24, 20),
    "efficientnet_lite0": (32, 32),
    "mobilenet_v2": (32, 32),
    "resnet_v1_50": (64, 64),
}


def _pixels(size, n=3, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=(n, *size, 3)).astype(np.float32)


def _check(model, size, dim, normalized):
    out = np.asarray(model(_pixels(size), training=False))
    assert out.shape == (3, dim) and out.dtype == np.float32
    assert model.input_shape == (None, *size, 3)
    assert model.output_shape == (None, dim)
    norms = np.linalg.norm(out, axis=1)
    if normalized:
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    else:
        assert not np.allclose(norms, 1.0, atol=1e-3)
    assert np.all(np.isfinite(out))
    assert np.ptp(out, axis=0).max() > 0  # different images, different embeddings


@pytest.fixture(scope="module")
def backbones():
    """Each backbone built once (random weights); the heads are attached to it per test."""
    return {name: build_backbone(name, SIZES[name], None) for name in models.BACKBONES}


@pytest.mark.parametrize("head", models.HEADS)
@pytest.mark.parametrize("backbone", models.BACKBONES)
def test_every_backbone_with_every_head(backbones, backbone, head):
    size = SIZES[backbone]
    features = backbones[backbone]
    assert features.output_shape == (None, backbone_spec(backbone).feature_dim)
    model = models.attach_head(features, head, 12)
    _check(model, size, 12, normalized=models.head_is_normalized(head))


def test_build_embedding_model_puts_the_head_on_the_named_backbone():
    model = models.build_embedding_model("efficientnet_lite0", "fc1024_normalize", 16, input_size=(32, 32))
    assert model.name == "efficientnet_lite0_fc1024_normalize"
    assert model.get_layer("backbone").output_shape == (None, 1280)
    _check(model, (32, 32), 16, normalized=True)


def test_backbone_is_a_named_freezable_submodel():
    model = models.build_embedding_model("small_cnn", "fc1024_normalize", 8, input_size=(16, 16))
    trainable_before = len(model.trainable_weights)
    model.get_layer("backbone").trainable = False
    assert 0 < len(model.trainable_weights) < trainable_before
    assert model.get_layer("embedding").output.shape[-1] == 8


def test_keras_weights_file_round_trip(tmp_path):
    source = models.build_embedding_model("small_cnn", "direct", 6, input_size=(16, 16))
    path = tmp_path / "backbone.weights.h5"
    source.get_layer("backbone").save_weights(path)
    loaded = models.build_embedding_model("small_cnn", "direct", 6, input_size=(16, 16), weights=str(path))
    x = _pixels((16, 16))
    np.testing.assert_allclose(
        loaded.get_layer("backbone")(x, training=False),
        source.get_layer("backbone")(x, training=False),
        atol=1e-6,
    )


def test_saved_and_reloaded_model_gives_the_same_embeddings(tmp_path):
    model = models.build_embedding_model("small_cnn", "fc1024_normalize", 8, input_size=(16, 16))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    x = _pixels((16, 16))
    np.testing.assert_allclose(restored(x, training=False), model(x, training=False), atol=1e-6)


def test_caffe_preprocessing_matches_keras_applications():
    x = _pixels((5, 4))
    expected = keras.applications.resnet.preprocess_input(x.copy())
    np.testing.assert_allclose(CaffePreprocessing()(x), expected, atol=1e-4)
    restored = keras.layers.deserialize(keras.layers.serialize(CaffePreprocessing()))
    np.testing.assert_allclose(restored(x), expected, atol=1e-4)


def test_input_scaling_lives_inside_the_model(backbones):
    # The same 0..255 pixels work for every backbone: each model scales its own input first.
    expected = {
        "small_cnn": "Rescaling",
        "efficientnet_lite0": "Rescaling",
        "mobilenet_v2": "Rescaling",
        "resnet_v1_50": "CaffePreprocessing",
    }
    for name, features in backbones.items():
        first = [layer for layer in features.layers if not isinstance(layer, keras.layers.InputLayer)][0]
        assert type(first).__name__ == expected[name], name
    assert "127" in backbone_spec("efficientnet_lite0").preprocessing
    assert "caffe" in backbone_spec("resnet_v1_50").preprocessing


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(InvalidInput, match="unknown backbone 'vgg16'.*resnet_v1_50"):
        models.build_embedding_model("vgg16", "direct", 8)
    with pytest.raises(InvalidInput, match="unknown head 'fc2048'"):
        models.build_embedding_model("small_cnn", "fc2048", 8)
    with pytest.raises(InvalidInput, match="embedding_dim"):
        models.build_embedding_model("small_cnn", "direct", 0)
    with pytest.raises(InvalidInput, match="no ImageNet weights"):
        models.build_embedding_model("small_cnn", "direct", 8, input_size=(16, 16), weights="imagenet")
    with pytest.raises(InvalidInput, match="not found"):
        models.build_embedding_model(
            "resnet_v1_50", "direct", 8, input_size=(64, 64), weights=tmp_path / "x.h5"
        )
    with pytest.raises(InvalidInput, match="at least 32x32"):
        models.build_embedding_model("mobilenet_v2", "direct", 8, input_size=(16, 16))
    with pytest.raises(InvalidInput, match="input_size"):
        models.build_embedding_model("small_cnn", "direct", 8, input_size=(16,))
