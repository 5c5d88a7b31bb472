"""The EfficientNet-Lite0 port: weight mapping round trip, and the packaged ImageNet weights on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.errors import InvalidInput
from trainer.backbones import efficientnet_lite

DATA = Path(__file__).parent / "data"


def _to_torch_state(model) -> dict[str, np.ndarray]:
    """Inverse of the port's mapping: a Keras Lite0 model's weights under the PyTorch names and layouts."""
    state = {}

    def conv(layer, key, depthwise=False):
        (w,) = model.get_layer(layer).get_weights()
        state[f"{key}.weight"] = np.transpose(w, (2, 3, 0, 1) if depthwise else (3, 2, 0, 1))

    def bn(layer, key):
        for name, value in zip(
            ("weight", "bias", "running_mean", "running_var"),
            model.get_layer(layer).get_weights(),
            strict=True,
        ):
            state[f"{key}.{name}"] = value
        state[f"{key}.num_batches_tracked"] = np.array(0, np.int64)

    conv("stem_conv", "_conv_stem")
    bn("stem_bn", "_bn0")
    block = 0
    for expand, _k, _s, _o, repeats in efficientnet_lite.STAGES:
        for _ in range(repeats):
            if expand != 1:
                conv(f"block{block}_expand_conv", f"_blocks.{block}._expand_conv")
                bn(f"block{block}_expand_bn", f"_blocks.{block}._bn0")
            conv(f"block{block}_depthwise_conv", f"_blocks.{block}._depthwise_conv", depthwise=True)
            bn(f"block{block}_depthwise_bn", f"_blocks.{block}._bn1")
            conv(f"block{block}_project_conv", f"_blocks.{block}._project_conv")
            bn(f"block{block}_project_bn", f"_blocks.{block}._bn2")
            block += 1
    conv("head_conv", "_conv_head")
    bn("head_bn", "_bn1")
    w, b = model.get_layer("predictions").get_weights()
    state["_fc.weight"], state["_fc.bias"] = w.T, b
    return state


def test_mapping_round_trip_and_checks():
    rng = np.random.default_rng(0)
    source = efficientnet_lite.build_efficientnet_lite0((32, 32, 3), include_top=True, weights=None)
    # Non-trivial BN statistics so that a swapped mean/variance would show.
    for layer in source.layers:
        if layer.name.endswith("_bn"):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma * 1.1, beta + 0.1, rng.normal(size=mean.shape) * 0.1, var * 1.5])
    state = _to_torch_state(source)
    x = rng.uniform(0, 255, size=(2, 32, 32, 3)).astype(np.float32)
    expected = np.asarray(source(x, training=False))
    # Scramble every weight, then load the state dict back: the outputs must come back exactly.
    target = source
    target.set_weights([rng.normal(size=w.shape).astype(np.float32) + 1.0 for w in target.get_weights()])
    assert not np.allclose(target(x, training=False), expected, atol=1e-3)
    efficientnet_lite.load_torch_state_dict(target, state)
    np.testing.assert_allclose(target(x, training=False), expected, atol=1e-6)

    missing = dict(state)
    del missing["_blocks.3._depthwise_conv.weight"]
    with pytest.raises(InvalidInput, match="lacks _blocks.3._depthwise_conv.weight"):
        efficientnet_lite.load_torch_state_dict(target, missing)
    extra = dict(state, **{"_blocks.99._bn0.weight": np.zeros(3, np.float32)})
    with pytest.raises(InvalidInput, match="does not use"):
        efficientnet_lite.load_torch_state_dict(target, extra)
    wrong = dict(state, **{"_conv_stem.weight": np.zeros((16, 3, 3, 3), np.float32)})
    with pytest.raises(InvalidInput, match="stem_conv"):
        efficientnet_lite.load_torch_state_dict(target, wrong)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidInput, match="not found"):
        efficientnet_lite.build_efficientnet_lite0((32, 32, 3), weights=tmp_path / "absent.pth")


@pytest.fixture(scope="module")
def classifier():
    return efficientnet_lite.build_efficientnet_lite0(include_top=True, weights="imagenet")


@pytest.mark.slow
@pytest.mark.parametrize(
    "photo, imagenet_class, probability",
    [("chelsea_224.png", 285, 0.79), ("coffee_224.png", 967, 0.90)],  # Egyptian cat; espresso
)
def test_packaged_imagenet_weights_classify_real_photos(classifier, photo, imagenet_class, probability):
    pixels = np.asarray(Image.open(DATA / photo).convert("RGB"), np.float32)[None]
    assert pixels.shape == (1, 224, 224, 3)
    probs = classifier.predict(pixels, verbose=0)[0]
    assert int(np.argmax(probs)) == imagenet_class
    assert probs[imagenet_class] == pytest.approx(probability, abs=0.02)
