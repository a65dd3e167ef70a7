"""Figures 1 and 2: how close `normals-pipeline run` gets to the key's rate limit, and whether it stays under.

The figure is successes per second ÷ the limit, with the seconds counted from the emulator's first
request to its last answer (the emulator's own clock). The emulator runs in this process; the pipeline
runs as real `normals-pipeline run` subprocesses, so the rate guard sees what a user's run sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._support import CliRun, RecordingEmulator, fresh_key, make_small_jpegs, naive_client


def _rate_figure(stats: dict[str, Any], timeline: dict[str, Any], rpm: int) -> dict[str, Any]:
    successes = int(stats["by_status"].get("200", 0))
    elapsed = timeline.get("elapsed_s") or float("nan")
    return {
        "successes": successes,
        "elapsed_s": round(elapsed, 3),
        "successes_per_s": round(successes / elapsed, 4),
        "limit_per_s": rpm / 60,
        "ratio": successes / (elapsed * rpm / 60),
        # the same without the last answer's latency: only the pacing of the requests themselves
        "paced_ratio": 60 / (rpm * interval) if (interval := timeline.get("mean_interval_s")) else None,
        "status_429": int(stats["by_status"].get("429", 0)),
        "max_in_any_60s": int(stats["max_in_any_60s"]),
        "concurrent_max": int(stats["concurrent_max"]),
    }


def _verdict(figure: dict[str, Any], rpm: int, target: float) -> bool:
    return figure["ratio"] >= target and figure["status_429"] == 0 and figure["max_in_any_60s"] <= rpm


def single_run(cfg: Any, workdir: Path) -> dict[str, Any]:
    """Figure 1: one run on one key, and the naive client on another emulator with the same settings."""
    rpm, latency = cfg.rpm, cfg.latency
    paths = make_small_jpegs(workdir / "dataset", cfg.single_images, seed=1)
    key = fresh_key("throughput")
    with RecordingEmulator(keys={key: None}, rpm=rpm, latency=latency) as emulator:
        run = CliRun(workdir / "dataset", workdir / "output", emulator.url, key, rpm, cfg.concurrency)
        run.start().wait()
        stats, timeline = emulator.stats(), emulator.timeline.summary(latency)
    figure = _rate_figure(stats, timeline, rpm)

    naive_key = fresh_key("naive")
    with RecordingEmulator(keys={naive_key: None}, rpm=rpm, latency=latency) as emulator:
        naive_run = naive_client(emulator.url, naive_key, paths[: cfg.naive_images], workdir / "naive-output")
        naive_stats, naive_timeline = emulator.stats(), emulator.timeline.summary(latency)
    naive = _rate_figure(naive_stats, naive_timeline, rpm)

    passed = _verdict(figure, rpm, cfg.target_single) and run.returncode == 0
    return {
        "measured": figure["ratio"],
        "passed": passed,
        "naive": naive["ratio"],
        "note": f"429s {figure['status_429']}, max/60s {figure['max_in_any_60s']} (limit {rpm}); "
        f"naive 429s {naive['status_429']}",
        "raw": {
            "emulator": {"rpm": rpm, "latency_s": latency},
            "images": cfg.single_images,
            "concurrency": cfg.concurrency,
            "shards": 1,
            "pipeline": figure,
            "pipeline_run": run.raw(),
            "pipeline_startup_and_tail_s": round(run.wall_s - figure["elapsed_s"], 3),
            "pipeline_emulator_stats": stats,
            "pipeline_timeline": timeline,
            "naive": naive,
            "naive_run": naive_run,
            "naive_emulator_stats": naive_stats,
        },
    }


def concurrent_runs(cfg: Any, workdir: Path) -> dict[str, Any]:
    """Figure 2: three `normals-pipeline run`s at once, separate datasets and outputs, one key, one emulator."""
    rpm, latency = cfg.rpm, cfg.latency
    for index in range(3):
        make_small_jpegs(workdir / f"dataset-{index}", cfg.concurrent_images, seed=20 + index)
    key = fresh_key("concurrent")
    with RecordingEmulator(keys={key: None}, rpm=rpm, latency=latency) as emulator:
        runs = [
            CliRun(workdir / f"dataset-{i}", workdir / f"output-{i}", emulator.url, key, rpm, cfg.concurrency)
            for i in range(3)
        ]
        for run in runs:
            run.start()
        for run in runs:
            run.wait()
        stats, timeline = emulator.stats(), emulator.timeline.summary(latency)
    figure = _rate_figure(stats, timeline, rpm)
    passed = _verdict(figure, rpm, cfg.target_concurrent) and all(run.returncode == 0 for run in runs)
    exits = ",".join(str(run.returncode) for run in runs)
    return {
        "measured": figure["ratio"],
        "passed": passed,
        "naive": None,
        "note": f"429s {figure['status_429']}, max/60s {figure['max_in_any_60s']} (limit {rpm}); exits {exits}",
        "raw": {
            "emulator": {"rpm": rpm, "latency_s": latency},
            "images_per_run": cfg.concurrent_images,
            "concurrency": cfg.concurrency,
            "shards": 1,
            "combined": figure,
            "runs": [run.raw() for run in runs],
            "emulator_stats": stats,
            "timeline": timeline,
        },
    }
