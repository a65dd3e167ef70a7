"""The `training_pairs` asset: each shard's enriched images next to their normal maps, as training files.

Partitioned and backfilled like `surface_normals`, so a backfill, "Materialize all" or `normals-pipeline run`
puts both in the same runs: the pairs of a shard are built right after its maps, from its manifest, by
`normals_pipeline.training` (this module only reads the settings and reports).
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetExecutionContext,
    BackfillPolicy,
    MaterializeResult,
    MetadataValue,
    StaticPartitionsDefinition,
    TableColumn,
    TableSchema,
    asset,
)

from ..export import ExportResult, build_shard, check_layout, finish_layout, layout_dir
from ..storage import readable_location
from ..training import (
    MIN_PERSON_FRACTION,
    PARQUET_DIR,
    SCHEMA,
    TrainingResult,
    check_splits,
)
from .checks import check_quality, evaluations_of, quality_check_spec
from .naming import STORAGE, SURFACE_NORMALS, TRAINING_PAIRS, Names
from .resources import DatasetResource

COLUMNS = {
    "image": "The image exactly as sent to the API (EXIF orientation applied, downscaled or converted if it was), "
    "as Hugging Face's Image feature.",
    "normal_map": "Its normal map as the API returned it (JPEG), the same size, as Hugging Face's Image feature.",
    "path": "Relative to the dataset root.",
    "content_hash": "SHA-256 of the source file's bytes, as in the manifest.",
    "width": "Width of the image and of the map.",
    "height": "Height of the image and of the map.",
    "split": "train, validation or test, from the content hash: stable across runs, shared by duplicates.",
    "key": "The pair's sample key across the dataset, <partition>_<index>: the WebDataset sample's and the "
    "exported layouts' file stem.",
    "person_fraction": "Share of the map's pixels in the person mask (normals.decode).",
    "unit_norm_error": "Mean | |n| - 1 | over the person pixels before renormalising, n = rgb / 127.5 - 1 "
    "(null without a person pixel).",
    "facing_fraction": "Share of the person pixels within 25 degrees of the viewer (null without a person pixel).",
}


def column_schema() -> TableSchema:
    """The Parquet columns, shown on the asset before any run."""
    return TableSchema(columns=[TableColumn(field.name, str(field.type), COLUMNS[field.name]) for field in SCHEMA])


def training_metadata(result: TrainingResult) -> dict[str, Any]:
    return {
        "pairs": result.pairs,
        "left_out": sum(result.left_out.values()),
        "left_out_by_reason": MetadataValue.json(dict(sorted(result.left_out.items()))),
        "splits": MetadataValue.json({split: result.splits[split] for split in sorted(result.splits)}),
        "files": len(result.files),
        "reused": result.reused,
        "path": MetadataValue.path(readable_location(result.uri)),
        "dagster/row_count": result.pairs,
    }


def build_training_asset(
    names: Names,
    partitions: StaticPartitionsDefinition,
    shards_per_run: int,
    group: str,
    splits: Mapping[str, float],
    webdataset: bool,
    min_person_fraction: float = MIN_PERSON_FRACTION,
    keep_no_person: bool = False,
    export_layouts: Sequence[str] = (),
):
    storage_key = names.name(STORAGE)
    fractions = check_splits(splits)  # refused when the definitions load, not in the first run
    layouts = {layout: check_layout(layout) for layout in export_layouts}  # each in its trainer's convention

    @asset(
        key=names.asset(TRAINING_PAIRS),
        group_name=group,
        kinds={"parquet"},
        deps=[names.asset(SURFACE_NORMALS)],
        partitions_def=partitions,
        backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=shards_per_run),
        required_resource_keys={storage_key},
        metadata={"dagster/column_schema": column_schema()},
        check_specs=[quality_check_spec(names.asset(TRAINING_PAIRS), partitions)],
        description=(
            f"Each enriched image as it was sent next to its normal map, the same size, under <output>/{PARQUET_DIR}/"
            f"partition=<key>/<split>-<part>.parquet (Hugging Face Image columns; splits {fractions} by content)"
            + (", and WebDataset tars" if webdataset else "")
            + (f"; also in the layouts {', '.join(layouts)} under <output>/training/<layout>/." if layouts else ".")
        ),
    )
    def training_pairs(context: AssetExecutionContext) -> Iterator[MaterializeResult | AssetCheckEvaluation]:
        """Re-reads each source, checks it against the manifest's hash and prepares it again, so the stored image
        is exactly what the API saw; rows whose source changed or vanished are left out and counted, and so are
        maps that show no person (unless kept)."""
        storage: DatasetResource = getattr(context.resources, storage_key)
        dataset, output = storage.dataset(), storage.output()
        figures: dict[str, dict[str, Any]] = {}
        present = {layout: set(output.list_prefix(layout_dir(layout))) for layout in layouts}  # listed once a run
        for key in context.partition_keys:
            built = build_shard(
                dataset,
                output,
                key,
                warn=context.log.warning,
                splits=fractions,
                webdataset=webdataset,
                min_person_fraction=min_person_fraction,
                keep_no_person=keep_no_person,
                layouts=layouts,
                present=present,
            )
            result, figures[key] = built.pairs, built.quality
            left_out = ", ".join(f"{reason}: {n}" for reason, n in sorted(result.left_out.items())) or "none"
            kept = " (unchanged since the last build: kept)" if result.reused else ""
            context.log.info(f"shard {key}: {result.pairs} training pairs, left out: {left_out}{kept}")
            exported = _exported(context, key, built.exported)
            context.add_asset_metadata(training_metadata(result) | exported, partition_key=key)
        for layout, convention in layouts.items():
            finish_layout(output, layout, convention)  # lists and meta.json, from every partition's record
        yield MaterializeResult(check_results=[check_quality(figures, numbers=len(figures) < 2)])
        if len(figures) > 1:
            results = {key: check_quality({key: shard}) for key, shard in figures.items()}
            yield from evaluations_of(context.instance, names.asset(TRAINING_PAIRS), results)

    return training_pairs


def _exported(context: AssetExecutionContext, key: str, exported: Mapping[str, ExportResult]) -> dict[str, Any]:
    """The shard's export in each layout: a log line each, and its metadata."""
    figures = {}
    for layout, done in exported.items():
        state = "unchanged: kept" if done.reused else f"{done.written} files written, {done.deleted} deleted"
        context.log.info(f"shard {key}: {layout} layout, {done.samples} samples, {state}")
        figures[layout] = {"samples": done.samples, "written": done.written, "reused": done.reused}
    return {"exported": MetadataValue.json(figures)} if figures else {}
