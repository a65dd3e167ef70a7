"""Metadata: what a user looks at in the UI, before any run (the manifest's column schema) and after a
shard ran (its figures and a preview of images next to their normal maps)."""

from __future__ import annotations

import base64
import io
import urllib.parse
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any

import pandas as pd
from dagster import BetaWarning, MetadataValue, TableColumn, TableColumnConstraints, TableRecord, TableSchema
from PIL import Image, ImageOps

from ..enrich import PlanReads, Progress, ShardResult
from ..manifest import MANIFEST_SCHEMA
from ..plan import TABLE_COLUMNS, Plan
from ..storage import Storage, readable_location

# Set by an in-process caller (the CLI) to hear of each shard as it finishes, with its plain metadata.
SHARD_LISTENER: ContextVar[Callable[[str, dict], None] | None] = ContextVar("shard_listener", default=None)
# Set likewise to hear where the run stands as its images finish (the CLI's live view).
PROGRESS_LISTENER: ContextVar[Callable[[Progress], None] | None] = ContextVar("progress_listener", default=None)
# Set likewise for the inventory's plan to leave what it read for the shard runs that follow in this process.
PLAN_READS: ContextVar[PlanReads | None] = ContextVar("plan_reads", default=None)
STOPPED_SHARDS = "stopped_shards"  # a failed run's metadata: {shard key: that shard's metadata}


def markdown_table(df: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        return "" if pd.isna(value) else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def plain(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata values as plain Python values (for JSON, and for readers of the events)."""
    return {key: getattr(value, "value", value) for key, value in metadata.items()}


def shard_metadata(result: ShardResult, images: int) -> dict[str, Any]:
    """A shard's own figures, numbers under the same names every time so the UI plots them across runs:
    `errors/<code>` for every code in its manifest or met this run (0 once resent successfully)."""
    df = result.manifest
    errors = {str(code): int(n) for code, n in df["error_code"].dropna().value_counts().items()}
    rate = result.new_rows / result.elapsed_s if result.elapsed_s > 0 else 0.0
    metadata: dict[str, Any] = {
        "images": images,
        "enriched": result.enriched,
        "errors": sum(errors.values()),
        "errors_by_code": MetadataValue.json(errors),
        **{f"errors/{code}": errors.get(code, 0) for code in sorted(set(errors) | set(result.errors))},
        "processed_this_run": result.new_rows,
        "requests": result.requests,
        "retries_by_code": MetadataValue.json(dict(result.retries)),
        "http_429": result.retries["rate_limited"] + result.errors["rate_limited"],
        "credits_consumed": float(result.credits_consumed),
        "images_per_second": round(rate, 3),
        "manifest": MetadataValue.path(readable_location(result.manifest_uri or "")),
        "dagster/row_count": len(df),
    }
    if result.remaining_credits is not None:
        metadata["remaining_credits"] = float(result.remaining_credits)
    if result.warnings:
        metadata["warnings"] = MetadataValue.json(result.warnings)
    return metadata


PLAN_TOTALS = ("to_send", "credits_needed", "eta_seconds", "duplicates", "refused", "done")
PLAN_BY_SHARD = "plan_by_shard"


def plan_metadata(plan: Plan, shortfall: str | None) -> dict[str, Any]:
    """The next run's plan, on the inventory's materialization so it is there before "Materialize all": the
    totals as numbers under the same names every time (the asset page plots each), the key's balance when
    known, and one table row per shard (a table stays one readable entry at 100 shards, where per-shard keys
    would be hundreds)."""
    total = plan.figures(plan.total)
    metadata: dict[str, Any] = {name: total[name] for name in PLAN_TOTALS}
    if total["balance"] is not None:
        metadata.update(balance=total["balance"], balance_age_seconds=total["balance_age_seconds"])
    columns = {name: "float" if name == "eta_seconds" else "int" for name in TABLE_COLUMNS}
    records = [
        TableRecord({"shard": key, **{name: value for name, value in plan.figures(figures).items() if name in columns}})
        for key, figures in plan.shards.items()
    ]
    schema = TableSchema(columns=[TableColumn("shard", "string")] + [TableColumn(n, t) for n, t in columns.items()])
    metadata[PLAN_BY_SHARD] = MetadataValue.table(records, schema=schema)
    if shortfall is not None:
        metadata["plan_shortfall"] = shortfall
    if plan.warnings:
        metadata["plan_warnings"] = MetadataValue.json(list(plan.warnings))
    return metadata


COLUMN_SCHEMA = "dagster/column_schema"
# The README's manifest table, column by column (manifest.py's pandera columns carry no descriptions).
COLUMN_DESCRIPTIONS = {
    "path": "Relative to the dataset root, `/`-separated; unique.",
    "content_hash": "SHA-256 of the file's bytes (null if it could not be read).",
    "size": "Bytes.",
    "source_version": "mtime+size locally, ETag on S3: a changed file is enriched again.",
    "width": "Width of the image as sent, which is the normal map's.",
    "height": "Height of the image as sent, which is the normal map's.",
    "preparation": "What was done before sending, comma-separated (e.g. exif_transpose, cmyk_to_rgb, "
    "downscaled); null when the file was sent as it is.",
    "normal_map_uri": "Absolute file:// or s3:// URI of the JPEG normal map; null on error.",
    "credits_consumed": "Credits this row cost (0 for an error nothing was charged for, and for a duplicate whose "
    "map already existed); null = unknown: the row was rebuilt from a stored map after its record was unreadable.",
    "remaining_credits": "Balance the API reported after this image.",
    "http_status": "The API's status; null when nothing was sent.",
    "error_code": "Null on success, else a stable error code (see the README's error codes).",
    "error_message": "Human-readable detail (never the key).",
    "processed_at": "When the row was written (UTC).",
}


def column_schema_metadata() -> dict[str, TableSchema]:
    """Definition metadata for the surface_normals asset: the manifest's columns, types, nullability,
    uniqueness and checks, converted from the pandera schema (`MANIFEST_SCHEMA`) by dagster-pandera, with
    the README's descriptions. Shown by the UI before any run ("Columns" on the asset's overview)."""
    from dagster_pandera import pandera_schema_to_dagster_type

    described = MANIFEST_SCHEMA.update_columns(
        {name: {"description": text} for name, text in COLUMN_DESCRIPTIONS.items() if name in MANIFEST_SCHEMA.columns}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)  # the conversion is marked beta; its output is plain metadata
        schema = pandera_schema_to_dagster_type(described).metadata["schema"].value
    columns = [
        TableColumn(
            name=column.name,
            type=column.type,
            description=column.description,
            constraints=TableColumnConstraints(
                nullable=column.constraints.nullable,
                unique=column.constraints.unique,
                other=list(column.constraints.other),
            ),
            tags=column.tags,
        )
        for column in schema.columns
    ]
    return {COLUMN_SCHEMA: TableSchema(columns=columns, constraints=schema.constraints)}


PREVIEW_ROWS = 4
THUMBNAIL_PX = 96  # the longer side of each thumbnail
PREVIEW_MAX_CHARS = 100_000  # rows are dropped from the end until the preview fits
_THUMBNAIL_MAX_PIXELS = 100_000_000  # larger sources are not decoded for a preview


def preview_metadata(df: pd.DataFrame, output: Storage, dataset: Storage, rows: int = PREVIEW_ROWS) -> MetadataValue:
    """A few rows of a shard's manifest as Markdown the Dagster UI renders: each image as sent (EXIF
    orientation applied) next to its normal map, as ~96 px JPEG thumbnails inline (`data:` URIs, which
    the UI's Markdown allows for images), with the row's outcome. Successes come first; a thumbnail that
    cannot be made says why instead. At most `PREVIEW_MAX_CHARS` characters."""
    if df.empty:
        return MetadataValue.md("_no images in this shard_")
    ordered = df.assign(_failed=df["error_code"].notna()).sort_values(["_failed", "path"], kind="stable")
    shown = list(ordered.head(rows).itertuples(index=False))
    with ThreadPoolExecutor(max_workers=2 * PREVIEW_ROWS, thread_name_prefix="preview") as pool:
        reads = [_read(row, output, dataset, pool) for row in shown]  # at once: on S3 each read is a round trip
        lines = [_preview_row(row, *read) for row, read in zip(shown, reads, strict=True)]
    header = ["| path | image | normal map | result |", "|---|---|---|---|"]
    more = len(df) - len(lines)
    while lines:
        text = "\n".join(header + lines)
        if more > 0:
            text += f"\n\n{len(lines)} of {len(df)} rows; the whole shard is in the manifest."
        if len(text) <= PREVIEW_MAX_CHARS:
            return MetadataValue.md(text)
        lines.pop()
        more += 1
    return MetadataValue.md(f"_{len(df)} rows; thumbnails too large for a preview_")


def _read(
    row: Any, output: Storage, dataset: Storage, pool: ThreadPoolExecutor
) -> tuple[Future[bytes], Future[bytes] | None]:
    """The row's image and its map (None: the row has no map in `output`), being read."""
    image = pool.submit(dataset.read_bytes, row.path)
    root = output.uri.rstrip("/") + "/"
    if not (isinstance(row.normal_map_uri, str) and row.normal_map_uri.startswith(root)):
        return image, None
    path = row.normal_map_uri.removeprefix(root)
    path = urllib.parse.unquote(path) if root.startswith("file:") else path  # file URIs are %-encoded
    return image, pool.submit(output.read_bytes, path)


def _preview_row(row: Any, image: Future[bytes], normal_map: Future[bytes] | None) -> str:
    """Thumbnails one at a time, on the caller's thread: `_thumbnail` changes the process's warning filters."""
    image_cell = _thumbnail_cell(image.result, "image")
    map_cell = "—" if normal_map is None else _thumbnail_cell(normal_map.result, "normal map")
    if pd.isna(row.error_code):
        cost = row.credits_consumed
        credits = "cost unknown" if pd.isna(cost) else f"{cost:g} credit{'' if cost == 1 else 's'}"
        result = f"{row.width}×{row.height}, {credits}"
    else:
        result = f"`{row.error_code}`"
    return f"| {_cell(row.path)} | {image_cell} | {map_cell} | {result} |"


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("[", "\\[").replace("]", "\\]").replace("\n", " ")


def _thumbnail_cell(read: Callable[[], bytes], alt: str) -> str:
    try:
        data = _thumbnail(read())
    except Exception as error:  # noqa: BLE001 - a preview never fails a materialization
        return f"_{alt}: {type(error).__name__}_"
    return f"![{alt}](data:image/jpeg;base64,{base64.b64encode(data).decode()})"


def _thumbnail(data: bytes) -> bytes:
    """A small JPEG of the image as it is seen (EXIF orientation applied), for the preview only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    if image.width * image.height > _THUMBNAIL_MAX_PIXELS:
        raise ValueError("too large for a preview")
    image.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))  # JPEG: decode at 1/2..1/8 scale, much cheaper
    image = ImageOps.exif_transpose(image)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
    if image.mode in ("RGBA", "LA", "PA", "P") or "transparency" in image.info:
        rgba = image.convert("RGBA")  # transparency over white, as a viewer shows it
        image = Image.new("RGB", image.size, "white")
        image.paste(rgba, mask=rgba.getchannel("A"))
    elif image.mode != "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=75, optimize=True)
    return buffer.getvalue()
