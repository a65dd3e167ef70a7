"""The manifest: one row per image, a pandera schema that defines it, and Parquet I/O in hive layout.

`<output>/manifest/partition=<key>/manifest.parquet` holds one shard, so
`pyarrow.dataset.dataset("<output>/manifest", partitioning="hive")` reads a whole run.

While a shard runs, each finished row is also written at once to its own small file in
`<output>/journal/partition=<key>/`, so a run killed at any moment loses only the requests in flight:
the next run folds the journal into the manifest, then clears it.
"""

from __future__ import annotations

import hashlib
import io
import json
from datetime import datetime

import pandas as pd
import pandera.pandas as pandera
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import Storage

MANIFEST_DIR = "manifest"
MANIFEST_FILE = "manifest.parquet"
JOURNAL_DIR = "journal"

ARROW_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("content_hash", pa.string()),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("source_version", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("preparation", pa.string()),
        pa.field("normal_map_uri", pa.string()),
        pa.field("credits_consumed", pa.float64(), nullable=False),
        pa.field("remaining_credits", pa.float64()),
        pa.field("http_status", pa.int32()),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("processed_at", pa.timestamp("ms", tz="UTC"), nullable=False),
    ]
)
COLUMNS = ARROW_SCHEMA.names

_text = pandera.Column(str, nullable=True)
_int32 = pandera.Column("Int32", pandera.Check.ge(0), nullable=True)


def _success_has_map(df: pd.DataFrame) -> pd.Series:
    """A row is either a success with a map or an error without one."""
    return df["error_code"].isna() == df["normal_map_uri"].notna()


MANIFEST_SCHEMA = pandera.DataFrameSchema(
    {
        "path": pandera.Column(
            str,
            [
                pandera.Check.str_length(min_value=1),
                pandera.Check(lambda s: ~s.str.startswith("/") & ~s.str.contains("\\\\", regex=False)),
            ],
            unique=True,
        ),
        "content_hash": pandera.Column(str, pandera.Check.str_matches(r"^[0-9a-f]{64}$"), nullable=True),
        "size": pandera.Column("int64", pandera.Check.ge(0)),
        "source_version": pandera.Column(str),
        "width": _int32,
        "height": _int32,
        "preparation": pandera.Column(str, pandera.Check.str_matches(r"^[a-z0-9_]+(,[a-z0-9_]+)*$"), nullable=True),
        "normal_map_uri": pandera.Column(str, pandera.Check.str_matches(r"^(file|s3)://"), nullable=True),
        "credits_consumed": pandera.Column("float64", pandera.Check.ge(0)),
        "remaining_credits": pandera.Column("float64", nullable=True),
        "http_status": pandera.Column("Int32", pandera.Check.in_range(100, 599), nullable=True),
        "error_code": pandera.Column(str, pandera.Check.str_matches(r"^[a-z0-9_]+$"), nullable=True),
        "error_message": _text,
        "processed_at": pandera.Column(pd.DatetimeTZDtype("ms", "UTC")),
    },
    checks=[pandera.Check(_success_has_map, error="a success has a normal map and an error has none")],
    strict=True,
    ordered=True,
    name="surface_normals_manifest",
)

_PANDAS_TYPES = {pa.int32(): pd.Int32Dtype()}


def partition_path(partition_key: str) -> str:
    return f"{MANIFEST_DIR}/partition={partition_key}/{MANIFEST_FILE}"


def empty_manifest() -> pd.DataFrame:
    return ARROW_SCHEMA.empty_table().to_pandas(types_mapper=_PANDAS_TYPES.get)


_FRAME_DTYPES = {
    "size": "int64",
    "width": "Int32",
    "height": "Int32",
    "http_status": "Int32",
    "credits_consumed": "float64",
    "remaining_credits": "float64",
    "processed_at": pd.DatetimeTZDtype("ms", "UTC"),
}


def to_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows (dicts keyed by column) to a frame with the manifest's exact dtypes. Built by pandas, not
    through Arrow: Arrow's allocator would keep several times the frame's size for the rest of the run."""
    if not rows:
        return empty_manifest()
    return pd.DataFrame.from_records(rows, columns=COLUMNS).astype(_FRAME_DTYPES)


def validate(df: pd.DataFrame) -> pd.DataFrame:
    """Raise `pandera.errors.SchemaErrors` listing every failure, not just the first."""
    return MANIFEST_SCHEMA.validate(df, lazy=True)


def write_manifest(output: Storage, partition_key: str, df: pd.DataFrame) -> str:
    """Write one shard's manifest atomically; returns its URI."""
    table = pa.Table.from_pandas(df[COLUMNS], schema=ARROW_SCHEMA, preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    path = partition_path(partition_key)
    output.write_bytes(path, buffer.getvalue(), content_type="application/vnd.apache.parquet")
    return output.uri_for(path)


def read_manifest(output: Storage, partition_key: str) -> pd.DataFrame:
    """One shard's manifest, or an empty one if the shard was never materialized."""
    path = partition_path(partition_key)
    if not output.exists(path):
        return empty_manifest()
    table = pq.read_table(io.BytesIO(output.read_bytes(path)), schema=ARROW_SCHEMA)
    return table.to_pandas(types_mapper=_PANDAS_TYPES.get)


def _journal_dir(partition_key: str) -> str:
    return f"{JOURNAL_DIR}/partition={partition_key}"


def journal_row(output: Storage, partition_key: str, row: dict) -> None:
    """Make one finished row durable now; one file per image path, so rewriting it is harmless."""
    name = hashlib.sha256(row["path"].encode()).hexdigest()[:32]
    payload = {**row, "processed_at": row["processed_at"].isoformat()}
    output.write_bytes(f"{_journal_dir(partition_key)}/{name}.json", json.dumps(payload).encode(), "application/json")


def read_journal(output: Storage, partition_key: str) -> pd.DataFrame:
    """Rows a previous run finished but did not get to write into the manifest."""
    rows = []
    for path in output.list_prefix(_journal_dir(partition_key)):
        row = json.loads(output.read_bytes(path))
        rows.append({**row, "processed_at": datetime.fromisoformat(row["processed_at"])})
    return to_frame(rows)


def clear_journal(output: Storage, partition_key: str) -> None:
    """Called once the manifest holds every journaled row."""
    for path in output.list_prefix(_journal_dir(partition_key)):
        output.delete(path)


def with_journal(previous: pd.DataFrame, journal: pd.DataFrame) -> pd.DataFrame:
    """The manifest as it would be had the last run finished: journaled rows replace older ones."""
    if journal.empty:
        return previous
    kept = previous[~previous["path"].isin(journal["path"])]
    return pd.concat([kept, journal], ignore_index=True) if len(kept) else journal.reset_index(drop=True)
