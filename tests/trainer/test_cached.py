"""Cached-activation fine-tuning: the split, the views, the cache, the batches, and training on them."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from cbir.errors import InvalidInput
from trainer import cached
from trainer.config import Size
from trainer.models import build_embedding_model
from trainer.preprocessing import preprocess_image_bytes, random_crop_flip, resize_decoded
from trainer.synthetic import make_image

INPUT, RESIZE = Size(32, 32), Size(40, 40)
# float16 keeps 11 significant bits: a cached activation is within this of the float32 one (relative).
FLOAT16_RTOL = float(np.finfo(np.float16).eps)


@pytest.fixture(scope="module")
def model():
    return build_embedding_model("efficientnet_lite0", "direct_normalize", 8, (32, 32), weights=None)


@pytest.fixture()
def images(tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(make_image(i, size=48, fmt="JPEG", label=i % 3))
        paths.append(str(path))
    return paths, np.array([0, 1, 2, 0, 1, 2])


def test_the_tail_after_the_frozen_part_is_the_whole_model(model):
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    for cut in ("block2_expand_conv", "block11_expand_conv", "block13_expand_conv", "head_conv"):
        frozen, tail = cached.split_embedding_model(model, cut)
        np.testing.assert_array_equal(tail(frozen(x)), model(x))
        # The tail trains the model's own layers: no copies.
        tail_weights = {id(w) for w in tail.weights}
        assert tail_weights <= {id(w) for w in model.weights}


def test_cuts_crossed_by_a_residual_connection_are_refused(model):
    names = cached.cut_layer_names(model)
    assert "block11_expand_conv" in names and "block13_expand_conv" in names and "head_conv" in names
    # Inside block 13, block 12's output still has to reach block13_add: no cut there.
    assert "block13_depthwise_conv" not in names
    with pytest.raises(InvalidInput, match="a residual connection crosses it"):
        cached.split_embedding_model(model, "block13_depthwise_conv")
    with pytest.raises(InvalidInput, match="no such layer.*head_conv"):
        cached.split_embedding_model(model, "block99_expand_conv")


def test_view_zero_is_the_inference_preprocessing_and_the_others_are_seeded_crops(images):
    paths, _ = images
    data = tf.io.read_file(paths[0])
    views = cached.views_of_image(data, tf.constant(4, tf.int64), 3, INPUT, RESIZE, seed=7).numpy()
    assert views.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(views[0], preprocess_image_bytes(data, INPUT, RESIZE))
    resized = resize_decoded(tf.io.decode_image(data, channels=3), RESIZE)
    for view in (1, 2):
        expected = random_crop_flip(resized, INPUT, tf.constant([7, 4 * 1024 + view], tf.int64))
        np.testing.assert_array_equal(views[view], expected)
    again = cached.views_of_image(data, tf.constant(4, tf.int64), 3, INPUT, RESIZE, seed=7).numpy()
    np.testing.assert_array_equal(views, again)
    assert not np.array_equal(views[1], views[2])


def test_cache_holds_the_frozen_activations_and_is_reused(model, images, tmp_path):
    paths, labels = images
    frozen, _ = cached.split_embedding_model(model, "block11_expand_conv")
    build = dict(views=2, input_size=INPUT, resize=RESIZE, train_from="block11_expand_conv", seed=0)
    folder = tmp_path / "cache"
    cache = cached.build_activation_cache(frozen, paths, labels, folder=folder, batch_size=4, **build)
    assert (
        cache.activations.shape == (6, 2, *frozen.output.shape[1:]) and len(cache) == 6 and cache.views == 2
    )
    assert cache.activations.dtype == np.float16 and cache.seconds > 0
    for i, path in enumerate(paths):
        views = cached.views_of_image(tf.io.read_file(path), tf.constant(i, tf.int64), 2, INPUT, RESIZE, 0)
        expected = frozen(views).numpy()
        np.testing.assert_allclose(cache.activations[i], expected, rtol=FLOAT16_RTOL, atol=FLOAT16_RTOL)
    assert [p.name for p in folder.iterdir()] == [next(folder.glob("*.npy")).name]  # no partial file left

    again = cached.build_activation_cache(frozen, paths, labels, folder=folder, **build)
    assert again.seconds == 0.0
    np.testing.assert_array_equal(again.activations, cache.activations)

    # Other frozen weights (another run, a random initialisation): a new cache replaces the old one.
    other = build_embedding_model("efficientnet_lite0", "direct_normalize", 8, (32, 32), weights=None)
    other_frozen, _ = cached.split_embedding_model(other, "block11_expand_conv")
    rebuilt = cached.build_activation_cache(other_frozen, paths, labels, folder=folder, **build)
    assert rebuilt.seconds > 0 and len(list(folder.iterdir())) == 1
    with pytest.raises(InvalidInput, match="cached_views must be >= 1"):
        cached.build_activation_cache(frozen, paths, labels, folder=None, **{**build, "views": 0})


def test_an_interrupted_build_is_never_taken_for_a_cache(model, images, tmp_path):
    paths, labels = images
    frozen, _ = cached.split_embedding_model(model, "head_conv")
    build = dict(views=1, input_size=INPUT, resize=RESIZE, train_from="head_conv", seed=0, folder=tmp_path)
    calls = []

    def stop_after_first_batch(count):
        calls.append(count)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached.build_activation_cache(
            frozen, paths, labels, batch_size=2, progress=stop_after_first_batch, **build
        )
    assert calls == [2] and not list(tmp_path.glob("[!.]*.npy"))
    assert cached.build_activation_cache(frozen, paths, labels, **build).seconds > 0


def test_batches_are_p_by_k_random_views_of_the_right_images():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 4)
    activations = rng.normal(size=(20, 3, 2, 2, 1)).astype(np.float16)
    cache = cached.ActivationCache(activations, labels, 0.0)
    batches = cached.cached_batches(cache, P=3, K=2, seed=1)
    seen_views = set()
    for _ in range(20):
        x, y = next(batches)
        assert x.dtype == tf.float32 and x.shape == (6, 2, 2, 1)
        y = y.numpy()
        assert len(set(y[0::2])) == 3 and np.array_equal(y[0::2], y[1::2])  # P classes, K consecutive each
        for row, label in zip(x.numpy(), y, strict=True):
            matches = [
                (i, v)
                for i in np.flatnonzero(labels == label)
                for v in range(3)
                if np.array_equal(activations[i, v], row)
            ]
            assert len(matches) == 1
            seen_views.add(matches[0][1])
    assert seen_views == {0, 1, 2}
    first = [next(cached.cached_batches(cache, P=3, K=2, seed=1))[0].numpy() for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])  # reproducible per seed
