"""Partitions: stable hash shards of the relative path, so a new image never moves an old one."""

from __future__ import annotations

import os

from dagster import StaticPartitionsDefinition

from ..inventory import partition_keys

DEFAULT_SHARDS = 16
# Shards one run covers in a backfill (BackfillPolicy.multi_run): a run streams them together, so fewer,
# larger runs fill the key's rate; 16 makes the default 16 shards one run and 100 shards 7 runs.
DEFAULT_SHARDS_PER_RUN = 16


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


def shards_per_run_from_env() -> int:
    """`NORMALS_SHARDS_PER_RUN`: how many shards a backfill puts in one run."""
    raw = os.environ.get("NORMALS_SHARDS_PER_RUN", str(DEFAULT_SHARDS_PER_RUN))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"NORMALS_SHARDS_PER_RUN must be a whole number, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"NORMALS_SHARDS_PER_RUN must be at least 1, got {value}")
    return value


def shard_partitions(shards: int) -> StaticPartitionsDefinition:
    return StaticPartitionsDefinition(partition_keys(shards))
