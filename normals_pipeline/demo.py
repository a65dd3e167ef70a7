"""`normals-pipeline demo`: the whole product on the embedded default, with no key and no network.

Synthetic portraits in a local folder, the emulator on a free loopback port, the plan, two runs through the
Dagster definitions (the second charges nothing), a contact sheet to look at, and the training pairs with
the two lines that load them. An earlier demo's folder is kept and enriched again (which charges nothing new);
`--fresh` starts over, and only ever deletes a folder that holds a demo and nothing else.
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
from .guards import key_fingerprint
from .manifest import PARTITIONING
from .synthetic import contact_sheet, make_portraits
from .training import PARQUET_DIR

DEMO_KEY = "demo-key"
DEMO_SHARDS = 4
DATASET, OUTPUT = "portraits", "enriched"
STATE = ".state"  # the demo key's rate, balance and claims: a fresh emulator's balance, not an earlier demo's
NOT_A_PHOTO = "not-really-a-photo.jpg"  # a file the local checks refuse: a row with an error code, no request


class NotADemoFolder(ValueError):
    """`--fresh` would delete a folder that holds more than an earlier demo."""


def _command(verb: str, dataset: Path, output: Path, *options: str) -> int:
    from .cli import main

    return main([verb, "--dataset", str(dataset), "--output", str(output), "--shards", str(DEMO_SHARDS), *options])


def _manifest_rows(output: Path) -> list[dict]:
    import pyarrow.dataset as ds

    table = ds.dataset(output / "manifest", partitioning=PARTITIONING).to_table(
        columns=["path", "content_hash", "error_code", "error_message"]
    )
    return sorted(table.to_pylist(), key=lambda row: row["path"])


def _sheet(dataset: Path, output: Path, rows: list[dict]) -> Path:
    """Input | normal map for every enriched image, from the manifest the run wrote."""
    pairs = [
        (Image.open(dataset / row["path"]), Image.open(output / normal_map_path(row["content_hash"])), row["path"])
        for row in rows
        if row["error_code"] is None
    ]
    return contact_sheet(pairs, output / "contact_sheet.png")


def _prepare_workdir(workdir: Path, fresh: bool, images: int) -> Path:
    """The demo's dataset: an earlier demo's is kept (so this run charges nothing new) unless `fresh`."""
    dataset = workdir / DATASET
    if fresh and workdir.exists():
        extra = sorted(entry.name for entry in workdir.iterdir() if entry.name not in (DATASET, OUTPUT, STATE))
        if extra:
            raise NotADemoFolder(
                f"--fresh would delete {workdir}, which holds more than a demo ({', '.join(extra[:3])}): "
                "choose another --workdir"
            )
        print(f"deleting the earlier demo in {workdir} (--fresh)")
        shutil.rmtree(workdir)
    elif dataset.is_dir():
        print(
            f"keeping the earlier demo in {workdir}: its images are enriched already, so nothing new is charged "
            "(`normals-pipeline demo --fresh` starts over)"
        )
        return dataset
    make_portraits(dataset, images)
    (dataset / NOT_A_PHOTO).write_bytes(b"this file is text, not a JPEG")
    return dataset


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """The demo's key and state folder for the runs it makes, without leaving them in the caller's environment."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def run_demo(workdir: Path, images: int, fresh: bool = False) -> int:
    from .cli import CannotStart

    workdir = workdir.resolve()
    output = workdir / OUTPUT
    try:
        dataset = _prepare_workdir(workdir, fresh, images)
    except NotADemoFolder as error:
        raise CannotStart(str(error)) from None
    config = EmulatorConfig(keys={DEMO_KEY: Decimal(100)}, rpm=60, latency=0.3)
    state = workdir / STATE
    # This emulator starts with 100 credits: forget the key's balance and rate from the last one. The claims stay:
    # their store's id is what the output records as its owner (see `ownership`), so a demo re-run at once may go.
    for known in state.glob(f"{key_fingerprint(DEMO_KEY)}.*"):
        known.unlink()
    environment = _environment(CLIPDROP_API_KEY=DEMO_KEY, NORMALS_STATE_DIR=str(state))
    with Emulator(config) as emulator, environment:
        print(f"emulator: {emulator.url} (key {DEMO_KEY}, 100 credits, 60 requests/min)\n")
        print("what the first run will send and cost (`normals-pipeline plan`: no request, nothing written):")
        if code := _command("plan", dataset, output):
            return code
        print("\nfirst run:")
        if code := _command("run", dataset, output, "--api-url", emulator.url):
            return code
        print("\nsecond run (everything is done already, so nothing is sent):")
        if code := _command("run", dataset, output, "--api-url", emulator.url):
            return code
        charged = emulator.stats()["charged"]
    rows = _manifest_rows(output)
    sheet = _sheet(dataset, output, rows)
    refused = [f"    {row['path']}: {row['error_code']} ({row['error_message']})" for row in rows if row["error_code"]]
    print(f"\nthe emulator charged {charged} credits in all.")
    if refused:
        print("refused by the local checks, never sent (a row with an error code each):\n" + "\n".join(refused))
    print(
        f"dataset:        {dataset}\nnormal maps:    {output / 'normals'}\n"
        f'manifest:       {output / "manifest"}  (see the README\'s "The manifest" for the reads)\n'
        f"contact sheet:  {sheet}  (input image | normal map)\n"
        f"training pairs: {output / PARQUET_DIR}\n\n"
        "load them with Hugging Face datasets (images decoded as PIL, splits by file name):\n"
        "    import datasets\n"
        f"    pairs = datasets.load_dataset({str(output / PARQUET_DIR)!r})\n"
        "or as numpy arrays (image, normals, mask) for a torch DataLoader:\n"
        "    from normals_pipeline.training import NormalsDataset\n"
        f"    pairs = NormalsDataset({str(output)!r}, split='train', convention='opengl', size=(256, 256))"
    )
    return 0
