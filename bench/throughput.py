"""Figures 1, 2 and 8: how close `normals-pipeline run` gets to the key's rate limit, and whether it stays under
(figure 8: when it is set at twice the real limit, and must learn the real one from the API's 429s).

The figure is successes per second ÷ the limit, with the seconds counted from the emulator's first
request to its last answer (the emulator's own clock). The emulator runs in this process, in strict
sliding-window mode with a jittered latency and no Retry-After on its 429s; the pipeline runs as real
`normals-pipeline run` subprocesses with the CLI's default shape (16 shards, one Dagster run) and default
in-flight window (it follows the key's rate), so the rate guard sees what a user's run sees.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ._support import CliRun, RecordingEmulator, fresh_key, make_small_jpegs

BURST_WINDOW_S = 10.0


def rate_figure(stats: dict[str, Any], timeline: dict[str, Any], rpm: int) -> dict[str, Any]:
    """Successes per second over the sending period ÷ the limit, and how the requests were spread."""
    successes = int(stats["by_status"].get("200", 0))
    elapsed = timeline.get("elapsed_s") or float("nan")
    allowance = rpm * BURST_WINDOW_S / 60  # what a perfectly even client sends in 10 s
    return {
        "successes": successes,
        "elapsed_s": round(elapsed, 3),
        "successes_per_s": round(successes / elapsed, 4),
        "limit_per_s": rpm / 60,
        "ratio": successes / (elapsed * rpm / 60),
        # the same without the last answer's latency: only the pacing of the requests themselves
        "paced_ratio": 60 / (rpm * interval) if (interval := timeline.get("mean_interval_s")) else None,
        # the most requests in any 10 s ÷ the limit's share of 10 s: 1.0 is perfectly even
        "max_in_any_10s": timeline.get("max_in_any_10s"),
        "burstiness": timeline.get("max_in_any_10s", 0) / allowance,
        "status_429": int(stats["by_status"].get("429", 0)),
        "max_in_any_60s": int(stats["max_in_any_60s"]),
        "concurrent_max": int(stats["concurrent_max"]),
    }


def best_possible(images: int, rpm: int, latency: float) -> float:
    """The figure of a client that sends exactly at the limit: the last answer comes a latency after the
    last request, `images - 1` intervals after the first."""
    return images / ((images - 1) * 60 / rpm + latency) / (rpm / 60)


def rate_images(cfg: Any, rpm: int) -> int:
    return max(cfg.rate_min_images, math.ceil(rpm * cfg.rate_minutes))


def one_run(
    cfg: Any, workdir: Path, name: str, images: int, *, seed: int, limit: int, configured: int
) -> tuple[CliRun, dict[str, Any], dict[str, Any]]:
    """One default `normals-pipeline run --rpm configured` on a fresh key the emulator limits to `limit`:
    the run, the emulator's stats and its timeline."""
    make_small_jpegs(workdir / "dataset", images, seed=seed, size=cfg.rate_image_size)
    key = fresh_key(name)
    latency, jitter = cfg.latency, cfg.latency_jitter
    with RecordingEmulator(keys={key: None}, rpm=limit, latency=latency, latency_jitter=jitter) as emulator:
        run = CliRun(workdir / "dataset", workdir / "output", emulator.url, key, configured)
        run.start().wait()
        return run, emulator.stats(), emulator.timeline.summary(latency)


def rate_run(cfg: Any, workdir: Path, rpm: int) -> dict[str, Any]:
    """Figure 1 at one rate: one default `normals-pipeline run` of about 1.25 minutes of the key's allowance."""
    latency, jitter = cfg.latency, cfg.latency_jitter
    images = rate_images(cfg, rpm)
    run, stats, timeline = one_run(cfg, workdir, f"rate{rpm}", images, seed=rpm, limit=rpm, configured=rpm)
    figure = rate_figure(stats, timeline, rpm)
    complete = run.returncode == 0 and run.enriched == images
    passed = (
        complete
        and figure["ratio"] >= cfg.target_single
        and figure["status_429"] == 0
        and figure["max_in_any_60s"] <= rpm
        and figure["burstiness"] <= cfg.target_burstiness
    )
    return {
        "measured": figure["ratio"],
        "passed": passed,
        "naive": None,
        "note": f"{images} imgs; 429s {figure['status_429']}, burst {figure['burstiness']:.2f} "
        f"(<= {cfg.target_burstiness}), max/60s {figure['max_in_any_60s']}/{rpm}, "
        f"in flight {figure['concurrent_max']}"
        + ("" if complete else f" (INCOMPLETE: exit {run.returncode}, {run.enriched} of {images} enriched)"),
        "raw": {
            "emulator": {"rpm": rpm, "latency_s": latency, "latency_jitter_s": jitter, "window": "sliding"},
            "images": images,
            "image_size": list(cfg.rate_image_size),
            "best_possible_ratio": best_possible(images, rpm, latency),
            "pipeline": figure,
            "pipeline_run": run.raw(),
            "pipeline_startup_and_tail_s": round(run.wall_s - figure["elapsed_s"], 3),
            "pipeline_emulator_stats": {k: v for k, v in stats.items() if k != "charged_by_content"},
            "pipeline_timeline": timeline,
        },
    }


def concurrent_runs(cfg: Any, workdir: Path) -> dict[str, Any]:
    """Figure 2: three default `normals-pipeline run`s at once, separate datasets and outputs, one key."""
    rpm, latency, jitter = cfg.rpm, cfg.latency, cfg.latency_jitter
    for index in range(3):
        make_small_jpegs(workdir / f"dataset-{index}", cfg.concurrent_images, seed=20 + index)
    key = fresh_key("concurrent")
    with RecordingEmulator(keys={key: None}, rpm=rpm, latency=latency, latency_jitter=jitter) as emulator:
        runs = [CliRun(workdir / f"dataset-{i}", workdir / f"output-{i}", emulator.url, key, rpm) for i in range(3)]
        for run in runs:
            run.start()
        for run in runs:
            run.wait()
        stats, timeline = emulator.stats(), emulator.timeline.summary(latency)
    figure = rate_figure(stats, timeline, rpm)
    complete = all(run.returncode == 0 and run.enriched == cfg.concurrent_images for run in runs)
    passed = (
        complete
        and figure["ratio"] >= cfg.target_concurrent
        and figure["status_429"] == 0
        and figure["max_in_any_60s"] <= rpm
    )
    exits = ",".join(str(run.returncode) for run in runs)
    return {
        "measured": figure["ratio"],
        "passed": passed,
        "naive": None,
        "note": f"3x{cfg.concurrent_images} imgs; 429s {figure['status_429']}, "
        f"max/60s {figure['max_in_any_60s']}/{rpm}, burst {figure['burstiness']:.2f}; exits {exits}"
        + ("" if complete else " (INCOMPLETE)"),
        "raw": {
            "emulator": {"rpm": rpm, "latency_s": latency, "latency_jitter_s": jitter, "window": "sliding"},
            "images_per_run": cfg.concurrent_images,
            "best_possible_ratio": best_possible(3 * cfg.concurrent_images, rpm, latency),
            "combined": figure,
            "runs": [run.raw() for run in runs],
            "emulator_stats": {k: v for k, v in stats.items() if k != "charged_by_content"},
            "timeline": timeline,
        },
    }


def learning_run(cfg: Any, workdir: Path) -> dict[str, Any]:
    """Figure 8: one default `normals-pipeline run --rpm 2R` on a key limited to R: what it sends, ÷ R."""
    real, configured, images = cfg.learn_rpm, 2 * cfg.learn_rpm, cfg.learn_images
    latency, jitter = cfg.latency, cfg.latency_jitter
    run, stats, timeline = one_run(cfg, workdir, "learning", images, seed=8, limit=real, configured=configured)
    figure = rate_figure(stats, timeline, real)
    complete = run.returncode == 0 and run.enriched == images
    passed = complete and figure["ratio"] >= cfg.target_learning and figure["status_429"] <= cfg.learn_max_429
    return {
        "measured": figure["ratio"],
        "passed": passed,
        "naive": None,
        "note": f"{images} imgs at --rpm {configured}; 429s {figure['status_429']} (<= {cfg.learn_max_429}), "
        f"max/60s {figure['max_in_any_60s']}/{real}"
        + ("" if complete else f" (INCOMPLETE: exit {run.returncode}, {run.enriched} of {images} enriched)"),
        "raw": {
            "emulator": {"rpm": real, "latency_s": latency, "latency_jitter_s": jitter, "window": "sliding"},
            "configured_rpm": configured,
            "images": images,
            "pipeline": figure,
            "pipeline_run": run.raw(),
            "pipeline_emulator_stats": {k: v for k, v in stats.items() if k != "charged_by_content"},
            "pipeline_timeline": timeline,
        },
    }
