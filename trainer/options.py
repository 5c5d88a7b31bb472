"""The options of a training run, without TensorFlow: the CLI reads its defaults from here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class TrainOptions:
    """How one ``train()`` call runs (budgets, resuming, seed, progress), as opposed to what it trains
    (the config)."""

    resume: bool = False
    max_minutes: float | None = None
    max_steps: int | None = None
    seed: int = 0
    run_name: str | None = None
    eval_batch_size: int = 32
    progress: bool = True
    # Called after each evaluation with (step, metrics); tests and the quality command use it.
    on_eval: Callable[[int, dict], None] | None = None
