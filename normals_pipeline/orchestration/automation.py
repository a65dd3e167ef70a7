"""Declarative automation: new images enriched without a sensor (`automation="eager"` or `"on_cron"`).

A paid API wants nothing requested unless the dataset changed, and only the shards that changed. Two observed
assets carry that, with no request to the API:

- `<prefix>/dataset`, observed every minute (`eager`) or on `schedule_cron` (`on_cron`): it lists the dataset and
  records a digest of the listing as its data version. The inventory is eager on it: taken again only when the
  listing changed.
- `<prefix>/dataset_shards`, partitioned like the shards: each shard's digest of the stored inventory, recorded by
  the observation of `dataset` that follows each new inventory. `surface_normals` runs a shard when its digest
  changed, so only shards with new or changed images; read after the inventory is written, it never runs a shard
  on an inventory that lacks the change. `training_pairs` is eager on `surface_normals`, in the same runs.

A sensor of the dataset's own, running by default, has the daemon evaluate the conditions.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetObservation,
    AssetsDefinition,
    AssetSelection,
    AssetSpec,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DataVersion,
    DefaultSensorStatus,
    ObserveResult,
    StaticPartitionsDefinition,
    multi_observable_source_asset,
)
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from ..inventory import InventoryMissing, partition_keys, read_inventory, take_inventory
from ..storage import Storage
from .naming import AUTOMATION_SENSOR, DATASET, DATASET_SHARDS, INVENTORY, STORAGE, SURFACE_NORMALS, Names
from .resources import DatasetResource
from .sensors import listing_digest, shard_digests

Automation = Literal["eager", "on_cron", "none"]
AUTOMATIONS: tuple[Automation, ...] = ("eager", "on_cron", "none")
EVERY_MINUTE = "* * * * *"
EMPTY_SHARD = "empty"


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


def shard_versions(output: Storage, shards: int) -> dict[str, str]:
    """Each shard's digest of the stored inventory (the sensor's digests); none before the first inventory."""
    try:
        digests = shard_digests(read_inventory(output), shards)
    except InventoryMissing:
        return {}
    return {key: digests.get(key, EMPTY_SHARD) for key in partition_keys(shards)}


def _log_shard_versions(context: AssetExecutionContext, key: AssetKey, versions: Mapping[str, str]) -> None:
    for partition, version in versions.items():
        context.log_event(AssetObservation(asset_key=key, partition=partition, tags={DATA_VERSION_TAG: version}))


def build_observations(
    names: Names, shards: int, partitions: StaticPartitionsDefinition, group: str, cron: str
) -> list[AssetsDefinition]:
    """`dataset`, observed on `cron` and after each new inventory, and `dataset_shards`, which its observations
    record (observing `dataset_shards` itself records the same from the stored inventory)."""
    dataset_key, shards_key, storage_key = names.asset(DATASET), names.asset(DATASET_SHARDS), names.name(STORAGE)
    inventory_updated = AutomationCondition.asset_matches(
        names.asset(INVENTORY), AutomationCondition.newly_updated()
    ).with_label("inventory taken")
    # each cron tick (a tick passed while observing is that observation's), and each new inventory until observed
    observed = AutomationCondition.cron_tick_passed(cron) | inventory_updated.since_last_handled()
    dataset_spec = AssetSpec(
        dataset_key,
        group_name=group,
        description=f"The dataset's files, listed on {cron!r} and after each new inventory (no API request); "
        "its data version is a digest of the listing.",
        automation_condition=observed & ~AutomationCondition.in_progress(),
    )
    shards_spec = AssetSpec(
        shards_key,
        group_name=group,
        description="Each shard's files as the stored inventory lists them; its data version changes when the "
        "shard has new or changed images.",
    )

    @multi_observable_source_asset(specs=[dataset_spec], name=names.name(DATASET), required_resource_keys={storage_key})
    def dataset(context: AssetExecutionContext) -> Iterator[ObserveResult]:
        storage: DatasetResource = getattr(context.resources, storage_key)
        listing = take_inventory(storage.dataset(), shards)
        digests = shard_digests(listing, shards)
        _log_shard_versions(context, shards_key, shard_versions(storage.output(), shards))
        yield ObserveResult(
            asset_key=dataset_key,
            data_version=DataVersion(listing_digest(digests)),
            metadata={"images": listing.num_rows, "shards_with_images": len(digests)},
        )

    @multi_observable_source_asset(
        specs=[shards_spec],
        name=names.name(DATASET_SHARDS),
        partitions_def=partitions,
        required_resource_keys={storage_key},
    )
    def dataset_shards(context: AssetExecutionContext) -> Iterator[ObserveResult]:
        storage: DatasetResource = getattr(context.resources, storage_key)
        versions = shard_versions(storage.output(), shards) or dict.fromkeys(partition_keys(shards), EMPTY_SHARD)
        mine = versions.pop(context.partition_key)
        _log_shard_versions(context, shards_key, versions)
        yield ObserveResult(asset_key=shards_key, data_version=DataVersion(mine))

    return [dataset, dataset_shards]


def _shard_changed(shards_key: AssetKey) -> AutomationCondition:
    """A shard runs once its files changed in the stored inventory, when nothing upstream is running."""
    changed = (
        AutomationCondition.any_deps_match(AutomationCondition.newly_updated())
        .allow(AssetSelection.assets(shards_key))
        .with_label("shard's files changed")
    )
    return (
        changed.since_last_handled()
        & ~AutomationCondition.any_deps_missing()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
    ).with_label("new or changed images in the shard")


def automated(assets: Sequence[AssetsDefinition], names: Names) -> list[AssetsDefinition]:
    """The pipeline's assets downstream of the observations, with their conditions."""
    inventory, normals, shards_key = names.asset(INVENTORY), names.asset(SURFACE_NORMALS), names.asset(DATASET_SHARDS)

    def condition(spec: AssetSpec) -> AssetSpec:
        if spec.key == inventory:
            return spec.replace_attributes(
                deps=[*spec.deps, names.asset(DATASET)], automation_condition=AutomationCondition.eager()
            )
        if spec.key == normals:
            return spec.replace_attributes(
                deps=[*spec.deps, shards_key], automation_condition=_shard_changed(shards_key)
            )
        return spec.replace_attributes(automation_condition=AutomationCondition.eager())

    return [asset.map_asset_specs(condition) for asset in assets]


def build_automation_sensor(names: Names, keys: Sequence[AssetKey]) -> AutomationConditionSensorDefinition:
    """Runs by default, unlike Dagster's `default_automation_condition_sensor`: `automation` is the opt-in."""
    return AutomationConditionSensorDefinition(
        names.name(AUTOMATION_SENSOR),
        target=AssetSelection.assets(*keys),
        default_status=DefaultSensorStatus.RUNNING,
        description="Evaluates the dataset's automation conditions: observes it, then requests what changed.",
    )
