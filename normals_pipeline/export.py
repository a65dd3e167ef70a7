"""Trainers' own folder layouts, written from the training pairs: no API request, nothing read but the pairs.

Under `<output>/training/<layout>/`, one file stem per pair: its sample key (`<partition>_<index>`, the pairs'
`key` column and the WebDataset sample's), unique across the dataset. Images are the bytes the API was sent
(their own extension: jpg, png or webp); normals are `normals.decode`'s unit vectors in the convention asked
for, with the background (0, 0, 0); masks are the decoded masks, uint8 255 = person.

    sapiens   <split>/images/<stem>.<ext>, <split>/masks/<stem>.png, <split>/normals/<stem>.npy (float32 H×W×3)
    marigold  <split>/images/<stem>.<ext>, <split>/normals/<stem>.npy, and <split>.txt: "rgb normal" per line
    dsine     <split>/<stem>_img.<ext>, <split>/<stem>_normal.png, <split>/<stem>_mask.png, and <split>.txt
              listing the images as DSINE's split files do; its loader reads rgb / 255 * 2 - 1 and takes the
              pixels summing to 0 (the background) as no ground truth

and `meta.json` naming the convention, its axes and the encodings. Each layout has a default convention (the
trainer's): sapiens `opencv`, marigold `opengl`, dsine `dsine`.

A partition is written from its pairs, and recorded in `<layout>/.built/<partition>.json` (hidden: no reader
lists it) with the pairs' build stamp and each sample's files. A re-run whose pairs and settings are unchanged
writes nothing; otherwise only the samples that are new or changed are written, and files no sample names any
more are deleted. The lists and `meta.json` are rewritten only when their content changes.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from . import normals
from .manifest import read_manifest
from .storage import Storage
from .training import (
    DEFAULT_SPLITS,
    MIN_PERSON_FRACTION,
    PARQUET_DIR,
    READ_THREADS,
    SPLITS,
    TRAINING_DIR,
    UNIT_NORM_BOUND,
    TrainingResult,
    build_stamp,
    quality_figures,
    write_training_pairs,
)

LAYOUTS: Mapping[str, str] = MappingProxyType({"sapiens": "opencv", "marigold": "opengl", "dsine": "dsine"})
_LISTED = ("marigold", "dsine")  # the layouts with <split>.txt file lists
_VERSION = 1  # of the files written: a change rewrites every sample
_EXTENSIONS = {b"\xff\xd8\xff": "jpg", b"\x89PNG": "png", b"RIFF": "webp"}
_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "npy": "application/octet-stream",
    "txt": "text/plain",
    "json": "application/json",
}


@dataclass
class ExportResult:
    """What exporting did: samples in the layout, files written and deleted this time."""

    layout: str
    convention: str
    samples: int = 0
    written: int = 0
    deleted: int = 0
    reused: bool = False  # nothing changed since the last export: nothing was read or written
    uri: str = ""

    def add(self, other: ExportResult) -> None:
        self.samples += other.samples
        self.written += other.written
        self.deleted += other.deleted
        self.reused = self.reused and other.reused


@dataclass
class ShardBuild:
    """One shard's training files: its pairs, their quality figures (what the quality check reports), and each
    layout's export."""

    pairs: TrainingResult
    quality: dict[str, Any]
    exported: dict[str, ExportResult]


def build_shard(
    dataset: Storage,
    output: Storage,
    partition_key: str,
    *,
    warn: Callable[[str], None],
    splits: Mapping[str, float] = DEFAULT_SPLITS,
    webdataset: bool = False,
    min_person_fraction: float = MIN_PERSON_FRACTION,
    keep_no_person: bool = False,
    layouts: Mapping[str, str] = MappingProxyType({}),
    present: Mapping[str, set[str]] = MappingProxyType({}),
) -> ShardBuild:
    """A shard's pairs from its manifest, then the same pairs in each of `layouts` ({layout: convention};
    `present`: each layout's files, listed once by the caller): what the Dagster asset and the Airflow task run
    for every shard. `warn` hears of a manifest that had to be set aside to read."""
    warnings: list[str] = []
    shard = read_manifest(output, partition_key, warnings)
    for warning in warnings:
        warn(warning)
    pairs = write_training_pairs(
        dataset,
        output,
        partition_key,
        shard,
        splits=splits,
        webdataset=webdataset,
        min_person_fraction=min_person_fraction,
        keep_no_person=keep_no_person,
    )
    exported = {
        layout: export_partition(output, partition_key, layout, convention, present.get(layout))
        for layout, convention in layouts.items()
    }
    return ShardBuild(pairs, quality_figures(pairs, min_person_fraction, UNIT_NORM_BOUND), exported)


def check_layout(layout: str, convention: str | None = None) -> str:
    """The convention to write `layout` in (its default when None); an unknown layout or convention is refused."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: known are {', '.join(LAYOUTS)}")
    convention = convention or LAYOUTS[layout]
    if convention not in normals.CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}: known are {', '.join(normals.CONVENTIONS)}")
    return convention


def layout_dir(layout: str) -> str:
    return f"{TRAINING_DIR}/{layout}"


def pair_partitions(output: Storage) -> list[str]:
    """The partitions with training pairs, from their folders (`partition=<key>`)."""
    keys = {path.split("/")[0].removeprefix("partition=") for path in _relative(output, PARQUET_DIR)}
    return sorted(keys)


def export_layout(output: Storage, layout: str, convention: str | None = None) -> ExportResult:
    """Every partition's pairs in `layout`, then its lists and `meta.json` (what `normals-pipeline export` does)."""
    return export_partitions(output, pair_partitions(output), layout, convention, finish=True)


def export_partitions(
    output: Storage, keys: Iterable[str], layout: str, convention: str | None = None, finish: bool = True
) -> ExportResult:
    """These partitions in `layout`, listing the layout's files once for all; `finish`: then the lists and
    `meta.json` (from every partition's record, so a run of a few partitions keeps the others' entries)."""
    convention = check_layout(layout, convention)
    present = set(output.list_prefix(layout_dir(layout)))
    total = ExportResult(layout, convention, reused=True, uri=output.uri_for(layout_dir(layout)))
    for key in keys:
        total.add(export_partition(output, key, layout, convention, present))
    if finish:
        total.written += finish_layout(output, layout, convention)
    return total


def export_partition(
    output: Storage, partition_key: str, layout: str, convention: str | None = None, present: set[str] | None = None
) -> ExportResult:
    """One partition's pairs in `layout` (see the module for what is reused). `present`: the layout's files,
    listed once by the caller for many partitions."""
    convention = check_layout(layout, convention)
    result = ExportResult(layout, convention, uri=output.uri_for(layout_dir(layout)))
    present = set(output.list_prefix(layout_dir(layout))) if present is None else present
    source = build_stamp(output, partition_key)
    settings = [layout, convention, _VERSION]
    last = _read_json(output, _record(layout, partition_key)) or {}
    same = last.get("settings") == settings
    kept = last.get("samples", {}) if same else {}
    if same and last.get("source") == source and _all_present(kept.values(), present):
        result.samples, result.reused = len(kept), True
        return result
    samples: dict[str, dict[str, Any]] = {}
    todo: list[dict[str, Any]] = []

    def write(rows: list[dict[str, Any]]) -> None:
        for row, files in zip(rows, pool.map(lambda row: _write_sample(output, layout, convention, row), rows)):
            samples[row["key"]] = {"content_hash": row["content_hash"], "split": row["split"], "files": files}
            result.written += len(files)
        rows.clear()

    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="export") as pool:
        for row in _pair_rows(output, partition_key):
            before = kept.get(row["key"])
            if before and (before["content_hash"], before["split"]) == (row["content_hash"], row["split"]):
                if _all_present([before], present):
                    samples[row["key"]] = before
                    continue
            todo.append(row)
            if len(todo) >= 4 * READ_THREADS:  # a window of pairs in memory at once
                write(todo)
        write(todo)
    named = {path for sample in samples.values() for path in sample["files"]}
    for path in sorted({path for sample in last.get("samples", {}).values() for path in sample["files"]} - named):
        output.delete(path)
        result.deleted += 1
    record = {"source": source, "settings": settings, "samples": samples}
    output.write_bytes(_record(layout, partition_key), json.dumps(record).encode(), _TYPES["json"])
    result.samples = len(samples)
    return result


def finish_layout(output: Storage, layout: str, convention: str) -> int:
    """`meta.json` and, for the layouts that have them, `<split>.txt` from every partition's record: written
    only when their content changed. Returns the files written."""
    files = {"meta.json": json.dumps(_meta(layout, convention), indent=2).encode() + b"\n"}
    if layout in _LISTED:
        lines: dict[str, list[str]] = {split: [] for split in SPLITS}
        for key in pair_partitions(output):
            samples = (_read_json(output, _record(layout, key)) or {}).get("samples") or {}
            for _, sample in sorted(samples.items()):
                lines[sample["split"]].append(_list_line(layout, sample["files"]))
        files |= {f"{split}.txt": "".join(f"{line}\n" for line in lines[split]).encode() for split in SPLITS}
    written = 0
    for name, data in files.items():
        path = f"{layout_dir(layout)}/{name}"
        if _read(output, path) != data:
            output.write_bytes(path, data, _TYPES[name.rpartition(".")[2]])
            written += 1
    return written


def sample_arrays(normal_map: bytes, convention: str) -> tuple[np.ndarray, np.ndarray]:
    """The normals (H×W×3 float32 in `convention`, background (0, 0, 0)) and the mask (H×W uint8, 255 = person)
    every layout writes, from `normals.decode`."""
    vectors, mask = normals.decode(normal_map, convention)
    return np.ascontiguousarray(vectors * mask[..., None], dtype=np.float32), mask.astype(np.uint8) * np.uint8(255)


def _write_sample(output: Storage, layout: str, convention: str, row: Mapping[str, Any]) -> list[str]:
    """Write one pair's files; returns their paths."""
    files = _sample_files(layout, convention, row)
    for path, data in files.items():
        output.write_bytes(path, data, _TYPES.get(path.rpartition(".")[2], "image/png"))
    return list(files)


def _sample_files(layout: str, convention: str, row: Mapping[str, Any]) -> dict[str, bytes]:
    """A pair's files in `layout`, by path under the output."""
    stem, split, image = row["key"], row["split"], row["image"]["bytes"]
    vectors, mask = sample_arrays(row["normal_map"]["bytes"], convention)
    base, ext = f"{layout_dir(layout)}/{split}", _extension(image)
    if layout == "dsine":
        encoded = np.where(mask[..., None] > 0, np.round((vectors + 1) * 127.5), 0).astype(np.uint8)
        return {
            f"{base}/{stem}_img.{ext}": image,
            f"{base}/{stem}_normal.png": _png(encoded),
            f"{base}/{stem}_mask.png": _png(mask),
        }
    files = {f"{base}/images/{stem}.{ext}": image, f"{base}/normals/{stem}.npy": _npy(vectors)}
    if layout == "sapiens":
        files[f"{base}/masks/{stem}.png"] = _png(mask)
    return files


def _list_line(layout: str, files: list[str]) -> str:
    """A sample's line in `<split>.txt`, relative to the layout's folder: `rgb normal` (Marigold) or the
    image alone (DSINE, whose loader finds the normal beside it)."""
    relative = [path.removeprefix(f"{layout_dir(layout)}/") for path in files]
    if layout == "dsine":
        return relative[0]
    return f"{relative[0]} {relative[1]}"


def _meta(layout: str, convention: str) -> dict[str, Any]:
    axes = normals.CONVENTIONS[convention]
    return {
        "layout": layout,
        "convention": convention,
        "axes": {"x": axes.x, "y": axes.y, "z": axes.z},
        "normals": "dsine PNG: rgb = round((n + 1) * 127.5), background (0, 0, 0)"
        if layout == "dsine"
        else "npy: float32 H×W×3 unit vectors, background (0, 0, 0)",
        "masks": "PNG uint8, 255 = person" if layout != "marigold" else None,
        "stem": "<partition>_<index>: the training pairs' key column and the WebDataset sample key",
    }


def _pair_rows(output: Storage, partition_key: str) -> Iterator[dict[str, Any]]:
    """The partition's pairs, a row group at a time (bounded memory), from its Parquet files."""
    for path in sorted(_relative(output, f"{PARQUET_DIR}/partition={partition_key}")):
        if not path.endswith(".parquet"):
            continue
        data = output.read_bytes(f"{PARQUET_DIR}/partition={partition_key}/{path}")
        parquet = pq.ParquetFile(io.BytesIO(data))
        columns = ["key", "split", "content_hash", "image", "normal_map"]
        for group in range(parquet.metadata.num_row_groups):
            yield from parquet.read_row_group(group, columns=columns).to_pylist()


def _record(layout: str, partition_key: str) -> str:
    return f"{layout_dir(layout)}/.built/{partition_key}.json"


def _all_present(samples: Iterable[Mapping[str, Any]], present: set[str]) -> bool:
    return all(path in present for sample in samples for path in sample["files"])


def _relative(output: Storage, folder: str) -> list[str]:
    return [posixpath.relpath(path, folder) for path in output.list_prefix(folder)]


def _read(output: Storage, path: str) -> bytes | None:
    try:
        return output.read_bytes(path)
    except FileNotFoundError:
        return None


def _read_json(output: Storage, path: str) -> dict | None:
    data = _read(output, path)
    try:
        return None if data is None else json.loads(data)
    except ValueError:
        return None


def _extension(image: bytes) -> str:
    """The image's own extension, from its first bytes (the pairs hold JPEG, PNG or WEBP as sent)."""
    return next((ext for magic, ext in _EXTENSIONS.items() if image.startswith(magic)), "jpg")


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
