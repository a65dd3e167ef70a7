"""`normals-pipeline demo`: the whole product on the embedded default, with no key and no network.

Synthetic portraits in a local folder, the emulator on a free loopback port, two runs through the
Dagster definitions (the second charges nothing), a contact sheet to look at, and the training pairs with
the two lines that load them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

from PIL import Image

from .emulator import Emulator, EmulatorConfig
from .enrich import normal_map_path
from .synthetic import contact_sheet, make_portraits
from .training import PARQUET_DIR

DEMO_KEY = "demo-key"
DEMO_SHARDS = 4


def _run_once(dataset: Path, output: Path, api_url: str) -> int:
    from .cli import main

    return main(
        ["run", "--dataset", str(dataset), "--output", str(output), "--api-url", api_url, "--shards", str(DEMO_SHARDS)]
    )


def _sheet(dataset: Path, output: Path) -> Path:
    """Input | normal map for every enriched image, from the manifest the run wrote."""
    import pyarrow.dataset as ds

    table = ds.dataset(output / "manifest", partitioning="hive").to_table(
        columns=["path", "content_hash", "error_code"]
    )
    pairs = []
    for row in sorted(table.to_pylist(), key=lambda r: r["path"]):
        if row["error_code"] is None:
            normal_map = Image.open(output / normal_map_path(row["content_hash"]))
            pairs.append((Image.open(dataset / row["path"]), normal_map, row["path"]))
    return contact_sheet(pairs, output / "contact_sheet.png")


@contextmanager
def _api_key(key: str) -> Iterator[None]:
    """The demo's key for the runs it makes, without leaving it in the caller's environment."""
    previous = os.environ.get("CLIPDROP_API_KEY")
    os.environ["CLIPDROP_API_KEY"] = key
    try:
        yield
    finally:
        if previous is None:
            del os.environ["CLIPDROP_API_KEY"]
        else:
            os.environ["CLIPDROP_API_KEY"] = previous


def run_demo(workdir: Path, images: int) -> int:
    workdir = workdir.resolve()
    dataset, output = workdir / "portraits", workdir / "enriched"
    shutil.rmtree(workdir, ignore_errors=True)
    make_portraits(dataset, images)
    (dataset / "not-really-a-photo.jpg").write_bytes(b"this file is text, not a JPEG")
    config = EmulatorConfig(keys={DEMO_KEY: Decimal(100)}, rpm=60, latency=0.3)
    with Emulator(config) as emulator, _api_key(DEMO_KEY):
        print(f"emulator: {emulator.url} (key {DEMO_KEY}, 100 credits, 60 requests/min)\n\nfirst run:")
        if code := _run_once(dataset, output, emulator.url):
            return code
        print("\nsecond run (everything is done already, so nothing is sent):")
        if code := _run_once(dataset, output, emulator.url):
            return code
        charged = emulator.stats()["charged"]
    sheet = _sheet(dataset, output)
    print(
        f"\nthe emulator charged {charged} credits in all.\n"
        f"dataset:       {dataset}\nnormal maps:   {output / 'normals'}\n"
        f"manifest:      {output / 'manifest'}  (pyarrow.dataset.dataset(..., partitioning='hive'))\n"
        f"contact sheet: {sheet}\n"
        f"training pairs: {output / PARQUET_DIR}\n\n"
        "load them with Hugging Face datasets (images decoded as PIL, splits by file name):\n"
        "    import datasets\n"
        f"    pairs = datasets.load_dataset({str(output / PARQUET_DIR)!r})\n"
        "or as numpy arrays (image, normals, mask) for a torch DataLoader:\n"
        "    from normals_pipeline.training import NormalsDataset\n"
        f"    pairs = NormalsDataset({str(output)!r}, split='train', convention='opengl', size=(256, 256))"
    )
    return 0
