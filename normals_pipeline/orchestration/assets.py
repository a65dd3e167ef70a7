"""Assets: the dataset's inventory, and the partitioned surface normals that enrich it shard by shard."""

from dagster import (
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    MetadataValue,
    StaticPartitionsDefinition,
    asset,
)

from .. import manifest
from .._errors import ApiUnreachable, ClipdropError
from ..enrich import current_items, enrich_shard
from ..inventory import (
    SHARDS_KEY,
    InventoryMissing,
    read_inventory,
    skipped_entries,
    skipped_names,
    take_inventory,
    write_inventory,
)
from ..storage import Storage
from ._metadata import shard_metadata
from .checks import check_manifest, manifest_check_spec
from .resources import ClipdropResource, DatasetResource

INVENTORY = "image_inventory"
SURFACE_NORMALS = "surface_normals"
POOL = "clipdrop"


def _refuse_nested(dataset: Storage, output: Storage) -> None:
    """An output inside the dataset would feed the pipeline its own normal maps."""
    if (output.uri + "/").startswith(dataset.uri.rstrip("/") + "/"):
        raise Failure(f"the output {output.uri} lies inside the dataset {dataset.uri}: choose an output outside it")


def stop_message(error: Exception, api_url: str) -> str:
    """One line: what happened and what to do. Built from our own messages, which never hold the key."""
    if isinstance(error, ApiUnreachable):
        return (
            f"cannot reach the Clipdrop API at {api_url} ({error.message}); check the URL and the network, then re-run"
        )
    return error.message if isinstance(error, ClipdropError) else f"{type(error).__name__}: {error}"


def _check_layout(output: Storage, shards: int) -> None:
    """A shard count other than the output's would list images in two partitions: refuse it."""
    try:
        taken_with = (read_inventory(output).schema.metadata or {}).get(SHARDS_KEY.encode())
    except InventoryMissing:
        taken_with = None
    try:
        manifest.check_layout(output, shards, int(taken_with) if taken_with else None)
    except manifest.LayoutMismatch as error:
        raise Failure(description=str(error), allow_retries=False) from None


def build_assets(shards: int, partitions: StaticPartitionsDefinition) -> list:
    @asset(name=INVENTORY, group_name="normals", kinds={"parquet"})
    def image_inventory(context: AssetExecutionContext, storage: DatasetResource) -> MaterializeResult:
        """Every candidate image of the dataset, listed once per refresh, with its shard."""
        dataset, output = storage.dataset(), storage.output()
        _refuse_nested(dataset, output)
        _check_layout(output, shards)
        table = take_inventory(dataset, shards)
        uri = write_inventory(output, table)
        per_shard = table.group_by("shard").aggregate([("path", "count")]).to_pylist()
        context.log.info(f"{table.num_rows} images in {dataset.uri}")
        skipped = skipped_entries(table)
        if skipped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))
            context.log.warning(f"entries skipped ({reasons}): only regular files with UTF-8 names are read")
        return MaterializeResult(
            metadata={
                "images": table.num_rows,
                "dataset": dataset.uri,
                "inventory": MetadataValue.path(uri),
                "shards_with_images": len(per_shard),
                "skipped_non_utf8_names": skipped_names(table),
                "skipped_by_reason": MetadataValue.json(skipped),
                "dagster/row_count": table.num_rows,
            }
        )

    @asset(
        name=SURFACE_NORMALS,
        group_name="normals",
        kinds={"parquet", "jpeg"},
        deps=[image_inventory],
        partitions_def=partitions,
        pool=POOL,
        check_specs=[manifest_check_spec(SURFACE_NORMALS)],
    )
    def surface_normals(
        context: AssetExecutionContext, storage: DatasetResource, clipdrop: ClipdropResource
    ) -> MaterializeResult:
        """Normal maps for the shard's images not enriched yet, and the shard's manifest."""
        key = context.partition_key
        dataset, output = storage.dataset(), storage.output()
        items = current_items(dataset, read_inventory(output, int(key), shards))
        with clipdrop.get_client() as client:
            try:
                result = enrich_shard(
                    dataset,
                    output,
                    client,
                    key,
                    items,
                    concurrency=clipdrop.concurrency,
                    oversize=clipdrop.oversize,
                    claims=clipdrop.claim_store(),
                    progress=_progress_logger(context),
                    notify=context.log.info,
                )
            except ClipdropError as error:  # the manifest could not be written: rows stay journaled
                raise Failure(description=error.message, allow_retries=False) from None
            retries = dict(client.retries_by_code)
        for warning in result.warnings:
            context.log.warning(warning)
        metadata = shard_metadata(result, len(items), result.manifest_uri or "", retries)
        if result.stopped is not None:
            message = stop_message(result.stopped, clipdrop.api_url)
            context.log.error(f"shard {key} stopped: {message}; {result.new_rows} rows written")
            if not isinstance(result.stopped, ClipdropError):
                raise result.stopped
            raise Failure(description=message, metadata=metadata, allow_retries=False)
        return MaterializeResult(metadata=metadata, check_results=[check_manifest(result.manifest)])

    return [image_inventory, surface_normals]


def _progress_logger(context: AssetExecutionContext):
    """Log progress about every 10% so long shards show life without flooding the event log."""

    logged = [0]

    def report(done: int, total: int) -> None:
        step = max(1, total // 10)
        if done == total or done // step > logged[0]:  # `done` moves by several at once
            logged[0] = done // step
            context.log.info(f"{done}/{total} images processed")

    return report
