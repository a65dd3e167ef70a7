"""Training pairs: every enriched image as it was sent, next to its normal map, in files training loaders read.

The map is in the pixel grid of the image the API received, which is not always the file in the dataset:
`prepare` may have applied EXIF orientation, downscaled or converted it. So the image is read again, checked
against the manifest's `content_hash` and prepared again (`prepare` is deterministic), and the bytes it sends
are stored: upright pixels, no orientation tag, the map's size. A row whose source changed or vanished since,
whose map is gone, or whose sizes disagree is left out and counted by reason; it never fails the shard.

Layout under `<output>/training/`, one folder per dataset shard (hive key `partition`, as the manifest's):

    parquet/partition=<key>/<split>-<part>.parquet   image, normal_map, path, content_hash, width, height, split,
                                                     key, person_fraction, unit_norm_error, facing_fraction
    webdataset/<key>_<part>.tar + <key>_<part>_stats.json   (optional) img2dataset's layout

The three figures are `normals.MapQuality`'s, measured once as the pair is built. A map whose person covers
less than `min_person_fraction` of it (the flat map the API returns when it finds no one) is left out as
`no_person` unless `keep_no_person`: it would teach a model that a face is a wall. That reason is a fact of
the map, not a passing failure, so a build that left out only `no_person` maps is still reused.

`key` names a pair across the dataset, `<partition>_<index>`, the WebDataset sample's key (a pair added to a
kept build takes the next index; a rebuild numbers the shard's pairs again in path order). `split` is a column
inside the files (so every reader has it, Hugging Face `datasets` included, which reads no
hive keys) and the start of the file name (so `datasets` finds the splits by name). Each file holds at most
about `PART_BYTES` of images, so a shard of any size is written in bounded memory; a re-run rewrites the
shard's files and deletes those it did not write again, or keeps them when nothing they were made from changed
(recorded in `training/.built/<key>.json` and `.parquet`, a hidden folder no reader lists). When rows were
only added since, the files are kept and the new rows' pairs written as parts of their own: a run that
enriches 200 new images reads 200 sources again, not the whole shard.

`NormalsDataset` reads one split back as numpy arrays (image, normals, mask) for a torch `DataLoader` or
any other loop, without this package importing torch.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import math
import os
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from . import normals
from ._errors import ImageRejected
from ._memory import return_freed_buffers
from .enrich import normal_map_path
from .normals import InvalidNormalMap, MapQuality
from .prepare import Oversize, prepare
from .storage import LocalStorage, S3Storage, Storage, open_storage

TRAINING_DIR = "training"
PARQUET_DIR = f"{TRAINING_DIR}/parquet"
WEBDATASET_DIR = f"{TRAINING_DIR}/webdataset"
SPLITS = ("train", "validation", "test")
DEFAULT_SPLITS: Mapping[str, float] = {"train": 0.9, "validation": 0.05, "test": 0.05}
# Why a successful manifest row has no pair (counted, never raised).
LEFT_OUT_REASONS = (
    "source_missing",
    "source_unreadable",
    "source_changed",
    "map_missing",
    "map_unreadable",
    "size_mismatch",
    "no_person",
)
LASTING_REASONS = frozenset({"no_person"})  # a property of the map and the settings: the next run leaves it out too
MIN_PERSON_FRACTION = 0.01  # below this share of person pixels a map is `no_person`
# Mean | |n| - 1 | above which a map is reported: the emulator's maps (JPEG quality 90) measure 0.007-0.009.
UNIT_NORM_BOUND = 0.05
QUALITY_COLUMNS = ("person_fraction", "unit_norm_error", "facing_fraction")
PART_BYTES = 64 * 2**20  # image + map bytes per file: bounds memory, and a size loaders stream well
TABLE_CHUNK_BYTES = 8 * 2**20  # pairs turned into Arrow once they hold this much (or fill a row group)
ROW_GROUP_ROWS = 16  # small row groups: `NormalsDataset` reads one group per item it is asked for
READ_THREADS = 8  # sources and maps are read in parallel (S3 latency), a window at a time
STAMP_CHUNK = 4096  # rows joined per update of a stamp: ~4x faster than one per row, memory bounded
OPEN_FILES = 8  # Parquet files a NormalsDataset keeps open
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}

_IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
_FEATURES = {
    "image": {"_type": "Image"},
    "normal_map": {"_type": "Image"},
    "path": {"dtype": "string", "_type": "Value"},
    "content_hash": {"dtype": "string", "_type": "Value"},
    "width": {"dtype": "int32", "_type": "Value"},
    "height": {"dtype": "int32", "_type": "Value"},
    "split": {"dtype": "string", "_type": "Value"},
    "key": {"dtype": "string", "_type": "Value"},
    **{name: {"dtype": "float32", "_type": "Value"} for name in QUALITY_COLUMNS},
}
# `datasets` decodes the two struct columns as PIL images only with its features in the `huggingface` key.
SCHEMA = pa.schema(
    [
        pa.field("image", _IMAGE),
        pa.field("normal_map", _IMAGE),
        pa.field("path", pa.string()),
        pa.field("content_hash", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("key", pa.string()),
        *(pa.field(name, pa.float32()) for name in QUALITY_COLUMNS),  # null without a person pixel
    ],
    metadata={"huggingface": json.dumps({"info": {"features": _FEATURES}})},
)


def check_splits(fractions: Mapping[str, float]) -> dict[str, float]:
    """The fractions of `train`, `validation` and `test` (a missing one is 0): each finite and >= 0, summing to 1."""
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise ValueError(f"splits are {', '.join(SPLITS)}; unknown: {', '.join(sorted(unknown))}")
    checked = {split: float(fractions.get(split, 0.0)) for split in SPLITS}
    if not all(math.isfinite(value) and value >= 0 for value in checked.values()):
        raise ValueError(f"split fractions must be finite and >= 0, got {checked}")
    if not math.isclose(sum(checked.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must sum to 1, got {checked} (sum {sum(checked.values()):g})")
    return checked


def split_of(content_hash: str, fractions: Mapping[str, float] = DEFAULT_SPLITS) -> str:
    """The split of an image, from its content alone: a re-run never moves it and identical files share it.

    A SHA-256 of the content hash (salted, so it is independent of the map's folder, `hash[:2]`) read as a
    number in [0, 1) falls into the fractions' cumulative intervals; a split with fraction 0 gets nothing."""
    checked = check_splits(fractions)
    digest = hashlib.sha256(b"normals_pipeline.split\0" + content_hash.encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    used = [split for split in SPLITS if checked[split] > 0]
    bound = 0.0
    for split in used:
        bound += checked[split]
        if point < bound:
            return split
    return used[-1]  # the sum is 1 within rounding: the last interval takes what rounding left over


@dataclass(frozen=True)
class Pair:
    """One training example: the image as sent and its normal map, the same size."""

    path: str
    content_hash: str
    width: int
    height: int
    split: str
    image: bytes
    image_type: str  # the image's content type: JPEG, PNG (with alpha) or WEBP, as sent
    normal_map: bytes
    quality: MapQuality
    key: str = ""  # the sample key, given as the shard's writer takes the pair

    @property
    def nbytes(self) -> int:
        return len(self.image) + len(self.normal_map)


@dataclass
class TrainingResult:
    """What building one shard's pairs did."""

    pairs: int = 0
    left_out: Counter[str] = field(default_factory=Counter)
    splits: Counter[str] = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)  # paths written, relative to the output
    uri: str = ""  # the shard's Parquet folder
    reused: bool = False  # nothing changed since the last build: its files were kept
    quality: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(QUALITY_COLUMNS)))  # per pair


QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def quality_figures(
    result: TrainingResult, min_person_fraction: float = MIN_PERSON_FRACTION, unit_norm_bound: float = UNIT_NORM_BOUND
) -> dict[str, Any]:
    """A shard's maps as its quality check reports them: how many were measured, how many show no person
    (left out, or kept with `keep_no_person`), how many are off the unit sphere by more than the bound, and
    the quantiles of `person_fraction` over its pairs (`p50` the median), with the thresholds used."""
    fractions = result.quality["person_fraction"].astype("float64")
    left_out = result.left_out["no_person"]
    quantiles = {f"p{round(q * 100):02d}": round(float(fractions.quantile(q)), 4) for q in QUANTILES}
    return {
        "maps": result.pairs + left_out,
        "no_person": left_out + int((fractions < min_person_fraction).sum()),
        "unit_norm_above_bound": int((result.quality["unit_norm_error"].astype("float64") > unit_norm_bound).sum()),
        "person_fraction_quantiles": quantiles if len(fractions) else {},
        "min_person_fraction": min_person_fraction,
        "unit_norm_bound": unit_norm_bound,
    }


def successful_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows with a map and no error, by path (a stable order for files and WebDataset keys)."""
    ok = manifest["normal_map_uri"].notna() & manifest["error_code"].isna() & manifest["content_hash"].notna()
    return manifest.loc[ok].sort_values("path", kind="stable", ignore_index=True)


def make_pair(
    dataset: Storage,
    output: Storage,
    row: Mapping[str, Any],
    fractions: Mapping[str, float] = DEFAULT_SPLITS,
    oversize: Oversize = "downscale",
    min_person_fraction: float = MIN_PERSON_FRACTION,
    keep_no_person: bool = False,
) -> Pair | str:
    """A manifest row's pair, or the reason it has none (one of `LEFT_OUT_REASONS`).

    `oversize` is the enrichment's setting; for a successful row either value prepares the same bytes (a row
    refused for its size has no map), so the default is right unless `prepare` itself changed since."""
    try:
        data = dataset.read_bytes(row["path"])
    except FileNotFoundError:
        return "source_missing"
    except (OSError, ValueError):  # a FIFO swapped in (NotARegularFile), a permission, a path refused
        return "source_unreadable"
    if hashlib.sha256(data).hexdigest() != row["content_hash"]:
        return "source_changed"
    try:
        sent = prepare(data, oversize=oversize)
        normal_map = output.read_bytes(normal_map_path(row["content_hash"]))
    except ImageRejected:
        return "source_unreadable"
    except FileNotFoundError:
        return "map_missing"
    if _size(normal_map) != (sent.width, sent.height):
        return "size_mismatch"
    try:
        quality = normals.assess(normal_map)
    except InvalidNormalMap:
        return "map_unreadable"
    if quality.person_fraction < min_person_fraction and not keep_no_person:
        return "no_person"
    split = split_of(row["content_hash"], fractions)
    return Pair(
        row["path"],
        row["content_hash"],
        sent.width,
        sent.height,
        split,
        sent.data,
        sent.content_type,
        normal_map,
        quality,
    )


def _size(data: bytes) -> tuple[int, int] | None:
    """A JPEG's size from its header; None when it is no image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, SyntaxError, ValueError):
        return None


def make_pairs(
    dataset: Storage,
    output: Storage,
    rows: pd.DataFrame,
    fractions: Mapping[str, float] = DEFAULT_SPLITS,
    oversize: Oversize = "downscale",
    min_person_fraction: float = MIN_PERSON_FRACTION,
    keep_no_person: bool = False,
) -> Iterator[Pair | str]:
    """`make_pair` for each row, in order, READ_THREADS at a time, a window of rows in memory at once."""
    records = rows.to_dict("records")
    window = 4 * READ_THREADS

    def pair(row: Mapping[str, Any]) -> Pair | str:
        return make_pair(dataset, output, row, fractions, oversize, min_person_fraction, keep_no_person)

    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="training-pairs") as pool:
        for start in range(0, len(records), window):
            yield from pool.map(pair, records[start : start + window])


def shard_folder(partition_key: str) -> str:
    return f"{PARQUET_DIR}/partition={partition_key}"


def write_training_pairs(
    dataset: Storage,
    output: Storage,
    partition_key: str,
    manifest: pd.DataFrame,
    *,
    splits: Mapping[str, float] = DEFAULT_SPLITS,
    webdataset: bool = False,
    oversize: Oversize = "downscale",
    min_person_fraction: float = MIN_PERSON_FRACTION,
    keep_no_person: bool = False,
) -> TrainingResult:
    """Build one shard's pairs from its manifest and write them (see the module docstring for the layout).

    Idempotent: the shard's files are rewritten, and its files from an earlier run that this one did not
    write (a split or part that is now empty, WebDataset shards after `webdataset` was turned off) deleted.
    A shard whose successful rows and settings are those of its last build, which left nothing out but
    `no_person` maps and whose files are all still there, is kept as it is (`reused`): a re-run reads no image
    again, as it sends none. One whose rows were only added to since such a build keeps its files and gets the
    new pairs added."""
    fractions = check_splits(splits)
    return_freed_buffers()  # images and parts of megabytes each: keep the peak from staying
    rows = successful_rows(manifest)
    settings = _settings(fractions, webdataset, min_person_fraction, keep_no_person)
    stamp = _stamp(rows, settings)
    last = _last_build(output, partition_key)
    if last is not None and last.record["stamp"] == stamp:
        return last.result
    kept = _extendable(last, settings, rows)
    todo = rows if kept is None else rows[~_keys(rows).isin(_keys(last.rows))]
    writer = _ShardWriter(output, partition_key, webdataset, kept)
    result = TrainingResult(uri=output.uri_for(shard_folder(partition_key)))
    measured = pd.DataFrame(columns=list(QUALITY_COLUMNS), dtype="float64")
    if kept is not None:
        result.pairs, result.splits, result.left_out = kept.pairs, Counter(kept.splits), Counter(kept.left_out)
        measured = last.rows.set_index(_keys(last.rows))[list(QUALITY_COLUMNS)].dropna(subset=["person_fraction"])
    figures = {}
    outcomes = make_pairs(dataset, output, todo, fractions, oversize, min_person_fraction, keep_no_person)
    for key, outcome in zip(_keys(todo), outcomes):
        if isinstance(outcome, str):
            result.left_out[outcome] += 1
            continue
        writer.add(outcome)
        figures[key] = [getattr(outcome.quality, name) for name in QUALITY_COLUMNS]
        result.pairs += 1
        result.splits[outcome.split] += 1
    result.files = writer.close()
    new = pd.DataFrame.from_dict(figures, orient="index", columns=list(QUALITY_COLUMNS), dtype="float64")
    built = _with_quality(rows, pd.concat([measured, new]) if len(measured) else new)
    result.quality = _pair_quality(built)
    _record_build(output, partition_key, built, {"stamp": stamp, "settings": _digest(settings)}, result)
    return result


def _with_quality(rows: pd.DataFrame, figures: pd.DataFrame) -> pd.DataFrame:
    """The rows' path and content hash with each pair's figures (NaN for a row left out)."""
    built = rows[["path", "content_hash"]].reset_index(drop=True)
    keys = _keys(built)
    for name in QUALITY_COLUMNS:
        built[name] = keys.map(figures[name]).astype("float64") if len(figures) else float("nan")
    return built


def _pair_quality(built: pd.DataFrame) -> pd.DataFrame:
    """The figures of the rows that are pairs (a pair always has a `person_fraction`)."""
    return built.dropna(subset=["person_fraction"])[list(QUALITY_COLUMNS)].reset_index(drop=True)


def _build_record(partition_key: str, suffix: str = "json") -> str:
    """Where a shard's last build is recorded: a hidden folder, which no reader of the pairs lists. The
    `.parquet` beside it lists the rows (path, content hash) it was made from, with their pairs' figures."""
    return f"{TRAINING_DIR}/.built/{partition_key}.{suffix}"


def build_stamp(output: Storage, partition_key: str) -> str | None:
    """The stamp of a shard's last build (None: never built): its pairs are the same as long as it is."""
    try:
        return json.loads(output.read_bytes(_build_record(partition_key)))["stamp"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def _record_build(
    output: Storage, partition_key: str, built: pd.DataFrame, stamps: dict, result: TrainingResult
) -> None:
    """The rows first, the record last: a record names only a build whose rows are written (see `_extendable`)."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(built, preserve_index=False), buffer)
    output.write_bytes(_build_record(partition_key, "parquet"), buffer.getvalue(), "application/vnd.apache.parquet")
    record = {**stamps, **{name: getattr(result, name) for name in ("pairs", "left_out", "splits", "files")}}
    output.write_bytes(_build_record(partition_key), json.dumps(record).encode(), "application/json")


def _keys(rows: pd.DataFrame) -> pd.Series:
    """One string per row naming what its pair is made from: its path and its content."""
    return rows["path"] + "\0" + rows["content_hash"]


def _settings(fractions: Mapping[str, float], webdataset: bool, min_person_fraction: float, keep: bool) -> bytes:
    """What a shard's pairs are made with, besides its rows (the columns and the no_person rule included)."""
    quality = [min_person_fraction, keep, normals.FACING_ANGLE]
    return json.dumps(
        [sorted(fractions.items()), webdataset, PART_BYTES, ROW_GROUP_ROWS, SCHEMA.names, quality]
    ).encode()


def _digest(settings: bytes) -> str:
    return hashlib.sha256(settings).hexdigest()


def _stamp(rows: pd.DataFrame, settings: bytes) -> str:
    """What a shard's pairs are made from: its successful rows (a changed file has a new hash) and the settings."""
    digest = hashlib.sha256(settings)
    paths, hashes = rows["path"].tolist(), rows["content_hash"].tolist()
    for start in range(0, len(paths), STAMP_CHUNK):  # the same bytes as a line per row, hashed a chunk at a time
        chunk = zip(paths[start : start + STAMP_CHUNK], hashes[start : start + STAMP_CHUNK])
        digest.update("".join([f"{path}\0{content_hash}\n" for path, content_hash in chunk]).encode())
    return digest.hexdigest()


@dataclass
class _LastBuild:
    record: dict
    result: TrainingResult  # `reused`
    rows: pd.DataFrame  # what it was made from, with its pairs' figures


def _last_build(output: Storage, partition_key: str) -> _LastBuild | None:
    """The last build, if it left nothing out but for lasting reasons (a source unreadable then may be readable
    now), its files are all there and its rows' list can be read."""
    try:
        record = json.loads(output.read_bytes(_build_record(partition_key)))
        rows = pq.read_table(pa.BufferReader(output.read_bytes(_build_record(partition_key, "parquet")))).to_pandas()
    except (FileNotFoundError, ValueError, pa.ArrowException):
        return None
    if set(record["left_out"]) - LASTING_REASONS or not all(output.exists(path) for path in record["files"]):
        return None
    if not set(QUALITY_COLUMNS) <= set(rows.columns):  # built by a version without the figures
        return None
    result = TrainingResult(
        record["pairs"],
        Counter(record["left_out"]),
        Counter(record["splits"]),
        record["files"],
        output.uri_for(shard_folder(partition_key)),
        reused=True,
        quality=_pair_quality(rows),
    )
    return _LastBuild(record, result, rows)


def _extendable(last: _LastBuild | None, settings: bytes, rows: pd.DataFrame) -> TrainingResult | None:
    """The last build, when `rows` only add to the rows it was made from with the same settings: its files are
    kept and only the new rows' pairs are written. The rows read must be the record's own (its stamp), so rows
    written by a build that stopped before its record never pass for built."""
    if last is None or last.record.get("settings") != _digest(settings):
        return None
    if _stamp(last.rows, settings) != last.record["stamp"]:
        return None
    if not _keys(last.rows).isin(_keys(rows)).all():  # a row changed or went: its pair must go, so rebuild
        return None
    return replace(last.result, reused=False)


class _ShardWriter:
    """Buffers a shard's pairs per split (and for its WebDataset), writing a part whenever one is full."""

    def __init__(self, output: Storage, partition_key: str, webdataset: bool, kept: TrainingResult | None) -> None:
        """`kept`: the last build, whose files stay; parts and sample keys go on after its own."""
        self.output = output
        self.key = partition_key
        self.webdataset = webdataset
        self.buffers: dict[str, list[Pair]] = {split: [] for split in SPLITS}  # pairs not in `tables` yet
        self.tables: dict[str, list[pa.Table]] = {split: [] for split in SPLITS}  # the part so far, as Arrow
        self.buffered: Counter[str] = Counter()  # bytes in each split's part so far, and in the tar's ("")
        self.parts: Counter[str] = Counter()
        self.samples: list[Pair] = []
        self.tar_parts = 0
        self.pairs = 0  # pairs taken so far: sample keys go on from there
        self.written: list[str] = []
        if kept is not None:
            self._go_on_after(kept)

    def _go_on_after(self, kept: TrainingResult) -> None:
        for path in kept.files:
            name = posixpath.basename(path)
            if name.endswith(".parquet"):
                split, _, part = name.removesuffix(".parquet").rpartition("-")
                self.parts[split] = max(self.parts[split], int(part) + 1)
            elif name.endswith(".tar"):
                self.tar_parts = max(self.tar_parts, int(name.removesuffix(".tar").rpartition("_")[2]) + 1)
        self.pairs = kept.pairs
        self.written = list(kept.files)

    def add(self, pair: Pair) -> None:
        pair = replace(pair, key=sample_key(self.key, self.pairs))
        self.pairs += 1
        buffer = self.buffers[pair.split]
        buffer.append(pair)
        self.buffered[pair.split] += pair.nbytes
        if len(buffer) == ROW_GROUP_ROWS or sum(p.nbytes for p in buffer) >= TABLE_CHUNK_BYTES:
            self._to_arrow(pair.split)
        if self.buffered[pair.split] >= PART_BYTES:
            self._flush(pair.split)
        if self.webdataset:
            self.samples.append(pair)
            self.buffered[""] += pair.nbytes
            if self.buffered[""] >= PART_BYTES:
                self._flush_tar()

    def close(self) -> list[str]:
        for split in SPLITS:
            if self.buffers[split] or self.tables[split]:
                self._flush(split)
        if self.samples:
            self._flush_tar()
        self._delete_stale()
        return self.written

    def _flush(self, split: str) -> None:
        path = f"{shard_folder(self.key)}/{split}-{self.parts[split]:05d}.parquet"
        self.parts[split] += 1
        self._to_arrow(split)
        table = pa.concat_tables(self.tables[split])  # the chunks as they are, not copied
        self.tables[split], self.buffered[split] = [], 0
        self.output.write_stream(path, lambda file: write_parquet(table, file), "application/vnd.apache.parquet")
        self.written.append(path)

    def _to_arrow(self, split: str) -> None:
        """The split's buffered pairs into the part's Arrow chunks, a few at a time: the part's bytes are held
        once (as Arrow), not as pairs and again as the table made of them at the part's end."""
        if self.buffers[split]:
            self.tables[split].append(pairs_table(self.buffers[split]))
            self.buffers[split] = []

    def _flush_tar(self) -> None:
        """A tar of img2dataset's layout, then its stats file (written last, as img2dataset's completion marker)."""
        name = f"{WEBDATASET_DIR}/{self.key}_{self.tar_parts:04d}"
        self._put(f"{name}.tar", tar_bytes(self.samples), "application/x-tar")
        stats = {
            "count": len(self.samples),
            "successes": len(self.samples),
            "splits": dict(Counter(pair.split for pair in self.samples)),
        }
        self._put(f"{name}_stats.json", json.dumps(stats).encode(), "application/json")
        self.tar_parts += 1
        self.samples, self.buffered[""] = [], 0

    def _put(self, path: str, data: bytes, content_type: str) -> None:
        self.output.write_bytes(path, data, content_type)
        self.written.append(path)

    def _delete_stale(self) -> None:
        ours = self.output.list_prefix(shard_folder(self.key))
        ours += [p for p in self.output.list_prefix(WEBDATASET_DIR) if posixpath.basename(p).startswith(f"{self.key}_")]
        for path in set(ours) - set(self.written):
            self.output.delete(path)


def pairs_table(pairs: list[Pair]) -> pa.Table:
    """Pairs as a table in `SCHEMA`."""
    columns = {
        "image": [{"bytes": p.image, "path": p.path} for p in pairs],
        "normal_map": [{"bytes": p.normal_map, "path": normal_map_path(p.content_hash)} for p in pairs],
        "path": [p.path for p in pairs],
        "content_hash": [p.content_hash for p in pairs],
        "width": [p.width for p in pairs],
        "height": [p.height for p in pairs],
        "split": [p.split for p in pairs],
        "key": [p.key for p in pairs],
        **{name: [getattr(p.quality, name) for p in pairs] for name in QUALITY_COLUMNS},
    }
    return pa.table(columns, schema=SCHEMA)


def write_parquet(table: pa.Table, file: BinaryIO) -> None:
    """A `pairs_table` as Parquet into `file`; the images are stored uncompressed (they are JPEG/PNG/WEBP already)."""
    compression = {name: "zstd" for name in SCHEMA.names} | {"image": "none", "normal_map": "none"}
    pq.write_table(table, file, compression=compression, row_group_size=ROW_GROUP_ROWS)


def sample_key(partition_key: str, index: int) -> str:
    """A WebDataset key: no dots (webdataset cuts a member's name at the first dot into key and field)."""
    return f"{partition_key}_{index:06d}"


def tar_bytes(pairs: list[Pair]) -> bytes:
    """`{key}.jpg|png|webp` (the image as sent), `{key}.normal.jpg` and `{key}.json` per pair, in that order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for pair in pairs:
            key = pair.key
            meta = {
                "key": key,
                "path": pair.path,
                "content_hash": pair.content_hash,
                "width": pair.width,
                "height": pair.height,
                "split": pair.split,
                "status": "success",
            }
            members = (
                (f"{key}.{_EXTENSIONS[pair.image_type]}", pair.image),
                (f"{key}.normal.jpg", pair.normal_map),
                (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode()),
            )
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: a re-run writes the same bytes
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def split_files(output: Storage, split: str) -> list[str]:
    """The Parquet files of one split, in shard and part order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return sorted(
        path
        for path in output.list_prefix(PARQUET_DIR)
        if posixpath.basename(path).startswith(f"{split}-") and path.endswith(".parquet")
    )


class _S3File(io.RawIOBase):
    """A read-only, seekable view of an S3 object through ranged GETs, so a Parquet reader fetches only the
    footer and the row groups it needs, with the storage's own client (endpoint, credentials)."""

    def __init__(self, storage: S3Storage, path: str) -> None:
        super().__init__()
        self.client, self.bucket, self.key = storage.client, storage.bucket, storage.prefix + path
        self.size = storage.stat(path).size or 0
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: Any) -> int:
        end = min(self.position + len(buffer), self.size)
        if end <= self.position:
            return 0
        answer = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.position}-{end - 1}")
        data = answer["Body"].read()
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


class NormalsDataset:
    """One split of the training pairs as a map-style dataset: `dataset[i]` is a dict of numpy arrays

        image    H×W×3 uint8, the image as sent to the API (upright)
        normals  H×W×3 float32 unit vectors in `convention` (see `normals_pipeline.normals.CONVENTIONS`)
        mask     H×W bool, True on the person

    `size=(width, height)` resizes all three alike (image bicubic; normals bilinear then renormalised, mask
    nearest, by `normals.resize`). `hflip` is the probability of a horizontal flip of all three (X negated),
    drawn from (`seed`, the epoch set by `set_epoch`, the index): reproducible, and different every epoch.

    Works with `torch.utils.data.DataLoader` (workers included: file handles are reopened in each process)
    without this package importing torch; `DataLoader`'s default collate turns the arrays into tensors.
    """

    def __init__(
        self,
        output: str | Storage,
        split: str = "train",
        convention: str = "opengl",
        size: tuple[int, int] | None = None,
        hflip: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip is a probability from 0 to 1, got {hflip}")
        self._storage: Storage | None = open_storage(output) if isinstance(output, str) else output
        self._uri = self._storage.uri
        self.split, self.convention, self.size, self.hflip, self.seed = split, convention, size, hflip, seed
        self.epoch = 0
        self.files = split_files(self._storage, split)
        self._handles: dict[int, pq.ParquetFile] = {}
        self._cached: tuple[int, pa.Table] | None = None  # the last row group read: loaders mostly go in order
        self._groups: list[tuple[int, int]] = []  # (file, row group) in order
        self._starts: list[int] = []  # the first item of each group
        total = 0
        for index in range(len(self.files)):
            metadata = self._parquet(index).metadata
            for group in range(metadata.num_row_groups):
                self._groups.append((index, group))
                self._starts.append(total)
                total += metadata.row_group(group).num_rows
        self._length = total

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """A new draw of the augmentation for every item (as `datasets` and webdataset name it)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} pairs")
        index %= self._length
        group = bisect.bisect_right(self._starts, index) - 1
        row = self._row(group, index - self._starts[group])
        with Image.open(io.BytesIO(row["image"]["bytes"])) as opened:
            image = opened.convert("RGB")
        vectors, mask = normals.decode(row["normal_map"]["bytes"], convention=self.convention)
        if self.size is not None:
            image = image.resize(tuple(self.size), Image.Resampling.BICUBIC)
            vectors, mask = normals.resize(vectors, mask, tuple(self.size))
        pixels = np.asarray(image)
        if self.hflip and np.random.default_rng([self.seed, self.epoch, index]).random() < self.hflip:
            pixels = pixels[:, ::-1]
            vectors, mask = normals.flip_horizontal(vectors, mask)
        return {"image": np.ascontiguousarray(pixels), "normals": vectors, "mask": mask}

    def _row(self, group: int, offset: int) -> dict[str, Any]:
        """One row's images, reading only its row group."""
        if self._cached is None or self._cached[0] != group:
            file, row_group = self._groups[group]
            self._cached = (group, self._parquet(file).read_row_group(row_group, columns=["image", "normal_map"]))
        return self._cached[1].slice(offset, 1).to_pylist()[0]

    def _parquet(self, index: int) -> pq.ParquetFile:
        """File `index`, opened on first use; at most `OPEN_FILES` stay open (a split may have thousands)."""
        if index not in self._handles:
            if len(self._handles) >= OPEN_FILES:
                self._handles.pop(next(iter(self._handles))).close()
            storage = self._store()
            path = self.files[index]
            if isinstance(storage, LocalStorage):
                source: Any = os.path.join(storage.root, path)
            elif isinstance(storage, S3Storage):
                source = _S3File(storage, path)
            else:
                source = io.BytesIO(storage.read_bytes(path))
            self._handles[index] = pq.ParquetFile(source)
        return self._handles[index]

    def _store(self) -> Storage:
        if self._storage is None:
            self._storage = open_storage(self._uri)
        return self._storage

    def __getstate__(self) -> dict[str, Any]:
        """For DataLoader workers: no open files, and an S3 storage reopened from its URI (a boto3 client
        does not pickle; the worker's client comes from the same AWS environment)."""
        state = {**self.__dict__, "_handles": {}, "_cached": None}
        if not isinstance(self._storage, LocalStorage):
            state["_storage"] = None
        return state
