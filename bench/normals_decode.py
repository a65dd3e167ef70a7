"""Figure 7: decoding a normal map for training (unit normals + person mask) ÷ a plain Pillow decode of it.

The map is realistic: the bundled emulator's answer for a synthetic portrait, 1024×1024, JPEG q90 (what the
emulator and, as far as its document says, the API return). Both sides decode the same bytes in the same
process, in turns; the figure is the ratio of the medians of their CPU time (the wall-time ratio is recorded
too: on a machine busy with other work it swings by ±10 %).
"""

from __future__ import annotations

import io
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from normals_pipeline.emulator._normals import render_normal_map
from normals_pipeline.normals import decode
from normals_pipeline.synthetic import _portrait


def portrait_map(size: int, seed: int = 7) -> bytes:
    """The emulator's normal map of a synthetic portrait scaled to size × size."""
    portrait = _portrait(random.Random(seed)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return render_normal_map(portrait)


def _pillow(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _output_floor(shape: tuple[int, int]) -> np.ndarray:
    """Only allocating and writing the H×W×3 float32 result, with nothing computed: a floor for any decoder."""
    return np.ones((*shape, 3), dtype=np.float32)


def decode_speed(cfg: Any, workdir: Path) -> dict[str, Any]:
    """decode() (normals + mask) ÷ Pillow decode + np.asarray: CPU time of each call (as figure 3 measures, so
    other work on the machine does not count), medians of `normals_repeats` turns each; wall times as well."""
    data = portrait_map(cfg.normals_size)
    shape = (cfg.normals_size, cfg.normals_size)
    functions = {"pillow": _pillow, "decode": decode, "floor": lambda d: _output_floor(shape)}
    cpu: dict[str, list[float]] = {name: [] for name in functions}
    wall: dict[str, list[float]] = {name: [] for name in functions}
    for turn in range(cfg.normals_repeats + 5):  # the first 5 turns warm caches and the allocator up
        for name, function in functions.items():
            started, started_cpu = time.perf_counter(), time.thread_time()
            function(data)
            if turn >= 5:
                cpu[name].append(time.thread_time() - started_cpu)
                wall[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in cpu.items()}
    median_wall = {name: statistics.median(values) for name, values in wall.items()}
    measured = median["decode"] / median["pillow"]
    _, mask = decode(data)
    return {
        "measured": measured,
        "passed": measured <= cfg.target_normals_decode,
        "naive": None,
        "note": f"decode + mask {median['decode'] * 1e3:.1f} ms vs Pillow {median['pillow'] * 1e3:.1f} ms of CPU "
        f"({cfg.normals_size}x{cfg.normals_size} q90, {len(data) / 1e3:.0f} kB); wall-time ratio "
        f"{median_wall['decode'] / median_wall['pillow']:.2f}; writing the float32 result alone is "
        f"{median['floor'] / median['pillow']:.2f} of Pillow's time",
        "raw": {
            "size": list(shape),
            "jpeg_bytes": len(data),
            "person_fraction": round(float(mask.mean()), 3),
            "repeats": cfg.normals_repeats,
            "median_cpu_ms": {name: round(value * 1e3, 3) for name, value in median.items()},
            "median_wall_ms": {name: round(value * 1e3, 3) for name, value in median_wall.items()},
            "wall_ratio": median_wall["decode"] / median_wall["pillow"],
            "output_floor_ratio": median["floor"] / median["pillow"],
        },
    }
