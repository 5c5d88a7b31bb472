"""The demo's options and sizes, without the demo's imports: the CLI reads its defaults from here."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

# A user's catalogue is indexed whole up to this many images per class (a demo, not a bulk import),
# Fashion-MNIST as a balanced subset of 200 catalogue images and 30 queries per class.
USER_TRAIN_PER_CLASS = 1000
USER_TEST_PER_CLASS = 200


@dataclass(frozen=True)
class DemoOptions:
    root: Path
    data: Path | None = None
    quick: bool = False
    train_per_class: int | None = None  # None: 200 of Fashion-MNIST, else USER_TRAIN_PER_CLASS
    test_per_class: int | None = None  # None: 30 of Fashion-MNIST, else USER_TEST_PER_CLASS
    steps: int | None = None  # None: FASHION_STEPS on Fashion-MNIST, the recipe's on a user's catalogue
    seed: int = 0
    install: bool = True
    keep_running: bool = False
    image_size: int = 32
    embedding_dim: int = 64
    grid_rows: int = 10
    grid_hits: int = 8

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoOptions:
        quick = bool(args.quick)
        base = cls(root=args.root, quick=quick, **(QUICK if quick else {}))
        chosen = {
            "data": args.data,
            "seed": args.seed,
            "install": not args.no_install,
            "keep_running": args.keep_running,
            "train_per_class": args.train_per_class,
            "test_per_class": args.test_per_class,
            "steps": args.steps,
        }
        return cls(**{**asdict(base), **{k: v for k, v in chosen.items() if v is not None}})

    @property
    def per_class(self) -> tuple[int, int]:
        """(catalogue, query) images per class."""
        if self.data is None:
            return self.train_per_class or 200, self.test_per_class or 30
        return self.train_per_class or USER_TRAIN_PER_CLASS, self.test_per_class or USER_TEST_PER_CLASS


# Small enough for a test: a few hundred images, a few dozen steps.
QUICK: dict[str, int] = {
    "train_per_class": 10,
    "test_per_class": 3,
    "steps": 20,
    "image_size": 28,
    "embedding_dim": 32,
    "grid_rows": 5,
    "grid_hits": 6,
}
# Training steps of version 2 on Fashion-MNIST (Recall@1 0.787-0.793 over seeds 0/1/2; 700 gave 0.763).
FASHION_STEPS = 1400
