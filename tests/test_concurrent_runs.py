"""Several runs at once: on one key (one floor, budgets per run, nothing overspent) and on one output
(each distinct content charged once, one row per image, the manifest adding up to the bill)."""

import os
import shutil
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from normals_pipeline.inventory import shard_of
from normals_pipeline.synthetic import make_portraits

CLI = str(Path(sys.executable).with_name("normals-pipeline"))
DAGSTER = str(Path(sys.executable).with_name("dagster"))
ROOT = Path(__file__).resolve().parents[1]


def start_runs(tmp_path, url, count, *extra):
    env = {**os.environ, "CLIPDROP_API_KEY": "test-key", "NORMALS_STATE_DIR": str(tmp_path / "state")}
    runs = []
    for index in range(count):
        make_portraits(tmp_path / f"in{index}", 8, seed=100 + index)  # distinct bytes per run
        args = ["run", "--dataset", str(tmp_path / f"in{index}"), "--output", str(tmp_path / f"out{index}")]
        args += ["--api-url", url, "--rpm", "6000", "--shards", "1", "--concurrency", "4", *extra]
        runs.append(subprocess.Popen([CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(run.wait(timeout=180), *run.communicate()) for run in runs]


def manifest_credits(tmp_path, count):
    total = Decimal(0)
    for index in range(count):
        table = ds.dataset(str(tmp_path / f"out{index}" / "manifest"), partitioning="hive").to_table()
        total += Decimal(str(sum(table["credits_consumed"].to_pylist())))
    return total


@pytest.mark.parametrize("latency", [0.0, 0.2])
def test_concurrent_runs_stop_together_at_the_credit_floor(tmp_path, emulator_factory, latency):
    emulator = emulator_factory(keys={"test-key": Decimal(12)}, latency=latency)

    results = start_runs(tmp_path, emulator.url, 2, "--credit-floor", "4")

    charged = Decimal(emulator.stats()["charged"])
    # 12 credits, floor 4: never below it. A guard cannot tell which requests in flight the last reported
    # balance already counts, so it may stop up to one run's in-flight requests (4) early, never late.
    assert 8 - 4 <= charged <= 8
    assert manifest_credits(tmp_path, 2) == charged  # and every charged image has its row
    stopped = [err for code, _, err in results if code == 1]
    assert stopped and all("credit floor of 4" in err for err in stopped)
    assert all(code in (0, 1) for code, _, _ in results)


def test_each_run_keeps_to_its_own_budget(tmp_path, emulator_factory):
    emulator = emulator_factory(keys={"test-key": Decimal(100)})

    results = start_runs(tmp_path, emulator.url, 2, "--budget", "3")

    assert [code for code, _, _ in results] == [1, 1]
    assert all("run budget of 3" in err for _, _, err in results), results
    assert Decimal(emulator.stats()["charged"]) == 6 == manifest_credits(tmp_path, 2)


def read_manifest(output):
    return ds.dataset(str(output / "manifest"), partitioning="hive").to_table().to_pandas()


def test_two_runs_at_once_on_one_output_charge_each_content_once(tmp_path, emulator_factory):
    emulator = emulator_factory(latency=0.1)
    make_portraits(tmp_path / "in", 40)
    env = {**os.environ, "CLIPDROP_API_KEY": "test-key", "NORMALS_STATE_DIR": str(tmp_path / "state")}
    args = [CLI, "run", "--dataset", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--api-url"]
    args += [emulator.url, "--rpm", "100000", "--shards", "4"]
    runs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    results = [(run.wait(timeout=180), *run.communicate()) for run in runs]

    assert [code for code, _, _ in results] == [0, 0], results
    stats = emulator.stats()
    table = read_manifest(tmp_path / "out")
    assert stats["charged_twice"] == 0 and Decimal(stats["charged"]) == len(stats["charged_by_content"]) == 40
    assert len(table) == 40 and table["path"].is_unique and table["error_code"].isna().all()
    assert Decimal(str(table["credits_consumed"].sum())) == Decimal(stats["charged"])


def _name_in_shard(shard, suffix, taken, shards=16):
    index = 0
    while (name := f"dup/{index:05d}{suffix}") in taken or shard_of(name, shards) != shard:
        index += 1
    taken.add(name)
    return name


def test_two_shards_sharing_contents_run_at_once_by_dagster_charge_each_content_once(tmp_path, emulator_factory):
    """The UI-backfill case: shards 03 and 07 each hold the same 20 contents under other names, and
    Dagster runs them at once, each in its own process."""
    emulator = emulator_factory(latency=0.2)
    sources = make_portraits(tmp_path / "portraits", 20)
    taken: set[str] = set()
    for shard in (3, 7):
        for source in sources:
            target = tmp_path / "in" / _name_in_shard(shard, source.suffix, taken)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    env = {
        **os.environ,
        "CLIPDROP_API_KEY": "test-key",
        "CLIPDROP_API_URL": emulator.url,
        "CLIPDROP_RPM": "100000",
        "NORMALS_DATASET": str(tmp_path / "in"),
        "NORMALS_OUTPUT": str(tmp_path / "out"),
        "NORMALS_STATE_DIR": str(tmp_path / "state"),
    }
    env.pop("DAGSTER_HOME", None)
    materialize = [DAGSTER, "asset", "materialize", "-f", str(ROOT / "definitions.py"), "--select"]
    subprocess.run([*materialize, "image_inventory"], env=env, check=True, capture_output=True, cwd=tmp_path)
    runs = [
        subprocess.Popen(
            [*materialize, "surface_normals", "--partition", key],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key in ("03", "07")
    ]
    assert [run.wait(timeout=180) for run in runs] == [0, 0]

    stats = emulator.stats()
    table = read_manifest(tmp_path / "out")
    assert stats["charged_twice"] == 0 and Decimal(stats["charged"]) == len(sources)
    assert len(table) == 2 * len(sources) and table["error_code"].isna().all()
    assert Decimal(str(table["credits_consumed"].sum())) == Decimal(stats["charged"])


@pytest.mark.parametrize("lost_at", [0.25, 0.5, 0.75])
def test_two_runs_on_one_output_add_up_to_the_bill_when_the_claims_vanish(
    tmp_path, emulator_factory, redis_server, lost_at
):
    """Two runs on one output with Redis, whose claims all vanish mid-run (an eviction, a FLUSHALL, a failover to
    a replica that lagged, a test's teardown on a shared Redis): both runs then write the same shards, and may
    send a content both. Every journaled row and its cost is folded in, so the manifest still adds up to the bill."""
    import redis

    emulator = emulator_factory(latency=0.2)
    make_portraits(tmp_path / "in", 60)
    url, _ = redis_server()
    env = {**os.environ, "CLIPDROP_API_KEY": "test-key"}
    args = [CLI, "run", "--dataset", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--api-url"]
    args += [emulator.url, "--rpm", "100000", "--shards", "4", "--concurrency", "4", "--redis-url", url]
    runs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    while Decimal(emulator.stats()["charged"]) < 60 * lost_at and all(run.poll() is None for run in runs):
        time.sleep(0.01)
    state = redis.Redis.from_url(url)
    state.delete(*state.keys("normals:claim:*") or ["none"])
    results = [(run.wait(timeout=180), *run.communicate()) for run in runs]

    assert [code for code, _, _ in results] == [0, 0], results
    stats = emulator.stats()
    table = read_manifest(tmp_path / "out")
    assert len(table) == 60 and table["path"].is_unique and table["error_code"].isna().all()
    assert Decimal(str(table["credits_consumed"].sum())) == Decimal(stats["charged"])  # double charges included
    assert not list((tmp_path / "out" / "journal").rglob("*.json*"))
