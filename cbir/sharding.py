"""Stable assignment of catalogue items to indexer shards."""

from __future__ import annotations

import hashlib


def _key(item_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest(), "big")


def shard_of(item_id: str, shard_count: int) -> int:
    """Shard (0-based) that holds ``item_id`` among ``shard_count`` shards.

    Jump consistent hashing (Lamping & Veach, 2014) over a blake2b key: the answer is the same in
    every process and language that implements it, and growing from n to n+1 shards moves only
    about 1/(n+1) of the items.
    """
    if shard_count < 1:
        raise ValueError(f"shard_count must be >= 1, got {shard_count}")
    key = _key(item_id)
    bucket, candidate = -1, 0
    while candidate < shard_count:
        bucket = candidate
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket
