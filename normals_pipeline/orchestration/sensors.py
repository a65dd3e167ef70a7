"""Sensor and schedule, both off by default.

The sensor lists the dataset each tick. If the listing differs from the stored inventory it asks for an
inventory refresh; once the inventory matches, it asks for a run of each shard whose images changed
since it last looked (per-shard digests in the cursor). The schedule refreshes the inventory daily.
"""

import hashlib
import json
from collections import defaultdict
from typing import TYPE_CHECKING

import pyarrow as pa
from dagster import (
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from ..inventory import InventoryMissing, partition_key, read_inventory, take_inventory
from .naming import SCHEDULE, SENSOR, STORAGE, Names
from .resources import DatasetResource

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition


def shard_digests(table: pa.Table, shards: int) -> dict[str, str]:
    """A digest of each non-empty shard's (path, version) pairs: it changes when an image is added or edited."""
    lines: dict[int, list[str]] = defaultdict(list)
    for path, version, shard in zip(*(table[c].to_pylist() for c in ("path", "version", "shard"))):
        lines[shard].append(f"{path}\t{version}")
    return {
        partition_key(shard, shards): hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()[:16]
        for shard, rows in lines.items()
    }


def as_listed(stored: pa.Table, listing: pa.Table) -> pa.Table:
    """The stored inventory as a listing shows it, to compare the two: a local folder's listing gives no
    versions (the inventory's come from a stat each, `with_versions`), so they are left out of both."""
    if listing["version"].null_count < listing.num_rows:
        return stored
    at = stored.schema.get_field_index("version")
    return stored.set_column(at, stored.schema.field(at), pa.nulls(stored.num_rows, pa.string()))


def listing_digest(digests: dict[str, str]) -> str:
    """One digest of a listing's shard digests: equal listings, equal digests."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]


def build_new_images_sensor(
    names: Names,
    shards: int,
    inventory_job: "UnresolvedAssetJobDefinition",
    shard_job: "UnresolvedAssetJobDefinition",
    enabled: bool = False,
):
    storage_key = names.name(STORAGE)

    @sensor(
        name=names.name(SENSOR),
        jobs=[inventory_job, shard_job],
        minimum_interval_seconds=60,
        default_status=DefaultSensorStatus.RUNNING if enabled else DefaultSensorStatus.STOPPED,
        description="Notices new or changed images and requests runs for the shards that have them.",
        required_resource_keys={storage_key},
    )
    def new_images_sensor(context: SensorEvaluationContext):
        storage: DatasetResource = getattr(context.resources, storage_key)
        listed = take_inventory(storage.dataset(), shards)
        listing = shard_digests(listed, shards)
        try:
            stored = shard_digests(as_listed(read_inventory(storage.output()), listed), shards)
        except InventoryMissing:
            stored = None
        if stored != listing:
            return RunRequest(job_name=inventory_job.name, run_key=f"inventory-{listing_digest(listing)}")
        seen = json.loads(context.cursor) if context.cursor else {}
        changed = sorted(key for key, digest in listing.items() if seen.get(key) != digest)
        if not changed:
            return SkipReason("no new or changed images")
        return SensorResult(
            run_requests=[
                RunRequest(job_name=shard_job.name, partition_key=key, run_key=f"{key}-{listing[key]}")
                for key in changed
            ],
            cursor=json.dumps(listing, sort_keys=True),
        )

    return new_images_sensor


def build_daily_schedule(
    names: Names, inventory_job: "UnresolvedAssetJobDefinition", cron: str = "0 2 * * *", enabled: bool = False
) -> ScheduleDefinition:
    return ScheduleDefinition(
        name=names.name(SCHEDULE),
        job=inventory_job,
        cron_schedule=cron,
        default_status=DefaultScheduleStatus.RUNNING if enabled else DefaultScheduleStatus.STOPPED,
        description=f"Refreshes the inventory ({cron}); with the sensor on, new images are then enriched.",
    )
