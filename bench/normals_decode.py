"""Figure 7: decoding a normal map for training (unit normals + person mask) ÷ a plain Pillow decode of it.

The map is realistic: the bundled emulator's answer for a synthetic portrait, 1024×1024, JPEG q90 (what the
emulator and, as far as its document says, the API return). Both sides decode the same bytes in the same
process, in turns, so a busy machine slows both alike; the figure is the ratio of their medians.
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
    """decode() (normals + mask) ÷ Pillow decode + np.asarray, medians of `normals_repeats` turns each."""
    data = portrait_map(cfg.normals_size)
    shape = (cfg.normals_size, cfg.normals_size)
    functions = {"pillow": _pillow, "decode": decode, "floor": lambda d: _output_floor(shape)}
    times: dict[str, list[float]] = {name: [] for name in functions}
    for turn in range(cfg.normals_repeats + 5):  # the first 5 turns warm caches and the allocator up
        for name, function in functions.items():
            started = time.perf_counter()
            function(data)
            if turn >= 5:
                times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in times.items()}
    measured = median["decode"] / median["pillow"]
    _, mask = decode(data)
    return {
        "measured": measured,
        "passed": measured <= cfg.target_normals_decode,
        "naive": None,
        "note": f"decode + mask {median['decode'] * 1e3:.1f} ms vs Pillow {median['pillow'] * 1e3:.1f} ms "
        f"({cfg.normals_size}x{cfg.normals_size} q90, {len(data) / 1e3:.0f} kB); writing the float32 "
        f"result alone is {median['floor'] / median['pillow']:.2f} of Pillow's time",
        "raw": {
            "size": list(shape),
            "jpeg_bytes": len(data),
            "person_fraction": round(float(mask.mean()), 3),
            "repeats": cfg.normals_repeats,
            "median_ms": {name: round(value * 1e3, 3) for name, value in median.items()},
            "p10_ms": {name: round(float(np.percentile(v, 10)) * 1e3, 3) for name, v in times.items()},
            "output_floor_ratio": median["floor"] / median["pillow"],
        },
    }
