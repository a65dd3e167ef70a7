"""Figure 5: `take_inventory` of many files ÷ a bare recursive `os.scandir` walk of the same tree."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILES_PER_DIR = 1000


def make_tree(root: Path, count: int) -> None:
    """`count` tiny files, FILES_PER_DIR per folder (a few bytes each: the inventory never reads them)."""
    for index in range(count):
        folder = root / f"d{index // FILES_PER_DIR:04d}"
        if index % FILES_PER_DIR == 0:
            folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"img_{index:06d}.jpg", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"x")
        os.close(fd)


def bare_walk(top: str) -> Iterator[os.DirEntry[str]]:
    """Every file entry under `top`, recursively, with no stat and no sorting: the floor to compare with."""
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    yield entry


def _timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def inventory_speed(cfg: Any, workdir: Path) -> dict[str, Any]:
    from normals_pipeline import LocalStorage, take_inventory

    count = cfg.inventory_files
    root = workdir / "tree"
    created, _ = _timed(lambda: make_tree(root, count))
    storage = LocalStorage(root)

    def walk() -> int:
        return sum(1 for _ in bare_walk(str(root)))

    def walk_and_stat() -> int:  # not the figure: the floor of any inventory that records size and mtime
        return sum(1 for entry in bare_walk(str(root)) if entry.stat(follow_symlinks=False))

    def inventory() -> int:
        return take_inventory(storage, 16).num_rows

    walk(), inventory()  # warm the dentry/inode caches and the imports
    walks, stats, inventories = [], [], []
    for _ in range(cfg.inventory_repeats):  # interleaved, so drift hits all alike
        seconds, walked = _timed(walk)
        walks.append(seconds)
        stats.append(_timed(walk_and_stat)[0])
        seconds, listed = _timed(inventory)
        inventories.append(seconds)
    measured = min(inventories) / min(walks)
    complete = walked == count and listed == count
    return {
        "measured": measured,
        "passed": measured <= cfg.target_inventory and complete,
        "naive": None,
        "note": f"inventory {min(inventories):.3f} s vs walk {min(walks):.3f} s ({count} files); "
        f"walk+stat alone {min(stats) / min(walks):.1f}x"
        + ("" if complete else f" (COUNT MISMATCH: walk {walked}, inventory {listed})"),
        "raw": {
            "files": count,
            "files_per_dir": FILES_PER_DIR,
            "creation_s": round(created, 3),
            "walk_s": walks,
            "inventory_s": inventories,
            "walk_and_stat_s": stats,
            "walk_and_stat_ratio": min(stats) / min(walks),
            "walk_files": walked,
            "inventory_rows": listed,
            "shards": 16,
        },
    }
