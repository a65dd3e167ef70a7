"""Materialization metadata: what a user looks at in the UI after a shard ran."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import pandas as pd
from dagster import MetadataValue

from ..enrich import ShardResult

# Set by an in-process caller (the CLI) to hear of each shard as it finishes, with its plain metadata.
SHARD_LISTENER: ContextVar[Callable[[str, dict], None] | None] = ContextVar("shard_listener", default=None)
STOPPED_SHARDS = "stopped_shards"  # a failed run's metadata: {shard key: that shard's metadata}
PREVIEW_COLUMNS = ["path", "error_code", "credits_consumed", "width", "height", "normal_map_uri"]


def markdown_table(df: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        return "" if pd.isna(value) else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def plain(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata values as plain Python values (for JSON, and for readers of the events)."""
    return {key: getattr(value, "value", value) for key, value in metadata.items()}


def shard_metadata(result: ShardResult, images: int, retries: dict[str, int]) -> dict[str, Any]:
    """`retries` are the run's (the client is shared by the run's shards)."""
    df = result.manifest
    errors = df["error_code"].dropna().value_counts().to_dict()
    rate = result.new_rows / result.elapsed_s if result.elapsed_s > 0 else 0.0
    metadata: dict[str, Any] = {
        "images": images,
        "enriched": result.enriched,
        "errors": sum(errors.values()),
        "errors_by_code": MetadataValue.json({str(k): int(v) for k, v in errors.items()}),
        "processed_this_run": result.new_rows,
        "requests": result.requests,
        "retries_by_code": MetadataValue.json(retries),
        "http_429": retries.get("rate_limited", 0) + result.errors["rate_limited"],  # this run's, like retries
        "credits_consumed": float(result.credits_consumed),
        "images_per_second": round(rate, 3),
        "manifest": MetadataValue.path(result.manifest_uri or ""),
        "preview": MetadataValue.md(markdown_table(df[PREVIEW_COLUMNS].head(10))),
        "dagster/row_count": len(df),
    }
    if result.remaining_credits is not None:
        metadata["remaining_credits"] = float(result.remaining_credits)
    if result.warnings:
        metadata["warnings"] = MetadataValue.json(result.warnings)
    return metadata
