"""Trainer benchmarks: the training loop vs ``model.fit``, and cached-activation vs plain fine-tuning.

1. Images/s of the trainer's own training loop vs a plain Keras ``model.fit``. Both train the same
   model (small_cnn) with the same loss, optimizer and P x K input pipeline
   (trainer.training.training_dataset over generated images in the original layout), so the ratio
   measures only what the custom loop adds or saves: its train step, per-step loss read-back,
   progress bar and TensorBoard scalars.
2. Images/s of the default recipe's fine-tuning (trainer/recipes.py: the pretrained
   EfficientNet-Lite0 trained from ``TRAIN_FROM`` on cached activations of its frozen part) vs a
   plain partial fine-tune of the same layers (the same recipe with ``cached_views=0``: every step
   decodes, resizes and crops the photos and runs the frozen part forward), on generated 320x320
   JPEGs at the recipe's 224x224 input (96x96 in the quick run). Once as the steady rate of the
   training steps, once as the effective rate of the recipe's whole run on clothing-small (its steps
   plus building its cache of 3,068 photos x its views), computed from the measured rates.

The first step (tracing) is left out of every rate; each pair is run in alternating rounds and each
side's best round counts, because the machine is shared and a single run mostly measures who got the CPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import keras

from trainer import recipes
from trainer.config import DataDirs, load_config
from trainer.data import load_splits
from trainer.embedding import build_model
from trainer.synthetic import TINY_OVERRIDES, write_folder_dataset, write_original_dataset
from trainer.training import TrainOptions, make_loss, make_optimizer, train, training_dataset

CONFIG = "bags_resnet_v1_50_normalize_adam_triplet_semihard_loss_m_0.2"
# The train split of clothing-small, the catalogue the recipe's time is quoted for.
CLOTHING_TRAIN_IMAGES = 3068


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


def _finetune_figures(quick: bool, workdir: Path) -> list[dict]:
    size, steps, rounds = (96, 30, 1) if quick else (224, 40, 2)
    data = write_folder_dataset(workdir / "finetune-bench", classes=4, train=12, test=1, size=320)
    dirs = DataDirs(workdir / "finetune-runs")
    common = [
        f"model.input.height={size}",
        f"model.input.width={size}",
        f"model.crop.height={size * 8 // 7}",
        f"model.crop.width={size * 8 // 7}",
        "model.batch.K=4",
        f"model.fit.epochs={steps + 1}",
        "checkpoint_frequency=0",
    ]
    cached_config = recipes.recipe_config(str(data), dirs, common)
    plain_config = recipes.recipe_config(str(data), dirs, [*common, "model.finetune.cached_views=0"])
    cached_runs, plain_runs = [], []
    for round_ in range(rounds):
        plain_runs.append(train(plain_config, dirs, TrainOptions(progress=False, run_name=f"plain-{round_}")))
        cached_runs.append(
            train(cached_config, dirs, TrainOptions(progress=False, run_name=f"cached-{round_}"))
        )
    plain = max(r.images_per_second for r in plain_runs)
    cached = max(cached_runs, key=lambda r: r.images_per_second)
    views = cached_config.model.finetune.cached_views
    batch = cached_config.model.batch.size
    # The recipe's run on clothing-small from these measured rates: its steps of its batch size at the
    # steady rate, plus building the cache of its images x views at the measured cost per view.
    cache_per_view = cached.cache_seconds / (len(list((data / "train").rglob("*.jpg"))) * views)
    recipe_images = recipes.STEPS * recipes.BATCH_P * recipes.BATCH_K
    recipe_seconds = recipe_images / cached.images_per_second + cache_per_view * CLOTHING_TRAIN_IMAGES * views
    overall = recipe_images / recipe_seconds
    setting = f"efficientnet_lite0 {size}x{size}, train from {recipes.TRAIN_FROM}, P x K = {batch}"
    return [
        {
            "name": f"cached-activation fine-tuning, steady state ({setting})",
            "value": round(cached.images_per_second, 1),
            "unit": "images/s",
            "baseline_name": "plain partial fine-tune of the same layers (decode + frozen forward every step)",
            "baseline": round(plain, 1),
            "ratio": round(cached.images_per_second / plain, 2),
            "goal": ">= 2",
            "higher_is_better": True,
        },
        {
            "name": f"cached-activation fine-tuning incl. building the cache ({views} views x "
            f"{CLOTHING_TRAIN_IMAGES} images, {recipes.STEPS} steps: the recipe on clothing-small)",
            "value": round(overall, 1),
            "unit": "images/s",
            "baseline_name": "plain partial fine-tune of the same layers",
            "baseline": round(plain, 1),
            "ratio": round(overall / plain, 2),
            "goal": ">= 1.5",
            "higher_is_better": True,
        },
    ]


def run(quick: bool, workdir: Path) -> list[dict]:
    return [*_loop_figures(quick, workdir), *_finetune_figures(quick, workdir)]


def _loop_figures(quick: bool, workdir: Path) -> list[dict]:
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
