"""Partitions: stable hash shards of the relative path, so a new image never moves an old one."""

from __future__ import annotations

from dagster import StaticPartitionsDefinition

# The shard count's default and `NORMALS_SHARDS` live in the core, so `normals-pipeline plan` reads them
# without loading Dagster; re-exported here, where the definitions take them.
from ..inventory import DEFAULT_SHARDS, count_from_env, partition_keys, shard_count_from_env

__all__ = [
    "DEFAULT_SHARDS",
    "DEFAULT_SHARDS_PER_RUN",
    "shard_count_from_env",
    "shard_partitions",
    "shards_per_run_from_env",
]

# Shards one run covers in a backfill (BackfillPolicy.multi_run): a run streams them together, so fewer,
# larger runs fill the key's rate; 16 makes the default 16 shards one run and 100 shards 7 runs.
DEFAULT_SHARDS_PER_RUN = 16


def shards_per_run_from_env() -> int:
    """`NORMALS_SHARDS_PER_RUN`: how many shards a backfill puts in one run."""
    return count_from_env("NORMALS_SHARDS_PER_RUN", DEFAULT_SHARDS_PER_RUN)


def shard_partitions(shards: int) -> StaticPartitionsDefinition:
    return StaticPartitionsDefinition(partition_keys(shards))
