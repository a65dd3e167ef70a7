"""Figures 3 and 4: the client's CPU per image, and peak memory as a shard grows.

Both run the emulator as its own process (`normals-pipeline emulator`), so its decoding and rendering
count neither in the client's CPU nor in its memory.
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Any

from PIL import Image

from ._support import CliRun, EmulatorProcess, fresh_key, make_photos, make_small_jpegs, naive_client

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


def _enriched(run: CliRun) -> int | None:
    match = re.search(r"(\d+) images, (\d+) enriched", run.stdout_tail)
    return int(match.group(2)) if match else None


def peak_memory(cfg: Any, workdir: Path) -> dict[str, Any]:
    """Figure 4: peak RSS of `normals-pipeline run` on a large shard ÷ on a small one (fresh processes)."""
    small, large = cfg.memory_small, cfg.memory_large
    generated = time.perf_counter()
    make_small_jpegs(workdir / "small", small, seed=40, size=cfg.memory_image_size)
    make_small_jpegs(workdir / "large", large, seed=41, size=cfg.memory_image_size)
    generated = time.perf_counter() - generated
    key = fresh_key("memory")
    with EmulatorProcess(keys={key: CREDITS}, rpm=UNLIMITED_RPM, latency=0.0, log=workdir / "emulator.log") as emulator:
        runs = {}
        for name in ("small", "large"):
            run = CliRun(workdir / name, workdir / f"{name}-output", emulator.url, key, 10_000_000, cfg.concurrency)
            runs[name] = run.start().wait()
        stats = emulator.stats()
    measured = runs["large"].maxrss_kib / runs["small"].maxrss_kib
    complete = _enriched(runs["small"]) == small and _enriched(runs["large"]) == large
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
            "concurrency": cfg.concurrency,
            "shards": 1,
            "runs": {
                name: {
                    **run.raw(),
                    "enriched": _enriched(run),
                    "images_per_s": ((small if name == "small" else large) / run.wall_s),
                }
                for name, run in runs.items()
            },
            "emulator_stats": stats,
        },
    }
