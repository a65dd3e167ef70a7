"""Assets: the dataset's inventory, and the partitioned surface normals that enrich it shard by shard."""

from collections.abc import Callable, Iterator
from typing import NoReturn

from dagster import (
    AssetCheckEvaluation,
    AssetExecutionContext,
    AssetMaterialization,
    BackfillPolicy,
    Failure,
    MaterializeResult,
    MetadataValue,
    StaticPartitionsDefinition,
    asset,
)

from .. import manifest
from .._errors import ClipdropError, stop_message
from .._state import take_set_aside_warnings
from ..enrich import Progress, ShardResult, Throttle, items_by_shard
from ..inventory import OutputInsideDataset, refresh_inventory, skipped_entries, skipped_names
from ..live import plain_number
from ..storage import readable_location
from ._metadata import (
    PLAN_READS,
    PROGRESS_LISTENER,
    SHARD_LISTENER,
    STOPPED_SHARDS,
    column_schema_metadata,
    plain,
    plan_metadata,
    preview_metadata,
    shard_metadata,
)
from .checks import manifest_check_spec, per_shard_evaluations, range_result, schema_failures
from .naming import CLIPDROP, INVENTORY, STORAGE, SURFACE_NORMALS, Names
from .resources import ClipdropResource, DatasetResource


def build_assets(
    names: Names,
    shards: int,
    partitions: StaticPartitionsDefinition,
    shards_per_run: int,
    group: str,
    pool: str,
    settings: ClipdropResource,
) -> list:
    """`settings`: the definitions' Clipdrop resource, which the inventory's plan reads without starting it,
    so taking the inventory needs no key (the plan's balance is then unknown)."""
    storage_key, clipdrop_key = names.name(STORAGE), names.name(CLIPDROP)

    @asset(key=names.asset(INVENTORY), group_name=group, kinds={"parquet"}, required_resource_keys={storage_key})
    def image_inventory(context: AssetExecutionContext) -> MaterializeResult:
        """Every candidate image of the dataset, listed once per refresh, with its shard; and the plan of the
        next run (what it would send and charge, per shard), found without a request."""
        storage: DatasetResource = getattr(context.resources, storage_key)
        dataset, output = storage.dataset(), storage.output()
        try:
            table, uri = refresh_inventory(dataset, output, shards)
        except (OutputInsideDataset, manifest.LayoutMismatch) as error:
            raise Failure(description=str(error), allow_retries=False) from None
        per_shard = table.group_by("shard").aggregate([("path", "count")]).to_pylist()
        context.log.info(f"{table.num_rows} images in {dataset.uri}")
        skipped = skipped_entries(table)
        if skipped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))
            context.log.warning(
                f"entries skipped ({reasons}): only regular files with UTF-8 names, and S3 keys without an empty, "
                "'.' or '..' part, are read"
            )
        plan = settings.plan(dataset, output, table, shards, keep=PLAN_READS.get())
        shortfall = settings.shortfall(plan)
        for warning in [*take_set_aside_warnings(), *plan.warnings, *([shortfall] if shortfall else [])]:
            context.log.warning(warning)
        return MaterializeResult(
            metadata={
                "images": table.num_rows,
                "dataset": dataset.uri,
                "inventory": MetadataValue.path(readable_location(uri)),
                "shards_with_images": len(per_shard),
                "skipped_non_utf8_names": skipped_names(table),
                "skipped_by_reason": MetadataValue.json(skipped),
                "dagster/row_count": table.num_rows,
                **plan_metadata(plan, shortfall),
            }
        )

    @asset(
        key=names.asset(SURFACE_NORMALS),
        group_name=group,
        kinds={"parquet", "jpeg"},
        deps=[image_inventory],
        partitions_def=partitions,
        backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=shards_per_run),
        pool=pool,
        check_specs=[manifest_check_spec(names.asset(SURFACE_NORMALS), partitions)],
        required_resource_keys={storage_key, clipdrop_key},
        metadata=column_schema_metadata(),
    )
    def surface_normals(context: AssetExecutionContext) -> Iterator[MaterializeResult | AssetCheckEvaluation]:
        """Normal maps for the images of the run's shards not enriched yet, and each shard's manifest.

        A run may cover a range of shards (a backfill, `normals-pipeline run`): their images go through one
        stream of work; each shard's manifest is written as soon as it is finished, and each partition
        gets its own materialization and metadata."""
        storage: DatasetResource = getattr(context.resources, storage_key)
        clipdrop: ClipdropResource = getattr(context.resources, clipdrop_key)
        keys = list(context.partition_keys)
        dataset, output = storage.dataset(), storage.output()
        items = items_by_shard(dataset, output, keys, shards)
        previews: dict[str, MetadataValue] = {}

        def shard_done(key: str, result: ShardResult) -> None:
            """On the thread that writes each finished shard, while the others are still being sent: its log line
            and its preview (not made for a stopped shard). The schema check waits for all, validated together."""
            _log_shard(context, key, result, len(items[key]))
            if result.stopped is None:
                previews[key] = preview_metadata(result.manifest, output, dataset)

        results = clipdrop.settings().enrich(
            dataset,
            output,
            [(key, items[key]) for key in keys],
            warn=context.log.warning,
            progress=_progress_relay(context),
            notify=context.log.info,
            on_shard=shard_done,
            reads=PLAN_READS.get(),
        )
        metadata = {key: shard_metadata(result, len(items[key])) for key, result in results.items()}
        stopped = {key: result.stopped for key, result in results.items() if result.stopped is not None}
        finished = {  # what a materialization shows: the figures and a preview (not made for stopped shards)
            key: {**metadata[key], "preview": previews.get(key) or preview_metadata(result.manifest, output, dataset)}
            for key, result in results.items()
            if key not in stopped
        }
        if stopped:
            _fail_stopped(context, finished, {key: metadata[key] for key in stopped}, stopped, clipdrop.api_url)
        for key in keys:
            context.add_asset_metadata(finished[key], partition_key=key)
        manifests = {key: result.manifest for key, result in results.items()}
        failures = schema_failures(manifests)
        yield MaterializeResult(check_results=[range_result(manifests, failures)])
        yield from per_shard_evaluations(context.instance, names.asset(SURFACE_NORMALS), manifests, failures)

    return [image_inventory, surface_normals]


def _log_shard(context: AssetExecutionContext, key: str, result: ShardResult, images: int) -> None:
    """As each shard of the run finishes: its warnings and a line in the event log, and its figures to a
    listener in this process if there is one (`normals-pipeline run` prints a line per shard as it goes)."""
    for warning in result.warnings:
        context.log.warning(warning)
    credits = plain_number(result.credits_consumed)
    context.log.info(f"shard {key} finished: {result.new_rows} rows written, {credits} credits")
    if (listener := SHARD_LISTENER.get()) is not None:
        listener(key, plain(shard_metadata(result, images)))


def _fail_stopped(
    context: AssetExecutionContext,
    finished: dict[str, dict],
    stopped_metadata: dict[str, dict],
    stopped: dict[str, Exception],
    api_url: str,
) -> NoReturn:
    """Shards finished before the stop are materialized; the stopped ones fail with the one-line reason
    (their finished rows are written), and their metadata rides on the failure."""
    for key, shard in finished.items():
        context.log_event(AssetMaterialization(asset_key=context.asset_key, partition=key, metadata=shard))
    error = next(iter(stopped.values()))
    message = stop_message(error, api_url)
    context.log.error(f"shards {', '.join(stopped)} stopped: {message}")
    if not isinstance(error, ClipdropError):
        raise error
    failed = {key: plain(shard) for key, shard in stopped_metadata.items()}
    raise Failure(description=message, metadata={STOPPED_SHARDS: MetadataValue.json(failed)}, allow_retries=False)


def _progress_relay(context: AssetExecutionContext) -> Callable[[Progress], None]:
    """Where the run stands: to a listener in this process if there is one (the CLI's live view), and to
    the event log every 30 s or 10 % of the images, so long runs show life without flooding it."""
    listener = PROGRESS_LISTENER.get()
    throttle = Throttle(seconds=30, fraction=0.1)

    def relay(progress: Progress) -> None:
        if listener is not None:
            listener(progress)
        if throttle.due(progress) or progress.done == progress.total:
            context.log.info(progress.line())

    return relay
