"""Figures 3, 4 and 6: the client's CPU per image, its peak memory (on big images, and as the dataset grows),
and its speed with no rate limit against a bare httpx loop.

All run the emulator as its own process, so its decoding and rendering count neither in the client's CPU
nor in its memory, and it does not share the bench process's GIL with the bare loop.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from PIL import Image

from ._support import (
    UNGUARDED,
    CliRun,
    EmulatorProcess,
    bare_httpx_loop,
    fresh_key,
    make_padded_jpegs,
    make_photos,
    make_small_jpegs,
    naive_client,
)

UNLIMITED_RPM = 1_000_000
CREDITS = 1_000_000_000


def _decode_cpu(paths: list[Path], repeats: int = 3) -> list[float]:
    """Process CPU of `Image.open(path).load()` per image, best of `repeats`."""
    best = []
    for path in paths:
        times = []
        for _ in range(repeats):
            started = time.process_time()
            with Image.open(path) as image:
                image.load()
            times.append(time.process_time() - started)
        best.append(min(times))
    return best


def _enrich_cpu(url: str, key: str, dataset: Path, output: Path, concurrency: int) -> dict[str, Any]:
    """Process CPU of the core `Enricher` over every image of `dataset` (the emulator is elsewhere)."""
    from normals_pipeline import ClipdropClient, CreditGuard, Enricher, LocalStorage, RateGuard, take_inventory
    from normals_pipeline.enrich import current_items
    from normals_pipeline.manifest import empty_manifest

    source, target = LocalStorage(dataset), LocalStorage(output)
    items = current_items(source, take_inventory(source, 1))
    with ClipdropClient(
        key, base_url=url, rate_guard=RateGuard(UNLIMITED_RPM), credit_guard=CreditGuard(), max_connections=concurrency
    ) as client:
        enricher = Enricher(source, target, client, concurrency=concurrency)
        wall = time.perf_counter()
        started = time.process_time()
        result = enricher.run(items, empty_manifest())
        cpu = time.process_time() - started
        wall = time.perf_counter() - wall
    return {
        "images": len(items),
        "enriched": result.enriched,
        "errors": dict(result.errors),
        "cpu_s": cpu,
        "wall_s": wall,
        "cpu_per_image_s": cpu / max(1, len(items)),
    }


def client_cpu(cfg: Any, workdir: Path) -> dict[str, Any]:
    """Figure 3: client CPU per image ÷ one full Pillow decode of the same image."""
    count = cfg.cpu_images
    generated = time.perf_counter()
    paths = make_photos(workdir / "photos", count, seed=3, size=cfg.photo_size)
    make_photos(workdir / "warmup", 2, seed=4, size=cfg.photo_size)
    generated = time.perf_counter() - generated
    sizes = [path.stat().st_size for path in paths]
    decode = _decode_cpu(paths)
    decode_mean = statistics.fmean(decode)

    key = fresh_key("cpu")
    with EmulatorProcess(keys={key: CREDITS}, rpm=UNLIMITED_RPM, latency=0.0, log=workdir / "emulator.log") as emulator:
        _enrich_cpu(emulator.url, key, workdir / "warmup", workdir / "warmup-output", cfg.concurrency)  # warm up
        passes = [
            _enrich_cpu(emulator.url, key, workdir / "photos", workdir / f"output-{i}", cfg.concurrency)
            for i in range(cfg.cpu_repeats)
        ]
        naive_key = key
        naive_client(emulator.url, naive_key, paths[:1], workdir / "naive-warmup")
        naive_passes = []
        for i in range(cfg.cpu_repeats):
            started = time.process_time()
            run = naive_client(emulator.url, naive_key, paths, workdir / f"naive-output-{i}")
            run["cpu_s"] = time.process_time() - started
            run["cpu_per_image_s"] = run["cpu_s"] / len(paths)
            naive_passes.append(run)
        stats = emulator.stats()

    per_image = min(p["cpu_per_image_s"] for p in passes)
    naive_per_image = min(p["cpu_per_image_s"] for p in naive_passes)
    measured = per_image / decode_mean
    complete = all(p["enriched"] == count for p in passes)
    return {
        "measured": measured,
        "passed": measured <= cfg.target_cpu and complete,
        "naive": naive_per_image / decode_mean,
        "note": f"client {per_image * 1000:.1f} ms/img, decode {decode_mean * 1000:.1f} ms/img "
        f"({cfg.photo_size[0]}x{cfg.photo_size[1]}, {statistics.fmean(sizes) / 1e6:.1f} MB)",
        "raw": {
            "images": count,
            "photo_size": list(cfg.photo_size),
            "jpeg_quality": 90,
            "file_bytes": sizes,
            "generation_s": round(generated, 3),
            "decode_cpu_s": decode,
            "decode_cpu_mean_s": decode_mean,
            "concurrency": cfg.concurrency,
            "client_passes": passes,
            "client_cpu_per_image_s": per_image,
            "naive_passes": naive_passes,
            "naive_cpu_per_image_s": naive_per_image,
            "emulator_stats": stats,
            "emulator_cpu_s": (emulator.rusage.ru_utime + emulator.rusage.ru_stime) if emulator.rusage else None,
        },
    }


def big_image_memory(cfg: Any, workdir: Path) -> dict[str, Any]:
    """Figure 4a: peak RSS of a default `normals-pipeline run` at 3000 rpm on 2 MB images, in MB, against
    the byte budget of the images in flight plus 300 MB for the interpreter, Dagster, pandas and pyarrow."""
    from normals_pipeline.enrich import MAX_BYTES_IN_FLIGHT

    rpm, count = cfg.memory_rpm, cfg.memory_big_images
    generated = time.perf_counter()
    paths = make_padded_jpegs(workdir / "dataset", count, seed=44, file_bytes=cfg.memory_file_bytes)
    generated = time.perf_counter() - generated
    key = fresh_key("memory")
    log = workdir / "emulator.log"
    with EmulatorProcess(
        keys={key: CREDITS}, rpm=rpm, latency=cfg.latency, latency_jitter=cfg.latency_jitter, log=log
    ) as emulator:
        run = CliRun(workdir / "dataset", workdir / "output", emulator.url, key, rpm).start().wait()
        stats = emulator.stats()
    peak_mb = run.maxrss_kib * 1024 / 1e6
    limit_mb = MAX_BYTES_IN_FLIGHT / 1e6 + cfg.memory_allowance_mb
    complete = run.returncode == 0 and run.enriched == count
    return {
        "measured": peak_mb,
        "passed": peak_mb <= limit_mb and complete,
        "naive": None,
        "note": f"{count} x {cfg.memory_file_bytes / 1e6:.0f} MB at {rpm} rpm: peak {peak_mb:.0f} MB, budget "
        f"{MAX_BYTES_IN_FLIGHT / 1e6:.0f} + {cfg.memory_allowance_mb} MB; in flight {stats['concurrent_max']}, "
        f"{count / run.wall_s:.1f} img/s" + ("" if complete else f" (INCOMPLETE: exit {run.returncode})"),
        "raw": {
            "images": count,
            "file_bytes": [path.stat().st_size for path in paths[:3]],
            "generation_s": round(generated, 3),
            "emulator": {"rpm": rpm, "latency_s": cfg.latency, "latency_jitter_s": cfg.latency_jitter},
            "peak_rss_mb": peak_mb,
            "max_bytes_in_flight": MAX_BYTES_IN_FLIGHT,
            "limit_mb": limit_mb,
            "run": run.raw(),
            "emulator_stats": {k: v for k, v in stats.items() if k != "charged_by_content"},
        },
    }


def peak_memory(cfg: Any, workdir: Path) -> dict[str, Any]:
    """Figure 4b: peak RSS of a default `normals-pipeline run` on a large dataset ÷ on a small one."""
    small, large = cfg.memory_small, cfg.memory_large
    generated = time.perf_counter()
    make_small_jpegs(workdir / "small", small, seed=40, size=cfg.memory_image_size)
    make_small_jpegs(workdir / "large", large, seed=41, size=cfg.memory_image_size)
    generated = time.perf_counter() - generated
    key = fresh_key("memory-growth")
    with EmulatorProcess(keys={key: CREDITS}, rpm=UNLIMITED_RPM, latency=0.0, log=workdir / "emulator.log") as emulator:
        runs = {}
        for name in ("small", "large"):
            run = CliRun(workdir / name, workdir / f"{name}-output", emulator.url, key, 10_000_000)
            runs[name] = run.start().wait()
        stats = emulator.stats()
    measured = runs["large"].maxrss_kib / runs["small"].maxrss_kib
    complete = runs["small"].enriched == small and runs["large"].enriched == large
    ok = all(run.returncode == 0 for run in runs.values()) and complete
    return {
        "measured": measured,
        "passed": measured <= cfg.target_memory and ok,
        "naive": None,
        "note": f"{runs['small'].maxrss_kib / 1024:.0f} MiB @ {small} -> {runs['large'].maxrss_kib / 1024:.0f} MiB "
        f"@ {large} images" + ("" if ok else " (INCOMPLETE RUN)"),
        "raw": {
            "images": {"small": small, "large": large},
            "image_size": list(cfg.memory_image_size),
            "generation_s": round(generated, 3),
            "runs": {
                name: {**run.raw(), "images_per_s": ((small if name == "small" else large) / run.wall_s)}
                for name, run in runs.items()
            },
            "emulator_stats": {k: v for k, v in stats.items() if k != "charged_by_content"},
        },
    }


def overhead(cfg: Any, workdir: Path) -> dict[str, Any]:
    """Figure 6: images/s of a default `normals-pipeline run --no-training-pairs` with no rate limit and no
    latency ÷ those of a bare httpx loop (16 threads, one client, `_bare.py`) posting the same files to the same
    emulator and writing the answers to disk. Each is a command timed from its start to its exit. The emulator
    answers from a cache (one rendered map), so neither is held back by the server: the bare loop's own images/s
    is recorded to show it was not the bound. The training pairs (decoding every map, another stage the loop has
    no part of) are left out, as issue 16 measured; every other setting and the shape are the defaults. The loop
    runs three times and the run twice (each into an output of its own), alternating, and each side's faster
    pass counts: on a machine whose speed drifts within a minute, one pass of either says more of the drift
    than of the client.

    Beside each run, the same run with every guarantee taken out (`_unguarded.py`: no rate turn or credit lease,
    claims in memory, no journal), also into an output of its own: what the guarantees cost, and what the
    pipeline's own work per image leaves of the loop's speed without them. Recorded, not a target."""
    count = cfg.overhead_images
    make_small_jpegs(workdir / "dataset", count, seed=60, size=cfg.rate_image_size)
    key = fresh_key("overhead")
    record = workdir / "timeline.json"
    log = workdir / "emulator.log"
    stand_in = EmulatorProcess(
        keys={key: None}, rpm=UNLIMITED_RPM, latency=0.0, log=log, record=record, cached_answer=True
    )
    runs: list[CliRun] = []
    unguarded: list[CliRun] = []
    options = ("--no-training-pairs",)
    with stand_in as emulator:
        bare_runs = [bare_httpx_loop(emulator.url, key, workdir / "dataset", workdir / "bare-0")]
        for index in range(2):
            for into, output, program in ((runs, "output", CliRun.program), (unguarded, "unguarded", UNGUARDED)):
                run = CliRun(
                    workdir / "dataset", workdir / f"{output}-{index}", emulator.url, key, 10_000_000,
                    options=options, program=program,
                )  # fmt: skip
                into.append(run.start().wait())
            bare_runs.append(bare_httpx_loop(emulator.url, key, workdir / "dataset", workdir / f"bare-{index + 1}"))
        stats = emulator.stats()
    timeline = emulator.timeline
    if timeline is None:
        raise RuntimeError(f"the emulator wrote no timeline; see {log}")
    run = min(runs, key=lambda r: r.wall_s)
    bare = min(bare_runs, key=lambda b: b["wall_s"])  # the faster pass: the floor is what the loop can do
    run_rate, bare_rate = count / run.wall_s, count / bare["wall_s"]
    measured = run_rate / bare_rate

    # The same while sending only (the emulator's first arrival to its last answer for each): what is left
    # of the gap once the start-up, the inventory and the manifest are left out.
    def sending(runs: list[CliRun]) -> list[dict[str, Any]]:
        return [timeline.summary(0.0, since=r.started_at, until=r.ended_at) for r in runs]

    def fastest(sendings: list[dict[str, Any]]) -> float:
        return min(s["elapsed_s"] for s in sendings)

    sendings, unguarded_sendings = sending(runs), sending(unguarded)
    bare_sending = [timeline.summary(0.0, since=b["process_started_at"], until=b["ended_at"]) for b in bare_runs]
    sending_ratio = fastest(bare_sending) / fastest(sendings)
    unguarded_ratio = fastest(bare_sending) / fastest(unguarded_sendings)
    unguarded_rate = count / min(r.wall_s for r in unguarded)
    complete = all(r.returncode == 0 and r.enriched == count for r in [*runs, *unguarded]) and all(
        b["ok"] == count for b in bare_runs
    )
    return {
        "measured": measured,
        "passed": measured >= cfg.target_overhead and complete,
        "naive": None,
        "note": f"{count} imgs: run {run_rate:.0f} img/s ({run.wall_s:.1f} s) vs bare loop {bare_rate:.0f} img/s "
        f"({bare['wall_s']:.1f} s); while sending only {sending_ratio:.2f}; with no guarantee "
        f"{unguarded_rate / bare_rate:.2f}, while sending {unguarded_ratio:.2f}"
        + ("" if complete else " (INCOMPLETE)"),
        "raw": {
            "images": count,
            "image_size": list(cfg.rate_image_size),
            "pipeline_images_per_s": run_rate,
            "pipeline_images_per_s_each": [count / r.wall_s for r in runs],
            "bare_images_per_s": [count / b["wall_s"] for b in bare_runs],
            "sending_ratio": sending_ratio,
            "pipeline_run": run.raw(),
            "pipeline_runs": [r.raw() for r in runs],
            "pipeline_sending": sendings[runs.index(run)],
            "pipeline_sendings": sendings,
            "unguarded_images_per_s_each": [count / r.wall_s for r in unguarded],
            "unguarded_ratio": unguarded_rate / bare_rate,
            "unguarded_sending_ratio": unguarded_ratio,
            "unguarded_runs": [r.raw() for r in unguarded],
            "unguarded_sendings": unguarded_sendings,
            "bare_runs": bare_runs,
            "bare_sending": bare_sending,
            "emulator_stats": {k: v for k, v in stats.items() if k != "charged_by_content"},
            "emulator_cpu_s": (emulator.rusage.ru_utime + emulator.rusage.ru_stime) if emulator.rusage else None,
        },
    }
