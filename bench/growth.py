"""Figure 10: growth with the dataset. A no-op re-run and a run with 200 new images, each a default
`normals-pipeline run` (16 shards, one Dagster run), on datasets of 2 000, 20 000 and 200 000 listed files:
wall time and peak RSS.

The files are tiny unique JPEGs (one 16×16 image, a comment segment naming each). The smallest dataset is
enriched by a real run against the emulator (unlimited rate, one cached map); the larger ones get a
pre-built output, what such a run writes (enriching 200 000 at ~100 images/s would take half an hour):
each file's manifest row through the project's own manifest writer, its normal map stored under its
content hash (a copy of one map the emulator rendered), and `layout.json`. The pre-built rows are
checked against the real run's on the smallest dataset (same columns, values and dtypes but the time).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

from ._support import CliRun, EmulatorProcess, fresh_key

UNLIMITED_RPM = 10_000_000
FILES_PER_DIR = 1000
NEW_IMAGES = 200
SHARDS = 16  # the CLI's default, which the runs use


def _base_jpeg() -> bytes:
    image = Image.new("RGB", (16, 16), (180, 140, 120))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def make_tiny_jpegs(root: Path, start: int, count: int, prefix: str = "img") -> None:
    """Files `start` .. `start + count - 1`, FILES_PER_DIR a folder, each a valid JPEG with its own bytes."""
    base = _base_jpeg()
    for index in range(start, start + count):
        folder = root / f"{prefix}{index // FILES_PER_DIR:04d}"
        if index == start or index % FILES_PER_DIR == 0:
            folder.mkdir(parents=True, exist_ok=True)
        tag = f"growth {prefix} {index}".encode()
        data = base[:2] + b"\xff\xfe" + struct.pack(">H", len(tag) + 2) + tag + base[2:]
        fd = os.open(folder / f"{prefix}_{index:06d}.jpg", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)


def prebuild_output(dataset: Path, output: Path, the_map: Path, shards: int = SHARDS) -> int:
    """What a real run over `dataset` writes to `output`, built directly: every file's manifest row, its map
    (a copy of `the_map`: a file has at most 65 000 hard links) and the layout. Returns the rows written."""
    from normals_pipeline import manifest
    from normals_pipeline.enrich import normal_map_path
    from normals_pipeline.inventory import IMAGE_SUFFIXES, partition_key, shard_of
    from normals_pipeline.prepare import prepare
    from normals_pipeline.storage import LocalStorage

    source, target = LocalStorage(dataset), LocalStorage(output)
    rows: dict[str, list[dict]] = {}
    now = datetime.now(UTC)
    map_bytes = the_map.read_bytes()
    prepared = None
    linked: set[str] = set()
    for path in source.listing(IMAGE_SUFFIXES).paths:
        data = source.read_bytes(path)
        entry = source.stat(path)
        digest = hashlib.sha256(data).hexdigest()
        prepared = prepared or prepare(data)  # every file is the same 16×16 image: what `prepare` makes of it is too
        map_path = normal_map_path(digest)
        if map_path not in linked:
            destination = output / map_path
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(map_bytes)
            linked.add(map_path)
        key = partition_key(shard_of(path, shards), shards)
        rows.setdefault(key, []).append(
            {
                "path": path,
                "content_hash": digest,
                "size": entry.size,
                "source_version": entry.version,
                "width": prepared.width,
                "height": prepared.height,
                "preparation": ",".join(prepared.steps) or None,
                "normal_map_uri": target.uri_for(map_path),
                "credits_consumed": 1.0,
                "remaining_credits": None,
                "http_status": 200,
                "error_code": None,
                "error_message": None,
                "processed_at": now,
            }
        )
    for key, shard_rows in rows.items():
        frame = manifest.to_frame(sorted(shard_rows, key=lambda row: row["path"]))
        manifest.write_manifest(target, key, manifest.validate(frame))
    manifest.check_layout(target, shards)
    return sum(len(shard_rows) for shard_rows in rows.values())


def _compare_prebuilt(real: Path, prebuilt: Path) -> list[str]:
    """Where the pre-built manifest differs from the real run's, beyond the time and the balance (none: [])."""
    from normals_pipeline import manifest
    from normals_pipeline.storage import LocalStorage

    frames = [manifest.read_manifests(LocalStorage(folder)) for folder in (real, prebuilt)]
    if list(frames[0].dtypes) != list(frames[1].dtypes) or len(frames[0]) != len(frames[1]):
        return ["columns, dtypes or row counts differ"]
    ignored = {"processed_at", "remaining_credits", "normal_map_uri"}
    ordered = [frame.sort_values("path", ignore_index=True) for frame in frames]
    differing = [
        column
        for column in ordered[0].columns
        if column not in ignored and not ordered[0][column].equals(ordered[1][column])
    ]
    maps = [frame["normal_map_uri"].str.rsplit("/", n=3).str[-3:].str.join("/") for frame in ordered]
    return differing + ([] if maps[0].equals(maps[1]) else ["normal_map_uri"])


def _run(dataset: Path, output: Path, url: str, key: str, logdir: Path, name: str) -> CliRun:
    logdir.mkdir(parents=True, exist_ok=True)
    return CliRun(dataset, output, url, key, UNLIMITED_RPM, logdir=logdir, name=name).start().wait()


def growth(cfg: Any, workdir: Path) -> dict[str, Any]:
    """Figure 10: see the module docstring."""
    sizes = list(cfg.growth_sizes)
    key = fresh_key("growth")
    stand_in = EmulatorProcess(
        keys={key: None}, rpm=UNLIMITED_RPM, latency=0.0, log=workdir / "emulator.log", cached_answer=True
    )
    workdir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    with stand_in as emulator:
        smallest = sizes[0]
        make_tiny_jpegs(workdir / f"data-{smallest}", 0, smallest)
        enriched = _run(workdir / f"data-{smallest}", workdir / f"out-{smallest}", emulator.url, key,
                        workdir / "logs", f"enrich-{smallest}")  # fmt: skip
        the_map = next((workdir / f"out-{smallest}" / "normals").rglob("*.jpg"))
        prebuilt_check = prebuild_output(workdir / f"data-{smallest}", workdir / "prebuilt-check", the_map)
        mismatch = _compare_prebuilt(workdir / f"out-{smallest}", workdir / "prebuilt-check")
        for size in sizes:
            dataset, output = workdir / f"data-{size}", workdir / f"out-{size}"
            if size != smallest:
                make_tiny_jpegs(dataset, 0, size)
                prebuild_output(dataset, output, the_map)
            logs = workdir / "logs"
            warm = _run(dataset, output, emulator.url, key, logs, f"warm-{size}")  # caches, inventory, layout
            noop = _run(dataset, output, emulator.url, key, logs, f"noop-{size}")
            make_tiny_jpegs(dataset, 0, NEW_IMAGES, prefix=f"new{size}_")
            added = _run(dataset, output, emulator.url, key, logs, f"new-{size}")
            rows[str(size)] = {
                "noop_s": round(noop.wall_s, 3),
                "noop_peak_rss_mb": round(noop.maxrss_kib * 1024 / 1e6, 1),
                "new_s": round(added.wall_s, 3),
                "new_peak_rss_mb": round(added.maxrss_kib * 1024 / 1e6, 1),
                "new_minus_noop_s": round(added.wall_s - noop.wall_s, 3),
                "prebuilt": size != smallest,
                "runs": {"warm": warm.raw(), "noop": noop.raw(), "new": added.raw()},
            }
    return _verdict(cfg, sizes, rows, enriched, prebuilt_check, mismatch)


def _verdict(
    cfg: Any, sizes: list[int], rows: dict[str, dict[str, Any]], enriched: CliRun, prebuilt: int, mismatch: list[str]
) -> dict[str, Any]:
    small, middle, large = (rows[str(size)] for size in sizes)
    measured = large["noop_s"] / middle["noop_s"]
    ok_runs = all(run["returncode"] == 0 for row in rows.values() for run in row["runs"].values())
    new_ok = all(row["runs"]["new"]["enriched"] == row["runs"]["new"]["images"] for row in rows.values())
    within = all(row["new_minus_noop_s"] <= cfg.growth_new_within_s for row in rows.values())
    rss_ok = large["noop_peak_rss_mb"] <= cfg.growth_max_rss_mb
    passed = measured <= cfg.growth_ratio and within and rss_ok and ok_runs and not mismatch
    cells = "; ".join(
        f"{size}: no-op {rows[str(size)]['noop_s']:.1f} s / {rows[str(size)]['noop_peak_rss_mb']:.0f} MB, "
        f"+{NEW_IMAGES} {rows[str(size)]['new_s']:.1f} s"
        for size in sizes
    )
    problems = [] if ok_runs else ["A RUN FAILED"]
    problems += [] if new_ok else ["NEW IMAGES NOT ALL ENRICHED"]
    problems += [f"PRE-BUILT DIFFERS: {', '.join(mismatch)}"] if mismatch else []
    return {
        "measured": measured,
        "passed": passed,
        "naive": None,
        "note": cells + (f" ({'; '.join(problems)})" if problems else ""),
        "raw": {
            "sizes": sizes,
            "new_images": NEW_IMAGES,
            "shards": SHARDS,
            "by_size": rows,
            "targets": {
                "noop_ratio_large_to_middle": cfg.growth_ratio,
                "noop_peak_rss_mb": cfg.growth_max_rss_mb,
                "new_minus_noop_s": cfg.growth_new_within_s,
            },
            "met": {"ratio": measured <= cfg.growth_ratio, "rss": rss_ok, "new_within": within},
            "smallest_enriched_by_run": enriched.raw(),
            "prebuilt_check_rows": prebuilt,
            "prebuilt_mismatch": mismatch,
        },
    }
