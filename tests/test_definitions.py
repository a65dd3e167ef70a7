"""The code location loads the way `dagster dev -w workspace.yaml` loads it."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

from dagster import Definitions

ROOT = Path(__file__).resolve().parents[1]


def test_definitions_module_exports_defs(monkeypatch):
    monkeypatch.setenv("NORMALS_SHARDS", "8")
    import definitions

    defs = importlib.reload(definitions).defs
    Definitions.validate_loadable(defs)
    partitions = defs.resolve_assets_def("surface_normals").partitions_def
    assert partitions.get_partition_keys() == [f"{i:02d}" for i in range(8)]
    assert defs.resolve_assets_def("surface_normals").specs_by_key  # loads with its check
    assert {s.name for s in defs.sensors} == {"new_images_sensor"}
    assert {s.name for s in defs.schedules} == {"daily_inventory_schedule"}


def test_workspace_validates_with_the_dagster_cli(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    dagster = Path(sys.executable).with_name("dagster")
    result = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "All code locations passed validation" in result.stderr + result.stdout


def test_the_documented_instance_settings_load(tmp_path):
    from dagster import DagsterInstance
    from dagster._core.run_coordinator.queued_run_coordinator import QueuedRunCoordinator

    (tmp_path / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    instance = DagsterInstance.from_config(str(tmp_path))
    config = instance.get_concurrency_config()
    assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
    assert config.run_queue_config.max_concurrent_runs == 4
    assert config.pool_config.default_pool_limit == 4
    assert config.pool_config.pool_granularity.value == "run"
