"""The training loop: learning-rate schedule, budgets, Ctrl-C, and the checks before a run starts."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import tensorflow as tf

from cbir.errors import InvalidInput
from trainer.config import DataDirs, load_config
from trainer.synthetic import TINY_OVERRIDES, write_original_dataset
from trainer.training import END_LEARNING_RATE, DelayedLinearDecay, TrainOptions, learning_rate, train

CONFIG = "bags_resnet_v1_50_normalize_adam_triplet_semihard_loss_m_0.2"


def test_learning_rate_is_constant_then_decays_linearly_from_the_start_iteration():
    schedule = DelayedLinearDecay(0.01, decay_start=100, total_steps=300)
    values = [float(schedule(s)) for s in (0, 50, 100, 200, 300, 400)]
    np.testing.assert_allclose(
        values,
        [0.01, 0.01, 0.01, (0.01 + END_LEARNING_RATE) / 2, END_LEARNING_RATE, END_LEARNING_RATE],
        rtol=1e-5,
        atol=1e-9,
    )
    assert learning_rate(load_config(CONFIG)) == 0.0003  # decay_start_iteration -1: no decay
    decayed = learning_rate(load_config(CONFIG, ["model.fit.decay_start_iteration=10"]))
    assert (
        isinstance(decayed, DelayedLinearDecay) and decayed.decay_start == 10 and decayed.total_steps == 2000
    )


@pytest.fixture()
def data(tmp_path):
    write_original_dataset(tmp_path, per_class_train=3, per_class_test=2, size=36)
    return DataDirs(tmp_path)


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_stops(data):
    config = load_config(
        CONFIG, [*TINY_OVERRIDES, "model.fit.epochs=50", "eval_frequency=2", "checkpoint_frequency=0"]
    )
    calls = []

    def interrupt(step, metrics):
        calls.append(step)
        os.kill(os.getpid(), signal.SIGINT)

    result = train(config, data, TrainOptions(progress=False, on_eval=interrupt))
    assert result.stopped == "interrupted" and result.step == 2 and calls == [2]
    assert tf.train.latest_checkpoint(str(result.run_dir / "tf_ckpts")).endswith("ckpt-2")
    assert signal.getsignal(signal.SIGINT) is not None  # our handler is gone again
    events = list((data.logs / result.run_dir.name / "train").rglob("events.out.tfevents.*"))
    tags = {
        (value.tag, event.step)
        for path in events
        for event in tf.compat.v1.train.summary_iterator(str(path))
        for value in event.summary.value
    }
    assert {("loss", 1), ("loss", 2), ("learning_rate", 2), ("test/recall@1", 2)} <= tags
    resumed = train(config, data, TrainOptions(progress=False, resume=True, max_steps=1))
    assert resumed.step == 3 and resumed.stopped == "step budget"


def test_p_larger_than_the_classes_is_rejected_before_training(data):
    config = load_config(CONFIG, [*TINY_OVERRIDES, "model.batch.P=9"])
    with pytest.raises(InvalidInput, match="model.batch.P=9 .* 4 classes"):
        train(config, data, TrainOptions(progress=False))
    assert not (data.checkpoints).exists()


def test_frozen_batchnorm_keeps_its_statistics_during_a_train_step():
    import keras

    from trainer.embedding import build_model
    from trainer.training import freeze_batchnorm, make_loss, make_optimizer, make_train_step

    config = load_config(CONFIG, TINY_OVERRIDES)
    model = build_model(config, weights=None)
    assert freeze_batchnorm(model) > 0
    norms = [
        layer
        for layer in model.get_layer("backbone").layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert norms
    before = [layer.moving_mean.numpy().copy() for layer in norms]
    kernel = model.get_layer("embedding_dense").kernel.numpy().copy()
    step = make_train_step(model, make_loss(config), make_optimizer(config))
    images = tf.random.uniform((6, 32, 32, 3), 0, 255, seed=1)
    step(images, tf.constant([0, 0, 1, 1, 2, 2]))
    for layer, mean in zip(norms, before, strict=True):
        np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)
    assert not np.array_equal(model.get_layer("embedding_dense").kernel.numpy(), kernel)


def _trained_weights(data, run_name: str, seed: int) -> dict[str, np.ndarray]:
    config = load_config(CONFIG, [*TINY_OVERRIDES, "model.fit.epochs=3", "checkpoint_frequency=3"])
    result = train(config, data, TrainOptions(progress=False, run_name=run_name, seed=seed))
    reader = tf.train.load_checkpoint(str(result.run_dir / "tf_ckpts"))
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name.startswith("model/") and "OPTIMIZER_SLOT" not in name
    }


@pytest.mark.slow
def test_the_same_seed_trains_the_same_weights(data):
    first = _trained_weights(data, "first", seed=7)
    again = _trained_weights(data, "again", seed=7)
    other = _trained_weights(data, "other", seed=8)
    assert first and first.keys() == again.keys() == other.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
    assert any(not np.array_equal(first[name], other[name]) for name in first)
