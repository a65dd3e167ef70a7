"""Several `normals-pipeline run`s at once on one key: one floor, budgets per run, nothing overspent."""

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from normals_pipeline.synthetic import make_portraits

CLI = str(Path(sys.executable).with_name("normals-pipeline"))


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
    assert all("run budget of 3" in err for _, _, err in results)
    assert Decimal(emulator.stats()["charged"]) == 6 == manifest_credits(tmp_path, 2)
