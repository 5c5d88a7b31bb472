"""ResNet50 v1 and MobileNetV2 from keras.applications, with their input scaling inside the model."""

from __future__ import annotations

from pathlib import Path

import keras
from keras import ops

from cbir.errors import InvalidInput, NotReady

__all__ = ["CaffePreprocessing", "build_mobilenet_v2", "build_resnet50"]

CAFFE_PREPROCESSING = "caffe: RGB->BGR, minus the ImageNet mean (103.939, 116.779, 123.68), no scaling"
MOBILENET_PREPROCESSING = "x / 127.5 - 1 on RGB 0..255"
# ImageNet channel means in BGR order, as keras.applications.imagenet_utils uses them in caffe mode.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="cbir")
class CaffePreprocessing(keras.layers.Layer):
    """keras.applications.resnet.preprocess_input as a layer, so SavedModels carry it."""

    def call(self, inputs):
        bgr = ops.flip(inputs, axis=-1)
        return bgr - ops.convert_to_tensor(_CAFFE_BGR_MEAN, dtype=bgr.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


def _application(constructor, name: str, input_shape, weights, *, he_init_from_scratch: bool = False):
    """keras.applications model with pooled features; download failures become a clear error."""
    if weights is not None and weights != "imagenet":
        weights = str(Path(weights))
    try:
        model = constructor(include_top=False, weights=weights, input_shape=input_shape, pooling="avg")
    except OSError as e:
        raise InvalidInput(f"cannot load {name} weights from {weights}: {e}") from None
    except ValueError as e:
        raise InvalidInput(f"cannot build {name} with weights={weights!r}: {e}") from None
    except Exception as e:
        if weights == "imagenet":
            # keras downloads these; offline machines fail here with a URL/socket error.
            raise NotReady(
                f"could not download the ImageNet weights of {name} ({type(e).__name__}: {e}); "
                "pass a local weights file instead (the *_notop.h5 file from keras.applications)"
            ) from None
        raise
    if weights is None and he_init_from_scratch:
        _he_initialise(model)
    return model


def _he_initialise(model: keras.Model, seed: int = 0) -> None:
    """Re-draws the convolution kernels with He (fan-out) scaling for training from scratch.

    With Keras' default Glorot kernels a randomly initialised MobileNetV2 outputs features of ~1e-11,
    which an L2-normalising head cannot turn into usable embeddings; He scaling keeps them O(1).
    (Not for ResNet50: its default initialisation is fine and He scaling makes its residual sums explode.)
    """
    initializer = keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="truncated_normal", seed=seed
    )
    for layer in model.layers:
        # Conv2D and DepthwiseConv2D (Keras 3 names the depthwise weights `kernel` as well).
        if isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D):
            layer.kernel.assign(initializer(layer.kernel.shape))


def build_resnet50(input_shape, weights=None) -> keras.Model:
    """ResNet50 v1 (He et al. 2016) features, global average pooled (2048-d), caffe preprocessing inside."""
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = CaffePreprocessing(name="caffe_preprocessing")(inputs)
    base = _application(keras.applications.ResNet50, "resnet_v1_50", input_shape, weights)
    return keras.Model(inputs, base(x), name="resnet_v1_50")


def build_mobilenet_v2(input_shape, weights=None) -> keras.Model:
    """MobileNetV2 (Sandler et al. 2018) features, global average pooled (1280-d), x/127.5 - 1 inside."""
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_inputs")(inputs)
    base = _application(
        keras.applications.MobileNetV2, "mobilenet_v2", input_shape, weights, he_init_from_scratch=True
    )
    return keras.Model(inputs, base(x), name="mobilenet_v2")
