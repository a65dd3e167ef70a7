"""Partitions: stable hash shards of the relative path, so a new image never moves an old one."""

from __future__ import annotations

import os

from dagster import StaticPartitionsDefinition

from ..inventory import partition_keys

DEFAULT_SHARDS = 16
# Shards one run covers in a backfill (BackfillPolicy.multi_run): a run streams them together, so fewer,
# larger runs fill the key's rate; 16 makes the default 16 shards one run and 100 shards 7 runs.
DEFAULT_SHARDS_PER_RUN = 16


def _count_from_env(name: str, default: int, most: int = 10_000) -> int:
    """A whole number from 1 to `most` in the environment variable `name`, read when the definitions load."""
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if not 1 <= value <= most:
        raise ValueError(f"{name} must be between 1 and {most}, got {value}")
    return value


def shard_count_from_env() -> int:
    """`NORMALS_SHARDS`: the partition set is part of the code location."""
    return _count_from_env("NORMALS_SHARDS", DEFAULT_SHARDS)


def shards_per_run_from_env() -> int:
    """`NORMALS_SHARDS_PER_RUN`: how many shards a backfill puts in one run."""
    return _count_from_env("NORMALS_SHARDS_PER_RUN", DEFAULT_SHARDS_PER_RUN)


def shard_partitions(shards: int) -> StaticPartitionsDefinition:
    return StaticPartitionsDefinition(partition_keys(shards))
