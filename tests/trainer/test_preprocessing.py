"""The one inference preprocessing: deterministic, identical eagerly and inside tf.data."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer.config import Size
from trainer.preprocessing import augment_image_bytes, inference_dataset, preprocess_image_bytes
from trainer.synthetic import make_image

INPUT, RESIZE = Size(24, 20), Size(32, 28)


def _encoded(fmt: str, mode: str = "RGB", size=(45, 37)) -> bytes:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "fmt, mode",
    [
        ("PNG", "RGB"),
        ("JPEG", "RGB"),
        ("PNG", "L"),
        ("PNG", "RGBA"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("WEBP", "RGB"),
    ],
)
def test_output_shape_type_and_range(fmt, mode):
    out = preprocess_image_bytes(tf.constant(_encoded(fmt, mode)), INPUT, RESIZE)
    assert out.shape == (24, 20, 3) and out.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255.0


def test_is_resize_then_center_crop():
    data = _encoded("PNG")
    decoded = tf.io.decode_png(data, channels=3)
    resized = tf.image.resize(tf.cast(decoded, tf.float32), (32, 28)).numpy()
    expected = resized[4:28, 4:24, :]
    np.testing.assert_array_equal(preprocess_image_bytes(tf.constant(data), INPUT, RESIZE).numpy(), expected)


def test_resizing_the_decoded_uint8_equals_resizing_a_float_copy():
    # The model server resizes the uint8 photo directly (no full-size float32 copy): same pixels.
    data = _encoded("JPEG", size=(400, 533))
    size, crop = Size(256, 256), Size(224, 224)
    decoded = tf.io.decode_jpeg(data, channels=3)
    expected = tf.image.resize(tf.cast(decoded, tf.float32), (256, 256)).numpy()[16:240, 16:240, :]
    np.testing.assert_array_equal(preprocess_image_bytes(tf.constant(data), crop, size).numpy(), expected)
    in_graph = tf.function(lambda b: preprocess_image_bytes(b, crop, size))(tf.constant(data))
    np.testing.assert_array_equal(in_graph.numpy(), expected)


def test_deterministic_and_identical_eagerly_and_in_tf_data(tmp_path):
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        path.write_bytes(make_image(i, size=40, label=i))
        paths.append(str(path))
    eager = np.stack(
        [preprocess_image_bytes(tf.constant(open(p, "rb").read()), INPUT, RESIZE).numpy() for p in paths]
    )

    class Model:
        input, resize = INPUT, RESIZE

    batches = [b.numpy() for b in inference_dataset(paths, Model(), batch_size=2, threads=2)]
    np.testing.assert_array_equal(np.concatenate(batches), eager)
    again = np.concatenate([b.numpy() for b in inference_dataset(paths, Model(), batch_size=3)])
    np.testing.assert_array_equal(again, eager)
    in_graph = tf.function(lambda b: preprocess_image_bytes(b, INPUT, RESIZE))
    np.testing.assert_array_equal(in_graph(tf.constant(open(paths[0], "rb").read())).numpy(), eager[0])


def test_augmentation_is_a_seeded_random_crop_and_flip():
    data = tf.constant(_encoded("PNG"))
    a = augment_image_bytes(data, INPUT, RESIZE, seed=tf.constant([1, 2]))
    b = augment_image_bytes(data, INPUT, RESIZE, seed=tf.constant([1, 2]))
    assert a.shape == (24, 20, 3)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    resized = tf.image.resize(tf.cast(tf.io.decode_png(data, channels=3), tf.float32), (32, 28)).numpy()
    windows = {(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)}
    outs = [augment_image_bytes(data, INPUT, RESIZE, seed=tf.constant([s, 0])).numpy() for s in range(12)]
    found = set()
    for out in outs:
        for top, left, flip in windows:
            window = resized[top : top + 24, left : left + 20]
            if np.array_equal(out, window[:, ::-1] if flip else window):
                found.add((top, left, flip))
                break
        else:
            pytest.fail("augmented image is not a (flipped) window of the resized image")
    assert len(found) > 3 and {f for _, _, f in found} == {False, True}
