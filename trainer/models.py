"""Embedding models: a backbone, global pooling and an embedding head, from float RGB pixels to vectors.

build_embedding_model(backbone, head, embedding_dim, input_size, weights) is the one constructor used
by training, evaluation and export. The model takes float32 [B, H, W, 3] RGB in 0..255 (the backbone's
own scaling is inside the model) and returns float32 [B, D], L2-normalised iff the head ends in
"_normalize". The heads follow tf_retrieval_baseline / the seed: "direct" is one dense layer,
"fc1024" is dense 1024 + batch norm + ReLU, then dense D.
"""

from __future__ import annotations

from pathlib import Path

import keras

from cbir.errors import InvalidInput
from trainer.backbones import BACKBONES, BackboneSpec, backbone_spec, build_backbone

__all__ = [
    "BACKBONES",
    "HEADS",
    "BackboneSpec",
    "attach_head",
    "backbone_spec",
    "build_embedding_model",
    "frozen_backbone_model",
    "head_is_normalized",
]

HEADS = ("direct", "direct_normalize", "fc1024", "fc1024_normalize")
HIDDEN_UNITS = 1024


def head_is_normalized(head: str) -> bool:
    """True when the head ends with an L2 normalisation (its embeddings have unit length)."""
    _check_head(head)
    return head.endswith("_normalize")


def _check_head(head: str) -> None:
    if head not in HEADS:
        raise InvalidInput(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")


def build_embedding_model(
    backbone: str,
    head: str,
    embedding_dim: int,
    input_size: tuple[int, int] = (224, 224),
    weights: str | Path | None = None,
) -> keras.Model:
    """The embedding model: pixels [B, H, W, 3] float32 RGB 0..255 -> embedding [B, embedding_dim].

    weights: None (random initialisation), "imagenet" (resnet_v1_50 / mobilenet_v2 download Keras'
    weights; efficientnet_lite0 reads the packaged checkpoint offline), or a path to backbone weights.
    The backbone is the nested model named "backbone" (freeze it with
    ``model.get_layer("backbone").trainable = False``).
    """
    _check_head(head)
    _check_dim(embedding_dim)
    features = build_backbone(backbone, input_size, weights)
    return attach_head(features, head, embedding_dim, name=f"{backbone}_{head}")


def attach_head(
    features: keras.Model, head: str, embedding_dim: int, *, name: str | None = None
) -> keras.Model:
    """An embedding model made of a backbone (pixels -> pooled features) and a new head on top of it.

    build_embedding_model uses it; it also lets a caller put a head on an already built backbone.
    """
    _check_head(head)
    _check_dim(embedding_dim)
    height, width = features.input_shape[1:3]
    inputs = keras.Input(shape=(height, width, 3), dtype="float32", name="pixels")
    x = features(inputs)
    # Orthogonal initialisation as in the original heads.
    if head.startswith("fc1024"):
        x = keras.layers.Dense(HIDDEN_UNITS, kernel_initializer="orthogonal", name="fc1024")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="fc1024_bn")(x)
        x = keras.layers.ReLU(name="fc1024_relu")(x)
    x = keras.layers.Dense(embedding_dim, kernel_initializer="orthogonal", name="embedding_dense")(x)
    if head.endswith("_normalize"):
        x = keras.layers.UnitNormalization(axis=-1, name="l2_normalize")(x)
    outputs = keras.layers.Identity(name="embedding", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name or f"{features.name}_{head}")


def frozen_backbone_model(
    backbone: str, input_size: tuple[int, int] = (224, 224), weights: str | Path | None = None
) -> keras.Model:
    """The backbone alone as an embedding model: pixels -> its pooled features, L2-normalised.

    What a pretrained network gives before any training on a catalogue (the baseline a fine-tuned
    model is compared with); with weights=None, a randomly initialised network.
    """
    features = build_backbone(backbone, input_size, weights)
    height, width = features.input_shape[1:3]
    inputs = keras.Input(shape=(height, width, 3), dtype="float32", name="pixels")
    x = keras.layers.UnitNormalization(axis=-1, name="l2_normalize")(features(inputs))
    outputs = keras.layers.Identity(name="embedding", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_frozen")


def _check_dim(embedding_dim) -> None:
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise InvalidInput(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
