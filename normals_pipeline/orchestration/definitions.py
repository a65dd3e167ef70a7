"""`build_definitions`: one dataset's Dagster objects from its resources, under its names."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

from dagster import AssetSelection, BetaWarning, Definitions, EnvVar, PreviewWarning, define_asset_job

from ..training import DEFAULT_SPLITS
from .assets import build_assets
from .naming import CLIPDROP, INVENTORY, INVENTORY_JOB, SHARD_JOB, STORAGE, SURFACE_NORMALS, TRAINING_PAIRS, Names
from .partitions import DEFAULT_SHARDS, DEFAULT_SHARDS_PER_RUN, shard_partitions
from .resources import ClipdropResource, DatasetResource
from .sensors import build_daily_schedule, build_new_images_sensor
from .training import build_training_asset

DEFAULT_POOL = "clipdrop"


def build_definitions(
    *,
    dataset_uri: str | EnvVar,
    output_uri: str | EnvVar,
    shards: int = DEFAULT_SHARDS,
    shards_per_run: int = DEFAULT_SHARDS_PER_RUN,
    clipdrop: ClipdropResource | None = None,
    storage: DatasetResource | None = None,
    key_prefix: str | Sequence[str] | None = None,
    group: str = "normals",
    pool: str = DEFAULT_POOL,
    sensor_enabled: bool = False,
    schedule_enabled: bool = False,
    schedule_cron: str = "0 2 * * *",
    training_pairs: bool = True,
    training_splits: Mapping[str, float] = DEFAULT_SPLITS,
    webdataset: bool = False,
) -> Definitions:
    """Everything Dagster needs for one dataset; `normals_definitions` (the factory), `definitions.py`, the
    Component and the CLI all go through here. `shards_per_run`: how many shards a backfill puts in one run.
    `training_pairs`: the `training_pairs` asset, in the shard job with `surface_normals` (so the sensor,
    the schedule's follow-ups and `normals-pipeline run` build them too)."""
    names = Names.of(key_prefix)
    partitions = shard_partitions(shards)
    inventory_job = define_asset_job(names.name(INVENTORY_JOB), selection=AssetSelection.assets(names.asset(INVENTORY)))
    shard_assets = [names.asset(SURFACE_NORMALS)] + ([names.asset(TRAINING_PAIRS)] if training_pairs else [])
    shard_job = define_asset_job(names.name(SHARD_JOB), selection=AssetSelection.assets(*shard_assets))
    with warnings.catch_warnings():  # backfill policies and partitioned checks are "beta"/"preview" in 1.13:
        warnings.simplefilter("ignore", BetaWarning)  # they are what make a backfill a handful of runs and tie
        warnings.simplefilter("ignore", PreviewWarning)  # each check result to its partition
        assets = build_assets(names, shards, partitions, shards_per_run, group, pool)
        if training_pairs:
            assets.append(build_training_asset(names, partitions, shards_per_run, group, training_splits, webdataset))
    return Definitions(
        assets=assets,
        jobs=[inventory_job, shard_job],
        sensors=[build_new_images_sensor(names, shards, inventory_job, shard_job, sensor_enabled)],
        schedules=[build_daily_schedule(names, inventory_job, schedule_cron, schedule_enabled)],
        resources={
            names.name(STORAGE): storage or DatasetResource(dataset_uri=dataset_uri, output_uri=output_uri),
            names.name(CLIPDROP): clipdrop or ClipdropResource(api_key=EnvVar("CLIPDROP_API_KEY")),
        },
    )
