"""Declarative automation: new images enriched without a sensor (`automation="eager"` or `"on_cron"`).

A paid API wants nothing requested unless the dataset changed. So the dataset itself is an observable asset,
`<prefix>/dataset`: an observation lists it (no API request) and records a digest of the listing as its data
version, every minute (`eager`) or on `schedule_cron` (`on_cron`). The inventory is eager on it, so it is taken
again only when the listing changed; `surface_normals` and `training_pairs` are eager on the inventory, so a
changed inventory requests every shard once (shards whose images are all done charge nothing). A sensor of the
dataset's own, running by default, has the daemon evaluate the conditions.
"""

from collections.abc import Iterator, Sequence
from typing import Literal

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AssetSelection,
    AssetSpec,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DataVersion,
    DefaultSensorStatus,
    ObserveResult,
    multi_observable_source_asset,
)

from ..inventory import take_inventory
from .naming import AUTOMATION_SENSOR, DATASET, INVENTORY, STORAGE, Names
from .resources import DatasetResource
from .sensors import listing_digest, shard_digests

Automation = Literal["eager", "on_cron", "none"]
AUTOMATIONS: tuple[Automation, ...] = ("eager", "on_cron", "none")
EVERY_MINUTE = "* * * * *"


def check_automation(automation: str, sensor_enabled: bool, schedule_enabled: bool) -> None:
    """Refused when the definitions load: an unknown mode, or automation with the sensor or the schedule, which
    would refresh the inventory and request the shards a second time."""
    if automation not in AUTOMATIONS:
        raise ValueError(f"automation must be one of {', '.join(AUTOMATIONS)}, got {automation!r}")
    enabled = [name for name, on in (("sensor_enabled", sensor_enabled), ("schedule_enabled", schedule_enabled)) if on]
    if automation != "none" and enabled:
        raise ValueError(
            f"automation={automation!r} with {' and '.join(enabled)} would request the same runs twice: "
            "choose one (automation needs neither)"
        )


def observation_cron(automation: Automation, schedule_cron: str) -> str:
    return EVERY_MINUTE if automation == "eager" else schedule_cron


def build_dataset_observation(names: Names, shards: int, group: str, cron: str) -> AssetsDefinition:
    """`<prefix>/dataset`, observed on `cron`: its data version changes exactly when an image is added, edited
    or removed (the same per-shard digests as `new_images_sensor`)."""
    key, storage_key = names.asset(DATASET), names.name(STORAGE)
    spec = AssetSpec(
        key,
        group_name=group,
        description=f"The dataset's files, listed on {cron!r}; its data version is a digest of the listing.",
        automation_condition=AutomationCondition.cron_tick_passed(cron) & ~AutomationCondition.in_progress(),
    )

    @multi_observable_source_asset(specs=[spec], name=names.name(DATASET), required_resource_keys={storage_key})
    def dataset(context: AssetExecutionContext) -> Iterator[ObserveResult]:
        storage: DatasetResource = getattr(context.resources, storage_key)
        listing = take_inventory(storage.dataset(), shards)
        digests = shard_digests(listing, shards)
        yield ObserveResult(
            asset_key=key,
            data_version=DataVersion(listing_digest(digests)),
            metadata={"images": listing.num_rows, "shards_with_images": len(digests)},
        )

    return dataset


def automated(assets: Sequence[AssetsDefinition], names: Names) -> list[AssetsDefinition]:
    """The pipeline's assets eager downstream of the dataset's observations."""
    inventory = names.asset(INVENTORY)

    def eager(spec: AssetSpec) -> AssetSpec:
        deps = [*spec.deps, names.asset(DATASET)] if spec.key == inventory else spec.deps
        return spec.replace_attributes(deps=deps, automation_condition=AutomationCondition.eager())

    return [asset.map_asset_specs(eager) for asset in assets]


def build_automation_sensor(names: Names, keys: Sequence[AssetKey]) -> AutomationConditionSensorDefinition:
    """Runs by default, unlike Dagster's `default_automation_condition_sensor`: `automation` is the opt-in."""
    return AutomationConditionSensorDefinition(
        names.name(AUTOMATION_SENSOR),
        target=AssetSelection.assets(*keys),
        default_status=DefaultSensorStatus.RUNNING,
        description="Evaluates the dataset's automation conditions: observes it, then requests what changed.",
    )
