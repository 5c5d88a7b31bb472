"""Fine-tuning on cached activations: the frozen part of the network runs once per image view.

A partial fine-tune (``model.finetune.train_from``) spends most of a CPU step in the frozen layers'
forward pass and in decoding and resizing the photos, and both give the same result every time the
same view of an image comes back. So the trainer decodes and resizes each training image once, cuts
``cached_views`` views out of it (view 0 is the inference preprocessing, the center crop; the others
are the training augmentation: random crop and flip), runs them through the frozen part once, and keeps
the activations at the cut (float16, in ``<run>/activation_cache/``). Training steps then run only the
tail (the layers from ``train_from`` on, plus the head) on a random view of each P x K batch's images.
The tail shares its layers with the whole model, so the checkpoint and the exported SavedModel are the
whole network (docs/architecture.md, Model: unchanged); nothing of the cache is exported.

The cache is keyed by what determines it (image files, views, sizes, cut, seed, and a fingerprint of the
frozen weights), so a resumed run reuses it and any change rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import keras
import numpy as np
import tensorflow as tf

from cbir.errors import InvalidInput
from trainer.config import Size
from trainer.preprocessing import center_crop, decode, random_crop_flip, resize_decoded
from trainer.sampler import PKSampler

log = logging.getLogger(__name__)

CACHE_DTYPE = np.float16  # half the memory; the views are augmentations anyway, so the rounding is noise
CACHE_FOLDER = "activation_cache"


def _backbone(model: keras.Model) -> keras.Model:
    try:
        return model.get_layer("backbone")
    except ValueError:
        raise InvalidInput("the model has no nested 'backbone' model to split") from None


def cut_layer_names(model: keras.Model) -> list[str]:
    """Backbone layers where the network can be cut: the layer's input is the only tensor crossing the cut.

    A residual connection that skips over the cut would need an activation from before it, which the
    cache does not hold, so such cuts are not offered.
    """
    layers = _backbone(model).layers  # in topological order
    # Node 0 of each layer is its place in the backbone's own graph (a split adds more nodes later).
    produced_at = {id(layer.output): i for i, layer in enumerate(layers)}
    last_read_at: dict[int, int] = {}
    for i, layer in enumerate(layers[1:], start=1):
        for tensor in layer._inbound_nodes[0].input_tensors:
            last_read_at[id(tensor)] = i
    names = []
    for i, layer in enumerate(layers[1:], start=1):
        inputs = layer._inbound_nodes[0].input_tensors
        crossing = {t for t, at in last_read_at.items() if at >= i and produced_at.get(t, -1) < i}
        if len(inputs) == 1 and crossing == {id(inputs[0])}:
            names.append(layer.name)
    return names


def split_embedding_model(model: keras.Model, train_from: str) -> tuple[keras.Model, keras.Model]:
    """(frozen: pixels -> the input of backbone layer ``train_from``; tail: that activation -> embedding).

    The tail reuses the model's own layers (the head after the backbone included), so training the
    tail trains the model. Cuts are allowed where the activation at the cut is all the rest needs:
    ``train_from`` must be a single-input layer whose input no other layer reads (a block's first
    layer, e.g. ``block11_expand_conv``, or ``head_conv``), else a residual connection would cross it.
    """
    backbone = _backbone(model)
    names = [layer.name for layer in backbone.layers]
    allowed = cut_layer_names(model)
    if train_from not in allowed:
        what = "no such layer" if train_from not in names else "a residual connection crosses it"
        raise InvalidInput(
            f"model.finetune.train_from={train_from!r}: cannot cut the backbone there ({what}); "
            f"layers where it can be cut end with: {', '.join(allowed[-8:])}"
        )
    cut = backbone.get_layer(train_from)
    frozen = keras.Model(backbone.input, cut.input, name="frozen_part")
    tail_backbone = keras.Model(cut.input, backbone.output, name="backbone_tail")
    activation = keras.Input(shape=tuple(cut.input.shape[1:]), dtype="float32", name="activation")
    x = tail_backbone(activation)
    after = model.layers[[layer.name for layer in model.layers].index("backbone") + 1 :]
    for layer in after:  # the head is a chain (trainer.models.attach_head)
        x = layer(x)
    return frozen, keras.Model(activation, x, name="tail")


def weights_fingerprint(model: keras.Model) -> str:
    """A hash of a model's weights: a cache made with other frozen weights must not be reused."""
    digest = hashlib.sha1()
    for weight in model.weights:
        digest.update(weight.path.encode())
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()[:16]


def views_of_image(
    image_bytes: tf.Tensor, index: tf.Tensor, views: int, input_size: Size, resize: Size, seed: int
):
    """[views, H, W, 3] float32 0..255 of one image, decoded and resized once.

    View 0 is the inference preprocessing (resize + center crop); views 1.. are the training
    augmentation (random crop + flip) with stateless seeds (seed, index, view).
    """
    resized = resize_decoded(decode(image_bytes), resize)
    crops = [center_crop(resized, input_size, resize)]
    for view in range(1, views):
        view_seed = tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64) * 1024 + view])
        crops.append(random_crop_flip(resized, input_size, view_seed))
    return tf.stack(crops)


@dataclass(frozen=True)
class ActivationCache:
    """Activations [images, views, ...] of the frozen part (float16) and the images' labels."""

    activations: np.ndarray
    labels: np.ndarray
    seconds: float  # what building it cost (0 when it was loaded)

    @property
    def views(self) -> int:
        return int(self.activations.shape[1])

    def __len__(self) -> int:
        return int(self.activations.shape[0])


def cache_key(
    paths, labels, *, views: int, input_size: Size, resize: Size, train_from: str, seed: int, fingerprint: str
) -> str:
    described = {
        "paths": list(paths),
        "labels": [int(x) for x in labels],
        "views": views,
        "input": [input_size.height, input_size.width],
        "resize": [resize.height, resize.width],
        "train_from": train_from,
        "seed": seed,
        "frozen_weights": fingerprint,
    }
    return hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def build_activation_cache(
    frozen: keras.Model,
    paths: list[str],
    labels: np.ndarray,
    *,
    views: int,
    input_size: Size,
    resize: Size,
    train_from: str,
    seed: int,
    folder: Path | None,
    batch_size: int = 32,
    threads: int = tf.data.AUTOTUNE,
    progress: Callable[[int], object] | None = None,
) -> ActivationCache:
    """The frozen part's activations of ``views`` views of every image; loaded from ``folder`` if cached.

    Written to ``folder/<key>.npy`` (through a temporary file and a rename, so an interrupted build is
    never mistaken for a cache) when ``folder`` is given.
    """
    if views < 1:
        raise InvalidInput(f"model.finetune.cached_views must be >= 1, got {views}")
    key = cache_key(
        paths,
        labels,
        views=views,
        input_size=input_size,
        resize=resize,
        train_from=train_from,
        seed=seed,
        fingerprint=weights_fingerprint(frozen),
    )
    target = folder / f"{key}.npy" if folder is not None else None
    if target is not None and target.is_file():
        log.info("reusing the activation cache %s", target)
        return ActivationCache(np.load(target, mmap_mode="r"), np.asarray(labels), 0.0)
    started = time.monotonic()
    shape = (len(paths), views, *(int(d) for d in frozen.output.shape[1:]))
    activations: np.ndarray
    if folder is not None and target is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.npy"):  # an older cache of this run (other settings): replace it
            stale.unlink()
        partial = folder / f".{key}.partial.npy"
        activations = np.lib.format.open_memmap(partial, mode="w+", dtype=CACHE_DTYPE, shape=shape)
    else:
        activations = np.empty(shape, CACHE_DTYPE)

    images = tf.data.Dataset.from_tensor_slices((list(paths), tf.range(len(paths), dtype=tf.int64)))
    images = images.map(
        lambda path, index: views_of_image(tf.io.read_file(path), index, views, input_size, resize, seed),
        num_parallel_calls=threads,
        deterministic=True,
    )
    # Batches of views (not of images), so that the forward pass always gets batch_size inputs.
    batches = images.unbatch().batch(batch_size).prefetch(2)
    forward = tf.function(lambda pixels: frozen(pixels, training=False), reduce_retracing=True)
    flat = activations.reshape(len(paths) * views, *shape[2:])
    done = 0
    for pixels in batches:
        out = forward(pixels).numpy()
        flat[done : done + len(out)] = out
        done += len(out)
        if progress is not None:
            progress(len(out))
    if target is not None:
        cast(np.memmap, activations).flush()  # the file-backed array made above
        del flat, activations
        os.replace(partial, target)
        activations = np.load(target, mmap_mode="r")
    return ActivationCache(activations, np.asarray(labels), time.monotonic() - started)


def cached_batches(
    cache: ActivationCache, P: int, K: int, *, seed: int
) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
    """Endless P x K batches (activations float32, labels) of random views, reproducible per seed."""
    sampler = PKSampler(cache.labels, P, K, seed=seed)
    rng = np.random.default_rng([seed, 1])
    labels = np.asarray(cache.labels, np.int64)
    for indices in sampler:
        views = rng.integers(0, cache.views, size=len(indices))
        # Sorted reads are kinder to a memory-mapped cache; the batch order is restored after.
        order = np.argsort(indices, kind="stable")
        rows = np.empty((len(indices), *cache.activations.shape[2:]), np.float32)
        rows[order] = cache.activations[indices[order], views[order]]
        yield tf.constant(rows), tf.constant(labels[indices])
