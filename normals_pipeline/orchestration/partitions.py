"""Partitions: stable hash shards of the relative path, so a new image never moves an old one."""

from __future__ import annotations

import os

from dagster import StaticPartitionsDefinition

from ..inventory import partition_keys

DEFAULT_SHARDS = 16


def shard_count_from_env() -> int:
    """`NORMALS_SHARDS`, read when the definitions load: the partition set is part of the code location."""
    raw = os.environ.get("NORMALS_SHARDS", str(DEFAULT_SHARDS))
    try:
        shards = int(raw)
    except ValueError:
        raise ValueError(f"NORMALS_SHARDS must be a whole number, got {raw!r}") from None
    if not 1 <= shards <= 10_000:
        raise ValueError(f"NORMALS_SHARDS must be between 1 and 10000, got {shards}")
    return shards


def shard_partitions(shards: int) -> StaticPartitionsDefinition:
    return StaticPartitionsDefinition(partition_keys(shards))
