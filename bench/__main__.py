"""Run the benchmark figures, print a table, write bench/results/<date>-<host>.json.

python -m bench                       # every figure (what `make bench` runs, ~18–19 min on 2 cores)
python -m bench --only rate-3000      # one figure (repeatable, or comma-separated; `throughput`: every rate-*)
python -m bench --quick               # small sizes: a smoke run of the harness, not a measurement
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import growth, listing, normals_decode, resources, s3, throughput
from ._support import RESULTS


@dataclasses.dataclass(frozen=True)
class Config:
    # every emulator with a limit: strict sliding window, 0.8 s ± 0.2 s (uniform) latency, no Retry-After
    latency: float = 0.8
    latency_jitter: float = 0.2
    # figure 1 at each of RATES: rpm × rate_minutes images (1.25 min of the key's allowance, so more than
    # one window's worth and a client that bursts or overshoots meets 429s), small ones the emulator keeps up with
    rate_minutes: float = 1.25
    rate_min_images: int = 10
    rate_image_size: tuple[int, int] = (128, 160)
    # figure 2: three runs at `rpm`, 3 × 60 = 180 requests = 1.5 min of the allowance
    rpm: int = 120
    concurrent_images: int = 60  # per run
    # figure 8: one run set at twice the key's real limit (learn_rpm), as the issue measured it
    learn_rpm: int = 60
    learn_images: int = 150
    learn_max_429: int = 3
    # figure 3
    concurrency: int = 8  # the core Enricher's pool, as before (figure 3 measures the library, not the CLI)
    cpu_images: int = 12
    cpu_repeats: int = 2
    photo_size: tuple[int, int] = (2000, 3000)
    # figure 4a: a 3000 rpm run on 2 MB images
    memory_rpm: int = 3000
    memory_big_images: int = 400
    memory_file_bytes: int = 2_000_000
    memory_allowance_mb: int = 300
    # figure 4b
    memory_small: int = 500
    memory_large: int = 5000
    memory_image_size: tuple[int, int] = (192, 240)
    # figure 5
    inventory_files: int = 100_000
    inventory_repeats: int = 3
    # figure 6
    overhead_images: int = 600
    # figure 9: figure 6's run on S3 (the in-memory stand-in; moto with --moto) and on local disk, each this often
    s3_repeats: int = 2
    s3_moto: bool = False
    s3_latency_s: float = 0.02  # figure 9b: a remote S3's wait per request (in-region, small objects)
    # figure 7: a size x size normal map, decoded this many times (and Pillow as many, in turns)
    normals_size: int = 1024
    normals_repeats: int = 200
    # figure 10: no-op re-runs and +200 new images on datasets of these sizes (listed files)
    growth_sizes: tuple[int, int, int] = (2_000, 20_000, 200_000)
    growth_ratio: float = 3.0  # no-op at the largest ÷ at the middle size
    growth_max_rss_mb: float = 1000.0  # peak RSS of the no-op at the largest size
    growth_new_within_s: float = 2.0  # +200 new images, over the no-op, at every size
    # targets
    target_single: float = 0.98
    target_burstiness: float = 1.2
    target_concurrent: float = 0.97
    target_cpu: float = 0.5
    target_memory: float = 1.2
    target_inventory: float = 2.0
    target_overhead: float = 0.5
    target_s3: float = 0.5
    target_normals_decode: float = 2.6  # a regression bound (2.3 ± 0.3): the numpy floor, not a target to reach
    target_learning: float = 0.9


QUICK = Config(
    latency=0.2,
    latency_jitter=0.05,
    rate_minutes=0.05,  # 3, 15, 60 and 150 images: seconds of work, no measurement
    rate_min_images=4,
    rpm=600,
    concurrent_images=10,
    cpu_images=3,
    cpu_repeats=1,
    photo_size=(1000, 1500),
    memory_big_images=40,
    memory_small=50,
    memory_large=200,
    inventory_files=10_000,
    inventory_repeats=2,
    overhead_images=60,
    s3_repeats=1,
    normals_repeats=10,
    learn_rpm=600,
    learn_images=60,
    growth_sizes=(200, 400, 800),
)

RATES = (60, 300, 1200, 3000)  # figure 1, one row each; `--only throughput` selects them all


@dataclasses.dataclass(frozen=True)
class Figure:
    name: str
    title: str
    target: Callable[[Config], str]
    run: Callable[[Config, Path], dict[str, Any]]
    unit: str = ""  # "MB": the measured value is printed as a whole number of MB


def _rate_figure(rpm: int, letter: str) -> Figure:
    return Figure(
        f"rate-{rpm}",
        f"1{letter} one run at {rpm} rpm: successes/s ÷ limit",
        lambda c: f">= {c.target_single}",
        lambda c, w: throughput.rate_run(c, w, rpm),
    )


def _memory_target(config: Config) -> str:
    from normals_pipeline.enrich import MAX_BYTES_IN_FLIGHT

    return f"<= {MAX_BYTES_IN_FLIGHT / 1e6 + config.memory_allowance_mb:.0f} MB"


FIGURES = [
    *(_rate_figure(rpm, letter) for rpm, letter in zip(RATES, "abcd")),
    Figure(
        "concurrent",
        "2 three runs, one key: ÷ limit",
        lambda c: f">= {c.target_concurrent}",
        throughput.concurrent_runs,
    ),
    Figure("cpu", "3 client CPU/img ÷ decode", lambda c: f"<= {c.target_cpu}", resources.client_cpu),
    Figure("memory", "4a peak RSS, 3000 rpm, 2 MB images", _memory_target, resources.big_image_memory, unit="MB"),
    Figure(
        "memory-growth", "4b peak RSS, large ÷ small dataset", lambda c: f"<= {c.target_memory}", resources.peak_memory
    ),
    Figure("inventory", "5 inventory ÷ bare scandir", lambda c: f"<= {c.target_inventory}", listing.inventory_speed),
    Figure("overhead", "6 unthrottled: run ÷ bare httpx loop", lambda c: f">= {c.target_overhead}", resources.overhead),
    Figure(
        "normals-decode",
        "7 normal map decode + mask ÷ Pillow decode",
        lambda c: f"<= {c.target_normals_decode}",
        normals_decode.decode_speed,
    ),
    Figure(
        "learning",
        "8 one run set at twice the limit: ÷ real limit",
        lambda c: f">= {c.target_learning}",
        throughput.learning_run,
    ),
    Figure("s3", "9 unthrottled on S3 ÷ on local disk", lambda c: f">= {c.target_s3}", s3.s3_speed),
    Figure(
        "s3-latency",
        "9b the same, S3 answering in 20 ms",
        lambda c: f">= {c.target_s3}",
        s3.s3_latency_speed,
    ),
    Figure(
        "growth",
        "10 no-op re-run at 200 000 ÷ at 20 000 listed files",
        lambda c: (
            f"<= {c.growth_ratio}, <= {c.growth_max_rss_mb:.0f} MB, +200 new <= no-op + {c.growth_new_within_s:.0f} s"
        ),
        growth.growth,
    ),
]
NAMES = [figure.name for figure in FIGURES]
GROUPS = {"throughput": [f"rate-{rpm}" for rpm in RATES]}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these figures: {', '.join(NAMES)}; 'throughput' is every rate-*",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the harness, measures little")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put generated data (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data and logs")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a figure misses its target")
    parser.add_argument("--moto", action="store_true", help="figures 9 and 9b on moto, not the in-memory S3 stand-in")
    parser.add_argument(
        "--output", type=Path, default=None, help="JSON path (default: bench/results/<date>-<host>.json)"
    )
    args = parser.parse_args(argv)
    names = [name.strip() for item in args.only for name in item.split(",") if name.strip()]
    args.only = [figure for name in names for figure in GROUPS.get(name, [name])]
    unknown = sorted(set(args.only) - set(NAMES))
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}: choose among {', '.join([*NAMES, *GROUPS])}")
    return args


def _machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=RESULTS.parent
        ).stdout.strip()
        # ":/" from the repository's root: from bench/, a plain path named nothing, so the code was never dirty
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain", "--", ":/normals_pipeline"], capture_output=True,
                           text=True, cwd=RESULTS.parent).stdout.strip()
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "git_commit": commit,
        "code_modified_since_commit": dirty,
    }


def _host() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "", socket.gethostname().split(".")[0])
    return name or "machine"


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.0f} {unit}" if unit else f"{value:.3f}"


def _unused(path: Path) -> Path:
    """`path`, or `<stem>-2.json`, `-3`, ...: a second run the same day never overwrites the first's numbers."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _table(config: Config, results: dict[str, dict[str, Any]]) -> str:
    header = ("figure", "measured", "target", "pass", "naive", "detail")
    rows = []
    for figure in FIGURES:
        if figure.name not in results:
            continue
        result = results[figure.name]
        status = "ERROR" if "error" in result else ("pass" if result["passed"] else "FAIL")
        detail = result.get("error") or result.get("note", "")
        measured, naive = _fmt(result.get("measured"), figure.unit), _fmt(result.get("naive"), figure.unit)
        rows.append((figure.title, measured, figure.target(config), status, naive, detail))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
        if row is header:
            lines.append("  ".join("-" * width for width in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    config = QUICK if args.quick else Config()
    if args.moto:
        config = dataclasses.replace(config, s3_moto=True)
    selected = [figure for figure in FIGURES if not args.only or figure.name in args.only]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="normals-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    machine = _machine()  # the commit before the figures run: it is the code they measure
    clock = time.monotonic()
    print(f"benchmark ({'quick' if args.quick else 'full'}), data in {workdir}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        for figure in selected:
            print(f"  {figure.title} ...", end=" ", flush=True)
            figure_started = time.monotonic()
            try:
                result = figure.run(config, workdir / figure.name)
            except Exception as error:  # one broken figure must not hide the others
                result = {"passed": False, "error": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc()}  # fmt: skip
            result["target"] = figure.target(config)
            result["seconds"] = round(time.monotonic() - figure_started, 1)
            results[figure.name] = result
            outcome = result.get("error") or f"{_fmt(result.get('measured'), figure.unit)} ({result['seconds']} s)"
            print(outcome, flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    report = {
        "date": started.isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": machine,
        "config": dataclasses.asdict(config),
        "total_s": round(time.monotonic() - clock, 1),
        "figures": results,
    }
    suffix = ("-quick" if args.quick else "") + (f"-{'-'.join(f.name for f in selected)}" if args.only else "")
    path = args.output or _unused(RESULTS / f"{started:%Y-%m-%d}-{_host()}{suffix}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")

    print()
    print(_table(config, results))
    print(f"\n{report['total_s']} s in all; raw numbers in {path}")
    if any("error" in r for r in results.values()):
        return 1
    return 1 if args.strict and not all(r["passed"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
