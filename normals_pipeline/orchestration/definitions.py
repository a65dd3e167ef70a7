"""`build_definitions`: one dataset's Dagster objects from its resources, under its names."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import cast

from dagster import (
    AssetsDefinition,
    AssetSelection,
    BetaWarning,
    Definitions,
    EnvVar,
    PreviewWarning,
    define_asset_job,
    with_source_code_references,
)

from ..training import DEFAULT_SPLITS, MIN_PERSON_FRACTION
from .assets import build_assets
from .automation import (
    Automation,
    automated,
    build_automation_sensor,
    build_observations,
    check_automation,
    observation_cron,
)
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
    min_person_fraction: float = MIN_PERSON_FRACTION,
    keep_no_person: bool = False,
    export_layouts: Sequence[str] = (),
    automation: Automation = "none",
    owners: Sequence[str] = (),
) -> Definitions:
    """Everything Dagster needs for one dataset; `normals_definitions` (the factory), `definitions.py`, the
    Component and the CLI all go through here. `shards_per_run`: how many shards a backfill puts in one run.
    `training_pairs`: the `training_pairs` asset, in the shard job with `surface_normals` (so the sensor,
    the schedule's follow-ups and `normals-pipeline run` build them too); a map whose person covers less than
    `min_person_fraction` of it is left out of them unless `keep_no_person`; `export_layouts` (sapiens,
    marigold, dsine) are written from them in the same runs (`normals_pipeline.export`). `automation`: see
    `automation.py`; `owners`: emails or `team:name`, on every asset."""
    check_automation(automation, sensor_enabled, schedule_enabled)
    clipdrop = clipdrop or ClipdropResource(api_key=EnvVar("CLIPDROP_API_KEY"))
    names = Names.of(key_prefix)
    partitions = shard_partitions(shards)
    inventory_job = define_asset_job(names.name(INVENTORY_JOB), selection=AssetSelection.assets(names.asset(INVENTORY)))
    shard_assets = [names.asset(SURFACE_NORMALS)] + ([names.asset(TRAINING_PAIRS)] if training_pairs else [])
    shard_job = define_asset_job(names.name(SHARD_JOB), selection=AssetSelection.assets(*shard_assets))
    sensors = [build_new_images_sensor(names, shards, inventory_job, shard_job, sensor_enabled)]
    with warnings.catch_warnings():  # backfill policies, partitioned checks, observable assets and code references
        warnings.simplefilter("ignore", BetaWarning)  # are "beta"/"preview" in 1.13: they make a backfill a handful
        warnings.simplefilter("ignore", PreviewWarning)  # of runs, tie each check result to its partition, and so on
        assets = build_assets(names, shards, partitions, shards_per_run, group, pool, clipdrop)
        if training_pairs:
            assets.append(
                build_training_asset(
                    names,
                    partitions,
                    shards_per_run,
                    group,
                    training_splits,
                    webdataset,
                    min_person_fraction,
                    keep_no_person,
                    export_layouts,
                )
            )
        if automation != "none":
            cron = observation_cron(automation, schedule_cron)
            assets = [*build_observations(names, shards, partitions, group, cron), *automated(assets, names)]
            sensors.append(build_automation_sensor(names, [key for asset in assets for key in asset.keys]))
        assets = _described(assets, owners)
    return Definitions(
        assets=assets,
        jobs=[inventory_job, shard_job],
        sensors=sensors,
        schedules=[build_daily_schedule(names, inventory_job, schedule_cron, schedule_enabled)],
        resources={
            names.name(STORAGE): storage or DatasetResource(dataset_uri=dataset_uri, output_uri=output_uri),
            names.name(CLIPDROP): clipdrop,
        },
    )


def _described(assets: list[AssetsDefinition], owners: Sequence[str]) -> list[AssetsDefinition]:
    """Owners on every asset, and code references: the UI links each asset to the function that makes it."""
    if owners:
        assets = [asset.map_asset_specs(lambda spec: spec.replace_attributes(owners=list(owners))) for asset in assets]
    return cast("list[AssetsDefinition]", list(with_source_code_references(assets)))
