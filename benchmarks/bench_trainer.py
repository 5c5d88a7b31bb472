"""Trainer benchmark: images/s of the trainer's own training loop vs a plain Keras ``model.fit``.

Both train the same model (small_cnn) with the same loss, optimizer and P x K input pipeline
(trainer.training.training_dataset over generated images in the original layout), so the ratio
measures only what the custom loop adds or saves: its train step, per-step loss read-back, progress
bar and TensorBoard scalars. The first step (tracing) is left out of both rates; each is run in
alternating rounds (2 quick, 3 full), and its best round counts.
"""

from __future__ import annotations

import time
from pathlib import Path

import keras

from tests.trainer.datasets import TINY_OVERRIDES, write_original_dataset
from trainer.config import DataDirs, load_config
from trainer.data import load_splits
from trainer.embedding import build_model
from trainer.training import TrainOptions, make_loss, make_optimizer, train, training_dataset

CONFIG = "bags_resnet_v1_50_normalize_adam_triplet_semihard_loss_m_0.2"


class _StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.first_end: float | None = None
        self.last_end: float | None = None
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self.first_end is None:
            self.first_end = now
        else:
            self.batches += 1
        self.last_end = now


def _keras_fit_rate(config, dirs: DataDirs, steps: int) -> float:
    split = load_splits(config.dataset, dirs, ("train",))["train"]
    model = build_model(config, weights=None)
    model.compile(optimizer=make_optimizer(config), loss=make_loss(config))
    timer = _StepTimer()
    dataset = training_dataset(split, config, seed=0)
    model.fit(dataset, steps_per_epoch=steps + 1, epochs=1, verbose=0, callbacks=[timer])
    return timer.batches * config.model.batch.size / (timer.last_end - timer.first_end)


def run(quick: bool, workdir: Path) -> list[dict]:
    steps, rounds = (20, 2) if quick else (100, 3)
    data = Path(workdir) / "trainer-bench"
    write_original_dataset(data, per_class_train=12, per_class_test=2, size=72)
    overrides = [
        *TINY_OVERRIDES,
        "model.input.height=64",
        "model.input.width=64",
        "model.crop.height=72",
        "model.crop.width=72",
        "model.batch.P=4",
        "model.batch.K=4",
        f"model.fit.epochs={steps + 1}",
        "checkpoint_frequency=0",
        "eval_frequency=0",
    ]
    config = load_config(CONFIG, overrides)
    dirs = DataDirs(data)
    # Alternate the two and keep each one's best round: the machine is shared, so a single run of each
    # mostly measures who got the CPU.
    baselines, ours_rates = [], []
    for round_ in range(rounds):
        baselines.append(_keras_fit_rate(config, dirs, steps))
        options = TrainOptions(progress=True, run_name=f"bench-{round_}")
        ours_rates.append(train(config, dirs, options).images_per_second)
    baseline, ours = max(baselines), max(ours_rates)
    return [
        {
            "name": "trainer train loop (small_cnn 64x64, P=4 K=4, semi-hard triplet)",
            "value": round(ours, 1),
            "unit": "images/s",
            "baseline_name": "keras model.fit, same model, loss, optimizer and P x K pipeline",
            "baseline": round(baseline, 1),
            "ratio": round(ours / baseline, 3),
            "goal": ">= 0.9",
            "higher_is_better": True,
        }
    ]


if __name__ == "__main__":
    import json
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run("--full" not in sys.argv, Path(tmp)), indent=2))
