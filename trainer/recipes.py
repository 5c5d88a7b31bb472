"""The default recipe for a user's own photos: the pretrained EfficientNet-Lite0, fine-tuned on cached activations.

Used when the trainer gets a dataset and no config of the user's (``python -m trainer train --dataset
DIR``) and by ``make demo DATA=DIR``. The values were chosen by measurement on CPU (trainer/README.md,
"Choosing the recipe"); ``python -m trainer quality`` re-measures them against the alternatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cbir.errors import InvalidInput
from trainer.config import ConfigError, DataDirs, TrainingConfig, apply_overrides, config_from_dict

BACKBONE = "efficientnet_lite0"
# The first trained layer: the last two stages (blocks 11-15) and the 1x1 head convolution.
TRAIN_FROM = "block11_expand_conv"
CACHED_VIEWS = 3
EMBEDDING_DIM = 128
LOSS = "normalized_softmax"
# On every seed measured, 3e-4 lifts mAP@R by 0.05-0.08 over 1e-4 at equal steps and 5e-4 by about 0.02
# more; past 1200 steps nothing improved consistently (trainer/README.md, "Choosing the recipe").
STEPS = 1200
LEARNING_RATE = 5e-4
BATCH_P = 10
BATCH_K = 4


# What the recipe was chosen against (trainer/README.md): overrides of it, measured by `trainer quality`.
ALTERNATIVES: dict[str, list[str]] = {
    "recipe": [],
    "proxy_anchor": ["model.fit.loss=proxy_anchor"],
    "semi_hard_triplet": [
        "model.fit.loss=semi_hard_triplet",
        "model.fit.margin=0.2",
        "model.fit.metric=euclidean",
    ],
    "multi_similarity": ["model.fit.loss=multi_similarity"],
    "train from head_conv": ["model.finetune.train_from=head_conv"],
    "1 view (no augmentation)": ["model.finetune.cached_views=1"],
    "plain partial fine-tune (no cache)": ["model.finetune.cached_views=0"],
}


def recipe(dataset: str, classes: int) -> dict[str, Any]:
    """The recipe as a config in the original schema, for ``dataset`` with ``classes`` training classes."""
    if classes < 2:
        raise InvalidInput(f"dataset {dataset!r}: metric learning needs at least 2 classes, found {classes}")
    return {
        "dataset": dataset,
        "loading_threads": 2,
        "checkpoint_frequency": STEPS,
        # The test split is for the user's own evaluation, never for choosing a checkpoint.
        "eval_frequency": -1,
        "model": {
            "name": BACKBONE,
            "head": "direct_normalize",
            "embedding_dim": EMBEDDING_DIM,
            "weights": "imagenet",
            "input": {"height": 224, "width": 224},
            "crop": {"height": 256, "width": 256},
            # P classes per batch, at most as many as the dataset has.
            "batch": {"P": min(BATCH_P, classes), "K": BATCH_K},
            "finetune": {"train_from": TRAIN_FROM, "freeze_batchnorm": True, "cached_views": CACHED_VIEWS},
            "fit": {
                "loss": LOSS,
                "metric": "cosine",
                "optimizer": "adam",
                "epochs": STEPS,
                "lr": LEARNING_RATE,
                "decay_start_iteration": -1,
            },
        },
    }


def recipe_config(dataset: str, dirs: DataDirs, overrides: Sequence[str] = ()) -> TrainingConfig:
    """The recipe for ``dataset`` (its classes are counted from its train split), with ``overrides``."""
    from trainer.data import read_entries

    classes = len({entry.label for entry in read_entries(dataset, dirs, "train")})
    try:
        return config_from_dict(apply_overrides(recipe(dataset, classes), overrides))
    except ConfigError as exc:
        raise ConfigError(f"the default recipe with your --set: {exc}") from exc
