"""P x K batch sampler: P distinct classes, K images of each, images of one class consecutive.

Classes are visited in shuffled rounds so every class appears about equally often (as the original's
shuffled pid dataset did). A class with fewer than K images is sampled with replacement: its images
are repeated as evenly as possible (each used floor(K/n) or ceil(K/n) times), like the original's
``sample_k_fids_for_pid`` padding; classes with at least K images never repeat an image in a batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class PKSampler:
    """Yields index arrays of length P*K into ``labels``; deterministic for a given ``seed``."""

    def __init__(self, labels: Sequence[int] | np.ndarray, P: int, K: int, *, seed: int = 0):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError("the sampler needs a non-empty 1-D array of labels")
        for name, value in (("P", P), ("K", K)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        classes, inverse = np.unique(labels, return_inverse=True)
        if P > len(classes):
            raise ValueError(
                f"P={P} distinct classes per batch, but the data has only {len(classes)} classes; "
                f"lower model.batch.P to at most {len(classes)}"
            )
        self.P, self.K = int(P), int(K)
        self.classes = classes
        self._members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
        self._rng = np.random.default_rng(seed)
        self._queue: list[int] = []

    @property
    def batch_size(self) -> int:
        return self.P * self.K

    def _next_classes(self) -> list[int]:
        chosen: list[int] = []
        while len(chosen) < self.P:
            if not self._queue:
                order = [int(c) for c in self._rng.permutation(len(self._members))]
                # Classes already in this batch go first (popped last), so a round that starts in the
                # middle of a batch can complete it without repeating a class.
                self._queue = [c for c in order if c in chosen] + [c for c in order if c not in chosen]
            chosen.append(self._queue.pop())
        return chosen

    def _k_of(self, members: np.ndarray) -> np.ndarray:
        if len(members) >= self.K:
            return self._rng.choice(members, size=self.K, replace=False)
        repeats = -(-self.K // len(members))
        pool = np.tile(self._rng.permutation(members), repeats)[: self.K]
        return self._rng.permutation(pool)

    def next_batch(self) -> np.ndarray:
        return np.concatenate([self._k_of(self._members[c]) for c in self._next_classes()]).astype(np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()
