"""P x K sampler: its invariants over a grid of P, K and class sizes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from trainer.sampler import PKSampler


def _labels(class_sizes):
    return np.concatenate([np.full(n, c) for c, n in enumerate(class_sizes)])


@pytest.mark.parametrize(
    "P, K, class_sizes",
    [
        (P, K, sizes)
        for P, K in itertools.product((2, 3, 5), (1, 2, 4))
        for sizes in ([5] * 5, [1, 2, 3, 8, 13], [K] * 7)
        if P <= len(sizes)
    ],
)
def test_batches_hold_p_distinct_classes_with_k_consecutive_images(P, K, class_sizes):
    labels = _labels(class_sizes)
    sampler = PKSampler(labels, P, K, seed=7)
    seen = np.zeros(len(class_sizes), int)
    for batch in itertools.islice(sampler, 60):
        assert batch.shape == (P * K,)
        groups = labels[batch].reshape(P, K)
        assert np.all(groups == groups[:, :1]), "the K images of a class must be consecutive"
        assert len(set(groups[:, 0])) == P, "P distinct classes"
        for group, members in zip(groups[:, 0], batch.reshape(P, K), strict=True):
            size = class_sizes[group]
            # Without replacement when the class is large enough; else as even as possible.
            counts = np.unique(members, return_counts=True)[1]
            if size >= K:
                assert counts.max() == 1
            else:
                assert counts.max() - counts.min() <= 1 and len(counts) == size
        seen[groups[:, 0]] += 1
    # Rounds over shuffled classes: every class is used about equally often.
    assert seen.max() - seen.min() <= 2


def test_same_seed_same_batches_other_seed_other_batches():
    labels = _labels([6] * 8)
    a = [b.tolist() for b in itertools.islice(PKSampler(labels, 4, 3, seed=1), 5)]
    b = [b.tolist() for b in itertools.islice(PKSampler(labels, 4, 3, seed=1), 5)]
    c = [b.tolist() for b in itertools.islice(PKSampler(labels, 4, 3, seed=2), 5)]
    assert a == b and a != c


@pytest.mark.parametrize("P, K", [(0, 2), (2, 0), (-1, 2), (2.5, 2), (True, 2), (6, 2)])
def test_invalid_p_k_are_rejected(P, K):
    with pytest.raises(ValueError, match="P|K"):
        PKSampler(_labels([3] * 5), P, K)


def test_empty_labels_are_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        PKSampler([], 2, 2)
