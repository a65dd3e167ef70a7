"""The manifest: one row per image, a pandera schema that defines it, and Parquet I/O in hive layout.

`<output>/manifest/partition=<key>/manifest.parquet` holds one shard, so
`pyarrow.dataset.dataset("<output>/manifest", partitioning=PARTITIONING)` reads a whole run, with the hive
column `partition` as the string the Dagster UI shows (`"01"`; plain `partitioning="hive"` infers int32).

While a shard runs, each finished row is also made durable before its worker goes on, in
`<output>/journal/partition=<key>/`, rows finished together sharing one file (`Journal`) (or, when the output
refuses the write, in a spool folder on this host, `spool_for`, where refused normal maps wait too), so a run
killed at any moment loses only the requests in flight: the next run folds the journal into the manifest,
then clears it.

Reading is where corruption is met: a manifest or journal file that cannot be parsed is moved to
`<output>/quarantine/` (kept, never deleted), named in a warning, and the shard is rebuilt from what is
readable. `<output>/layout.json` records the shard count the manifests were written with.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd
import pandera.pandas as pandera
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pandera.errors import SchemaErrors

from ._state import default_state_dir
from .storage import LocalStorage, Storage, path_problem

MANIFEST_DIR = "manifest"
MANIFEST_FILE = "manifest.parquet"
JOURNAL_DIR = "journal"
QUARANTINE_DIR = "quarantine"
LAYOUT_PATH = "layout.json"
HELD_KEY = b"normals_pipeline.journal_held"  # see `Held`
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
            # exactly what a listing yields (`storage.path_problem`): no listed path can fail this check
            pandera.Check(lambda s: s.map(path_problem).isna(), error="relative, no empty, '.' or '..' part"),
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


FAILURE_COLUMNS = ["column", "check", "failure_case"]
VALIDATED_TOGETHER = 20_000  # rows of manifests validated in one call (see `failure_cases_by`)


def failure_cases(df: pd.DataFrame) -> pd.DataFrame:
    """Every failing column and check of `df` (`FAILURE_COLUMNS`; empty when it passes), from one lazy validation:
    what the Dagster check and the Airflow validation report."""
    try:
        validate(df)
    except SchemaErrors as errors:
        return errors.failure_cases[FAILURE_COLUMNS]
    return pd.DataFrame(columns=FAILURE_COLUMNS)


def failure_cases_by(frames: Mapping[str, pd.DataFrame], rows: int = VALIDATED_TOGETHER) -> dict[str, pd.DataFrame]:
    """`failure_cases` of each frame, validating frames together, up to `rows` rows at a time, when they pass
    together: pandera's cost is mostly per call (7-20 ms for a shard's frame), and a run of 16 shards paid it
    16 times; `rows` bounds the copy a batch makes. Together means the same columns and dtypes, so
    concatenating changes no value's type; every check is then row by row (or, `unique`, stricter over all
    rows), so what passes together passes alone. Otherwise, frame by frame: each failure is named by its own
    frame's rows."""
    cases: dict[str, pd.DataFrame] = {}
    for batch in _batches(frames, rows):
        if len(batch) > 1 and _alike([frames[key] for key in batch]):
            if not len(failure_cases(pd.concat([frames[key] for key in batch], ignore_index=True))):
                cases.update((key, pd.DataFrame(columns=FAILURE_COLUMNS)) for key in batch)
                continue
        cases.update((key, failure_cases(frames[key])) for key in batch)
    return cases


def _batches(frames: Mapping[str, pd.DataFrame], rows: int) -> list[list[str]]:
    """The frames' keys in order, cut so that a batch holds at most `rows` rows (a larger frame alone)."""
    batches: list[list[str]] = [[]]
    held = 0
    for key, frame in frames.items():
        if batches[-1] and held + len(frame) > rows:
            batches.append([])
            held = 0
        batches[-1].append(key)
        held += len(frame)
    return [batch for batch in batches if batch]


def _alike(frames: list[pd.DataFrame]) -> bool:
    first = frames[0].dtypes
    return all(df.dtypes.index.equals(first.index) and (df.dtypes == first).all() for df in frames[1:])


@dataclass(frozen=True)
class Held:
    """The journal files a manifest holds already (all of `writers`', and those named in `files`), recorded in
    its Parquet metadata: folding skips them, so whether they were cleared after the write or not (a crash, a
    second writer reading in between), no row's cost is counted twice."""

    writers: frozenset[str] = frozenset()
    files: frozenset[str] = frozenset()

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and (path in self.files or _writer(path) in self.writers)


def _writer(path: str) -> str | None:
    """`<flush>.<writer>.jsonl` or `<hash>.<writer>.json` -> the writer; None for a row journaled before writers
    were named."""
    parts = path.rsplit("/", 1)[-1].split(".")
    return parts[1] if len(parts) == 3 else None


def write_manifest(output: Storage, partition_key: str, df: pd.DataFrame, held: Held | None = None) -> str:
    """Write one shard's manifest atomically; returns its URI. `held`: the journal files it holds."""
    table = pa.Table.from_pandas(df[COLUMNS], schema=ARROW_SCHEMA, preserve_index=False)
    if held is not None:
        mark = json.dumps({"writers": sorted(held.writers), "files": sorted(held.files)}).encode()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), HELD_KEY: mark})
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
    return _read_manifest(output, partition_key, warnings, set_aside)[0]


def _read_manifest(
    output: Storage, partition_key: str, warnings: list[str] | None, set_aside: bool
) -> tuple[pd.DataFrame, Held]:
    path = partition_path(partition_key)
    if not output.exists(path):
        return empty_manifest(), Held()
    try:
        data = output.read_bytes(path)
        table = pq.read_table(io.BytesIO(data), schema=ARROW_SCHEMA)
        mark = (pq.read_metadata(io.BytesIO(data)).metadata or {}).get(HELD_KEY)
    except (pa.ArrowException, ValueError) as error:
        _warn(warnings, (quarantine if set_aside else left_in_place)(output, path, error))
        return empty_manifest(), Held()
    held = json.loads(mark) if mark else {}
    frame = table.to_pandas(types_mapper=_PANDAS_TYPES.get)
    return frame, Held(frozenset(held.get("writers", ())), frozenset(held.get("files", ())))


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


JournalFile = tuple[str, str]  # ("output" or "spool", path)
COMMIT_TRIES = 5


@dataclass
class _Group:
    """Rows waiting to go out in one journal file, and how that write ended."""

    lines: list[str] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None


class Journal:
    """Finished rows of one shard, made durable in groups: rows that workers finish while a write is under
    way go out together in the next file, `<flush>.<writer>.jsonl` (JSON lines), and each `write` returns
    once the file holding its row is written (group commit), so a killed run loses only rows whose `write`
    had not returned, and the output sees one write per group, not per image. Each writer (this object)
    has its own files, so two writers of one shard never overwrite each other's receipts. A row carries
    what its writer paid (`charged`), which folding adds to what the path had cost: when a lost claim lets
    two runs write one shard, the rows of both count and the manifest still adds up to the bill. A row is
    a receipt for what was paid: if the output refuses its file (disk full, permission), the file goes to
    a spool folder on this host instead, and reading folds both in. Files of one row each,
    `<sha(path)>.<writer>.json`, left by earlier versions are read too."""

    def __init__(self, output: Storage, partition_key: str, spool: Storage | None = None) -> None:
        self.output = output
        self.folder = _journal_dir(partition_key)
        self.spool = spool or spool_for(output)
        self.writer = uuid.uuid4().hex[:12]
        self.written: set[JournalFile] = set()
        self._cond = threading.Condition()  # rows are written by the workers
        self._open = _Group()  # the rows the next write takes
        self._flushing = False
        self._flushes = 0

    def write(self, row: dict, charged: float | None = None) -> None:
        """Return once `row` is durable. `charged`: what this writer paid for the row (NaN: unknown); None:
        the row's `credits_consumed` is all the path has cost (a row rebuilt from a manifest)."""
        record = {**row, "processed_at": row["processed_at"].isoformat()}
        if charged is not None:
            record["charged"] = charged
        line = json.dumps(record)
        with self._cond:
            group = self._open
            group.lines.append(line)
            while not group.done:
                if self._flushing:  # another worker is writing an earlier group: ours goes next
                    self._cond.wait()
                else:
                    self._flush()  # ours is the open group: write it, with whatever joined it meanwhile
        if group.error is not None:
            raise group.error

    def _flush(self) -> None:
        """Write the open group as one file (called holding `_cond`, released during the write)."""
        group, self._open, self._flushing = self._open, _Group(), True
        name = f"{self.folder}/{self._flushes:08d}.{self.writer}.jsonl"
        self._flushes += 1
        self._cond.release()
        try:
            where = self._put(name, ("\n".join(group.lines) + "\n").encode())
        except BaseException as error:  # the spool refused it too: each waiter raises it
            group.error = error
        finally:
            self._cond.acquire()
            group.done, self._flushing = True, False
            if group.error is None:
                self.written.add((where, name))
            self._cond.notify_all()

    def _put(self, name: str, payload: bytes) -> str:
        try:
            self.output.write_bytes(name, payload, "application/json")
            return "output"
        except Exception:  # noqa: BLE001 - any refusal of the output: the receipts must land somewhere
            self.spool.write_bytes(name, payload, "application/json")
            return "spool"

    def entries(
        self, warnings: list[str], *, set_aside: bool = True, held: Held = Held()
    ) -> tuple[list[dict], set[JournalFile]]:
        """Every journaled row the manifest does not hold already (`held`), with its `charged` if it has one,
        and the files there are; unreadable files are quarantined with a warning (`set_aside=False`: left in
        place, with a warning)."""
        rows, files = [], set()
        for where, store in self._stores():
            for path in store.list_prefix(self.folder):
                if path in held:
                    files.add((where, path))
                    continue
                try:
                    rows += _journal_rows(store.read_bytes(path), path)
                except FileNotFoundError:  # folded into the manifest by another writer since the listing
                    continue
                except (ValueError, KeyError, TypeError) as error:
                    warnings.append((quarantine if set_aside else left_in_place)(store, path, error))
                else:
                    files.add((where, path))
        return rows, files

    def files(self) -> set[JournalFile]:
        return {(where, path) for where, store in self._stores() for path in store.list_prefix(self.folder)}

    def clear(self, files: set[JournalFile] | None = None) -> None:
        """Delete `files` (default: every one), once the manifest holds their rows."""
        chosen = self.files() if files is None else files
        for where, store in self._stores():
            store.delete_many(sorted(path for place, path in chosen if place == where))

    def _stores(self) -> list[tuple[str, Storage]]:
        return [("output", self.output), ("spool", self.spool)]


def _journal_rows(data: bytes, path: str) -> list[dict]:
    """The rows of one journal file: a group (JSON lines), or one row (a file of an earlier version)."""
    records = (
        [json.loads(line) for line in data.splitlines() if line.strip()]
        if path.endswith(".jsonl")
        else [json.loads(data)]
    )
    return [{**record, "processed_at": datetime.fromisoformat(record["processed_at"])} for record in records]


def with_journal(previous: pd.DataFrame, entries: list[dict]) -> pd.DataFrame:
    """The manifest as it would be had the last runs finished: journaled rows, oldest first, replace their
    path's row and add what they were `charged` to what the path had cost (unknown stays unknown); a row
    without `charged` (rebuilt from a manifest) brings its whole cost instead."""
    if not entries:
        return previous
    spent = dict(zip(previous["path"], previous["credits_consumed"]))
    latest: dict[str, dict] = {}
    for entry in sorted(entries, key=lambda row: row["processed_at"]):
        row = {column: entry.get(column) for column in COLUMNS}
        row["credits_consumed"] = math.nan if row["credits_consumed"] is None else float(row["credits_consumed"])
        if "charged" in entry:
            charged = math.nan if entry["charged"] is None else float(entry["charged"])
            row["credits_consumed"] = spent.get(row["path"], 0.0) + charged
        spent[row["path"]] = row["credits_consumed"]
        latest[row["path"]] = row
    journal = to_frame(list(latest.values()))
    kept = previous[~previous["path"].isin(journal["path"])]
    return pd.concat([kept, journal], ignore_index=True) if len(kept) else journal


@dataclass
class ShardState:
    """What is known of a shard before a run: its rows, what had to be set aside to read them, the journal
    files folded in and the manifest's version then (to tell, when writing, whether another writer came)."""

    previous: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    folded: set[JournalFile] = field(default_factory=set)
    version: str | None = None


def load_shard(output: Storage, journal: Journal, partition_key: str, *, set_aside: bool = True) -> ShardState:
    """`set_aside=False`: read only (the plan), unreadable files are left where they are."""
    warnings: list[str] = []
    version = _version(output, partition_key)  # before the read: a write after it shows as another writer's
    previous, held = _read_manifest(output, partition_key, warnings, set_aside)
    if warnings and set_aside:  # the manifest was unreadable and moved to quarantine
        version = None
    entries, folded = journal.entries(warnings, set_aside=set_aside, held=held)
    return ShardState(with_journal(previous, entries), warnings, folded, version)


def commit_shard(
    output: Storage,
    journal: Journal,
    partition_key: str,
    state: ShardState,
    built: pd.DataFrame,
    current: Callable[[pd.DataFrame], pd.DataFrame],
) -> tuple[pd.DataFrame, str, list[str]]:
    """Write a shard's manifest, then clear the journal files it holds; returns what was written, its URI
    and warnings. `built`: the manifest from `state` (read at the start) and this writer's rows. If another
    writer came meanwhile (a claim lost: a Redis restart or eviction, a holder paused past the claim's TTL),
    the shard is read again, every journaled row folded in, ours included, so no receipt is dropped;
    `current` keeps the rows of images still in the dataset."""
    warnings: list[str] = []
    for attempt in range(COMMIT_TRIES):
        if _version(output, partition_key) == state.version and not journal.files() - state.folded - journal.written:
            others = frozenset(path for _, path in state.folded if _writer(path) != journal.writer)
            uri = write_manifest(output, partition_key, built, Held(frozenset({journal.writer}), others))
            journal.clear(state.folded | journal.written)
            if attempt:
                warnings.append(f"shard {partition_key} was also written by another run meanwhile: all rows kept")
            return built, uri, warnings
        state = load_shard(output, journal, partition_key)
        built = current(state.previous)
        warnings += state.warnings
    raise RuntimeError(f"another run keeps writing shard {partition_key} (its rows stay journaled)")


def _version(output: Storage, partition_key: str) -> str | None:
    try:
        return output.stat(partition_path(partition_key)).version
    except FileNotFoundError:
        return None


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
