"""`build_definitions`: the whole code location from a dataset, an output and a Clipdrop resource."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, EnvVar, define_asset_job

from .assets import INVENTORY, SURFACE_NORMALS, build_assets
from .partitions import DEFAULT_SHARDS, DEFAULT_SHARDS_PER_RUN, shard_partitions
from .resources import ClipdropResource, DatasetResource
from .sensors import build_daily_schedule, build_new_images_sensor

INVENTORY_JOB = "refresh_inventory"
SHARD_JOB = "enrich_shard"


def build_definitions(
    *,
    dataset_uri: str | EnvVar,
    output_uri: str | EnvVar,
    shards: int = DEFAULT_SHARDS,
    shards_per_run: int = DEFAULT_SHARDS_PER_RUN,
    clipdrop: ClipdropResource | None = None,
    storage: DatasetResource | None = None,
) -> Definitions:
    """Everything Dagster needs; the CLI and `definitions.py` both go through here. `shards_per_run`: how
    many shards a backfill ("Materialize all") puts in one run."""
    partitions = shard_partitions(shards)
    inventory_job = define_asset_job(INVENTORY_JOB, selection=AssetSelection.assets(INVENTORY))
    shard_job = define_asset_job(SHARD_JOB, selection=AssetSelection.assets(SURFACE_NORMALS))
    return Definitions(
        assets=build_assets(shards, partitions, shards_per_run),
        jobs=[inventory_job, shard_job],
        sensors=[build_new_images_sensor(shards, inventory_job, shard_job)],
        schedules=[build_daily_schedule(inventory_job)],
        resources={
            "storage": storage or DatasetResource(dataset_uri=dataset_uri, output_uri=output_uri),
            "clipdrop": clipdrop or ClipdropResource(api_key=EnvVar("CLIPDROP_API_KEY")),
        },
    )
