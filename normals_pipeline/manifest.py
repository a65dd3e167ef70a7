"""The manifest: one row per image, a pandera schema that defines it, and Parquet I/O in hive layout.

`<output>/manifest/partition=<key>/manifest.parquet` holds one shard, so
`pyarrow.dataset.dataset("<output>/manifest", partitioning=PARTITIONING)` reads a whole run, with the hive
column `partition` as the string the Dagster UI shows (`"01"`; plain `partitioning="hive"` infers int32).

While a shard runs, each finished row is also written at once to its own small file in
`<output>/journal/partition=<key>/` (or, when the output refuses the write, in a spool folder on this
host, `spool_for`, where refused normal maps wait too), so a run killed at any moment loses only the
requests in flight: the next run folds the journal into the manifest, then clears it.

Reading is where corruption is met: a manifest or journal file that cannot be parsed is moved to
`<output>/quarantine/` (kept, never deleted), named in a warning, and the shard is rebuilt from what is
readable. `<output>/layout.json` records the shard count the manifests were written with.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd
import pandera.pandas as pandera
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ._state import default_state_dir
from .storage import LocalStorage, Storage

MANIFEST_DIR = "manifest"
MANIFEST_FILE = "manifest.parquet"
JOURNAL_DIR = "journal"
QUARANTINE_DIR = "quarantine"
LAYOUT_PATH = "layout.json"
# The hive key is the shard's partition key, a string ("01"): readers infer digits as int32 unless told.
PARTITIONING = pads.partitioning(pa.schema([("partition", pa.string())]), flavor="hive")

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
        pa.field("credits_consumed", pa.float64()),  # null: unknown (the row was rebuilt after its record was lost)
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
            [pandera.Check.str_length(min_value=1), pandera.Check(lambda s: ~s.str.startswith("/"))],
            unique=True,
        ),
        "content_hash": pandera.Column(str, pandera.Check.str_matches(r"^[0-9a-f]{64}$"), nullable=True),
        "size": pandera.Column("int64", pandera.Check.ge(0)),
        "source_version": pandera.Column(str),
        "width": _int32,
        "height": _int32,
        "preparation": pandera.Column(str, pandera.Check.str_matches(r"^[a-z0-9_]+(,[a-z0-9_]+)*$"), nullable=True),
        "normal_map_uri": pandera.Column(str, pandera.Check.str_matches(r"^(file|s3)://"), nullable=True),
        "credits_consumed": pandera.Column("float64", pandera.Check.ge(0), nullable=True),
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


def read_manifests(output: Storage) -> pd.DataFrame:
    """Every shard's manifest of an output, as one frame with a `partition` column (the shard's key):
    what a downstream asset reads."""
    frames = [read_manifest(output, key).assign(partition=key) for key in manifest_keys(output)]
    return pd.concat(frames, ignore_index=True) if frames else empty_manifest().assign(partition=pd.Series(dtype=str))


def left_in_place(output: Storage, path: str, error: Exception) -> str:
    """The read-only reader's line for an unreadable file (the plan's): it is not moved, and what it held counts
    as not done."""
    return (
        f"{output.uri_for(path)} could not be read ({type(error).__name__}: {str(error)[:120]}); "
        "left in place (the next run moves it to quarantine): its images count as not done"
    )


def quarantine(output: Storage, path: str, error: Exception) -> str:
    """Move an unreadable file to `<output>/quarantine/<path>.<time>` and say so in one line."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = f"{QUARANTINE_DIR}/{path}.{stamp}"
    output.write_bytes(target, output.read_bytes(path))
    output.delete(path)
    return (
        f"{output.uri_for(path)} could not be read ({type(error).__name__}: {str(error)[:120]}); "
        f"moved to {output.uri_for(target)} and the shard rebuilt from what is readable"
    )


def read_manifest(
    output: Storage, partition_key: str, warnings: list[str] | None = None, *, set_aside: bool = True
) -> pd.DataFrame:
    """One shard's manifest, or an empty one if the shard was never materialized. An unreadable file is
    quarantined (its warning appended to `warnings`) and read as empty, so it never blocks a shard;
    `set_aside=False` (a reader that writes nothing) leaves it in place and only warns."""
    path = partition_path(partition_key)
    if not output.exists(path):
        return empty_manifest()
    try:
        table = pq.read_table(io.BytesIO(output.read_bytes(path)), schema=ARROW_SCHEMA)
    except (pa.ArrowException, ValueError) as error:
        _warn(warnings, (quarantine if set_aside else left_in_place)(output, path, error))
        return empty_manifest()
    return table.to_pandas(types_mapper=_PANDAS_TYPES.get)


def _warn(warnings: list[str] | None, message: str) -> None:
    if warnings is None:
        raise ValueError(message)
    warnings.append(message)


def _journal_dir(partition_key: str) -> str:
    return f"{JOURNAL_DIR}/partition={partition_key}"


def spool_for(output: Storage) -> LocalStorage:
    """This host's fallback for what was paid and the output refused (journal rows, normal maps), one folder
    per output under `NORMALS_STATE_DIR/spool/`, holding them at the paths the output would have."""
    return LocalStorage(default_state_dir() / "spool" / hashlib.sha256(output.uri.encode()).hexdigest()[:16])


class Journal:
    """Finished rows of one shard, each made durable at once in its own file (one per image path, so
    rewriting is harmless). A row is a receipt for what was paid: if the output refuses it (disk full,
    permission), it goes to a spool folder on this host instead, and reading folds both in."""

    def __init__(self, output: Storage, partition_key: str, spool: Storage | None = None) -> None:
        self.output = output
        self.folder = _journal_dir(partition_key)
        self.spool = spool or spool_for(output)

    def write(self, row: dict) -> None:
        name = f"{self.folder}/{hashlib.sha256(row['path'].encode()).hexdigest()[:32]}.json"
        payload = json.dumps({**row, "processed_at": row["processed_at"].isoformat()}).encode()
        try:
            self.output.write_bytes(name, payload, "application/json")
        except Exception:  # noqa: BLE001 - any refusal of the output: the receipt must land somewhere
            self.spool.write_bytes(name, payload, "application/json")

    def read(self, warnings: list[str], *, set_aside: bool = True) -> pd.DataFrame:
        """Rows a previous run finished but did not get to write into the manifest; unreadable files are
        quarantined with a warning (`set_aside=False`: left in place, with a warning)."""
        rows = []
        for store in (self.output, self.spool):
            for path in store.list_prefix(self.folder):
                try:
                    row = json.loads(store.read_bytes(path))
                    rows.append({**row, "processed_at": datetime.fromisoformat(row["processed_at"])})
                except (ValueError, KeyError, TypeError) as error:
                    warnings.append((quarantine if set_aside else left_in_place)(store, path, error))
        return _latest(to_frame(rows))

    def clear(self) -> None:
        """Called once the manifest holds every journaled row."""
        for store in (self.output, self.spool):
            for path in store.list_prefix(self.folder):
                store.delete(path)


def _latest(journal: pd.DataFrame) -> pd.DataFrame:
    """One row per path (the output's and the spool's may both hold one): the latest."""
    if journal.empty or journal["path"].is_unique:
        return journal
    return journal.sort_values("processed_at").drop_duplicates("path", keep="last").reset_index(drop=True)


def with_journal(previous: pd.DataFrame, journal: pd.DataFrame) -> pd.DataFrame:
    """The manifest as it would be had the last run finished: journaled rows replace older ones."""
    if journal.empty:
        return previous
    kept = previous[~previous["path"].isin(journal["path"])]
    return pd.concat([kept, journal], ignore_index=True) if len(kept) else journal.reset_index(drop=True)


@dataclass
class ShardState:
    """What is known of a shard before a run: its rows, and what had to be set aside to read them."""

    previous: pd.DataFrame
    warnings: list[str] = field(default_factory=list)


def load_shard(output: Storage, journal: Journal, partition_key: str, *, set_aside: bool = True) -> ShardState:
    """`set_aside=False`: read only (the plan), unreadable files are left where they are."""
    warnings: list[str] = []
    previous = read_manifest(output, partition_key, warnings, set_aside=set_aside)
    return ShardState(with_journal(previous, journal.read(warnings, set_aside=set_aside)), warnings)


class LayoutMismatch(ValueError):
    """The output's manifests were written with another shard count."""


def check_layout(
    output: Storage, shards: int, inventory_shards: Callable[[], int | None] = lambda: None, *, record: bool = True
) -> None:
    """Refuse a shard count other than the one this output's manifests were written with (images would
    land in other partitions and be listed twice); record the count on first use (unless `record` is
    False: the plan writes nothing). An output from before `layout.json` takes the count its inventory was
    taken with (`inventory_shards`, asked only then)."""
    if output.exists(LAYOUT_PATH):
        recorded = int(json.loads(output.read_bytes(LAYOUT_PATH))["shards"])
    else:
        recorded = (manifest_keys(output) and inventory_shards()) or shards
    if recorded != shards:
        raise LayoutMismatch(
            f"{output.uri} was enriched with {recorded} shards, not {shards}: run with --shards {recorded} "
            f"(NORMALS_SHARDS={recorded}), or re-shard it first with "
            f"`normals-pipeline reshard --output {output.uri} --shards {shards}`"
        )
    if record and not output.exists(LAYOUT_PATH):
        _record_layout(output, shards)


def _record_layout(output: Storage, shards: int) -> None:
    output.write_bytes(LAYOUT_PATH, json.dumps({"shards": shards}).encode(), "application/json")


def manifest_keys(output: Storage) -> list[str]:
    """The partition keys that have a manifest file on the output."""
    prefix, suffix = f"{MANIFEST_DIR}/partition=", f"/{MANIFEST_FILE}"
    return sorted(
        path.removeprefix(prefix).removesuffix(suffix)
        for path in output.list_prefix(MANIFEST_DIR)
        if path.startswith(prefix) and path.endswith(suffix)
    )


def reshard(output: Storage, shards: int, shard_of: Callable[[str], str]) -> int:
    """Rewrite every manifest (journals folded in) into the partitions `shard_of` gives each path, and
    record the new count; returns the rows kept. Run it while no run writes to the output."""
    old_keys = sorted(set(manifest_keys(output)) | _journal_keys(output))
    journals = [Journal(output, key) for key in old_keys]
    frames = [load_shard(output, journal, key).previous for key, journal in zip(old_keys, journals)]
    rows = pd.concat(frames, ignore_index=True) if frames else empty_manifest()
    target = rows["path"].map(shard_of)
    for key, part in rows.groupby(target, sort=True):
        write_manifest(output, str(key), part.sort_values("path", ignore_index=True))
    for key in set(old_keys) - set(target):
        output.delete(partition_path(key))
    for journal in journals:
        journal.clear()
    _record_layout(output, shards)
    return len(rows)


def _journal_keys(output: Storage) -> set[str]:
    return {path.split("/")[1].removeprefix("partition=") for path in output.list_prefix(JOURNAL_DIR)}
