"""A small convolutional backbone, fast on a CPU, for tests and demos."""

from __future__ import annotations

from pathlib import Path

import keras

from cbir.errors import InvalidInput

__all__ = ["FEATURE_DIM", "build_small_cnn"]

FILTERS = (16, 32, 64)
FEATURE_DIM = FILTERS[-1]
PREPROCESSING = "x / 255 on RGB 0..255"


def build_small_cnn(input_shape, weights=None) -> keras.Model:
    """Three stride-2 3x3 conv + BN + ReLU stages and global average pooling (64-d features).

    weights: None (random) or a Keras weights file of this model; there are no ImageNet weights.
    """
    if weights == "imagenet":
        raise InvalidInput("small_cnn has no ImageNet weights; use weights=None or a weights file")
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = keras.layers.Rescaling(1.0 / 255.0, name="scale_inputs")(inputs)
    for i, filters in enumerate(FILTERS):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    model = keras.Model(inputs, x, name="small_cnn")
    if weights is not None:
        model.load_weights(str(Path(weights)))
    return model
