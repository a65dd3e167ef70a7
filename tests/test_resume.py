"""A run killed with SIGKILL mid-shard loses at most the requests in flight; the same command finishes it."""

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from _emulator_fixtures import kill_once_charged
from PIL import Image

from normals_pipeline.synthetic import make_portraits

CLI = str(Path(sys.executable).with_name("normals-pipeline"))
IMAGES, CONCURRENCY = 16, 4


def command(dataset, output, url):
    return [CLI, "run", "--dataset", str(dataset), "--output", str(output), "--api-url", url]


@pytest.mark.parametrize("shards", ["1", "4"], ids=["one-shard", "a-range-of-4"])
def test_kill_9_then_rerun_gives_one_row_per_image_and_charges_only_what_was_in_flight(
    tmp_path, emulator_factory, shards
):
    emulator = emulator_factory(latency=0.3)
    dataset, output = tmp_path / "in", tmp_path / "out"
    make_portraits(dataset, IMAGES)
    env = {**os.environ, "CLIPDROP_API_KEY": "test-key"}
    args = command(dataset, output, emulator.url) + [
        "--rpm",
        "6000",
        "--shards",
        shards,
        "--concurrency",
        str(CONCURRENCY),
    ]

    victim = subprocess.Popen(
        args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    charged_before = kill_once_charged(emulator, victim, 6, timeout_s=60)
    assert 6 <= charged_before < IMAGES, "the kill should land mid-shard"

    finished = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr

    table = ds.dataset(str(output / "manifest"), partitioning="hive").to_table().to_pandas()
    assert len(table) == IMAGES and table["path"].is_unique
    assert table["error_code"].isna().all()
    charged = Decimal(emulator.stats()["charged"])
    recorded = Decimal(str(table["credits_consumed"].sum()))
    assert charged - recorded <= CONCURRENCY  # only answers lost with the killed process are unrecorded
    assert charged <= IMAGES + CONCURRENCY  # and only those could be sent twice
    assert not list((output / "journal").rglob("*.json*"))
    for normal_map in (output / "normals").rglob("*.jpg"):
        with Image.open(normal_map) as image:
            image.load()  # no partial map is ever visible
    print(f"charged before kill {charged_before}, after rerun {charged}, in the manifest {recorded}")
