"""Two `normals-pipeline run`s at once on one dataset and one output, with the default run shape
(16 shards in one Dagster run, in-flight window following the rate), against the emulator: what the key
was charged, per content.

    python -m bench.shared_output [--images 200] [--rpm 600] [--latency 0.3]

Writes `bench/results/<date>-shared-output.json`. Every distinct content should be charged once,
the manifest should hold one row per image and add up to what the emulator charged.
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.dataset as ds

from ._support import CliRun, EmulatorProcess, fresh_key, make_small_jpegs, write_result


def measure(images: int, rpm: int, latency: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="normals-shared-") as tmp:
        work = Path(tmp)
        make_small_jpegs(work / "dataset", images, seed=7)
        key = fresh_key("shared")
        with EmulatorProcess(keys={key: 1_000_000}, rpm=rpm, latency=latency, log=work / "emulator.log") as api:
            logs = [work / f"logs-{index}" for index in range(2)]  # one output, so one log folder per run
            for folder in logs:
                folder.mkdir()
            runs = [
                CliRun(work / "dataset", work / "output", api.url, key, rpm, logdir=folder).start() for folder in logs
            ]
            for run in runs:
                run.wait()
            stats = api.stats()
        table = ds.dataset(str(work / "output" / "manifest"), partitioning="hive").to_table().to_pandas()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "images": images,
        "rpm": rpm,
        "latency_s": latency,
        "shards": [run.shards_used for run in runs],
        "concurrency": "default (follows the rate)",
        "exit_codes": [run.returncode for run in runs],
        "wall_s": [round(run.wall_s, 1) for run in runs],
        "charged": stats["charged"],
        "distinct_contents_charged": len(stats["charged_by_content"]),
        "charged_twice": stats["charged_twice"],
        "http_429": stats["by_status"].get("429", 0),
        "manifest_rows": len(table),
        "manifest_unique_paths": int(table["path"].nunique()),
        "manifest_credits": float(table["credits_consumed"].sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--latency", type=float, default=0.3)
    args = parser.parse_args()
    result = measure(args.images, args.rpm, args.latency)
    out = write_result(result, "shared-output")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
