"""deploy/: the cluster's instance on PostgreSQL, and a shard run whose step a real Celery worker executes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml
from _emulator_fixtures import TEST_KEY
from dagster import AssetKey, DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.storage.tags import PARTITION_NAME_TAG
from kombu import Connection

from normals_pipeline.emulator import Emulator
from normals_pipeline.inventory import take_inventory, write_inventory
from normals_pipeline.orchestration import normals_definitions
from normals_pipeline.storage import open_storage
from normals_pipeline.synthetic import make_portraits

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
BIN = Path(sys.executable).parent
SHARDS = 2


def deploy_instance(home: Path) -> DagsterInstance:
    """An instance from deploy/dagster.yaml (its DAGSTER_PG_URL from the environment)."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    return DagsterInstance.from_config(str(home))


@pytest.fixture
def pipeline_env(tmp_path: Path, emulator: Emulator, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Six portraits, their inventory over two shards, the variables deploy/definitions.py reads, and in
    `shard` a shard that holds images."""
    make_portraits(tmp_path / "dataset", 6)
    dataset, output = open_storage(str(tmp_path / "dataset")), open_storage(str(tmp_path / "output"))
    inventory = take_inventory(dataset, SHARDS)
    write_inventory(output, inventory)
    shard = max(set(inventory["shard"].to_pylist()), key=inventory["shard"].to_pylist().count)
    env = {
        "DAGSTER_PG_URL": postgres_url,
        "NORMALS_DATASET": str(tmp_path / "dataset"),
        "NORMALS_OUTPUT": str(tmp_path / "output"),
        "NORMALS_SHARDS": str(SHARDS),
        "CLIPDROP_API_KEY": TEST_KEY,
        "CLIPDROP_API_URL": emulator.url,
        "CLIPDROP_RPM": "100000",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return {**env, "shard": f"{shard:02d}"}


def shard_rows(output: Path, shard: str) -> int:
    return ds.dataset(str(output / "manifest" / f"partition={shard}")).count_rows()


def test_the_postgres_instance_records_a_shard_run_that_another_process_reads_back(
    tmp_path: Path, pipeline_env: dict
) -> None:
    defs = normals_definitions(dataset=pipeline_env["NORMALS_DATASET"], output=pipeline_env["NORMALS_OUTPUT"],
                               shards=SHARDS, api_url=pipeline_env["CLIPDROP_API_URL"])  # fmt: skip
    with deploy_instance(tmp_path / "home") as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        shard = pipeline_env["shard"]
        result = defs.resolve_job_def("enrich_shard").execute_in_process(partition_key=shard, instance=instance)
        assert result.success
    rows = shard_rows(Path(pipeline_env["NORMALS_OUTPUT"]), shard)
    with deploy_instance(tmp_path / "other-host") as other:  # a second host: only the database is shared
        run = other.get_run_by_id(result.run_id)
        assert run is not None and run.is_success and run.tags[PARTITION_NAME_TAG] == shard
        event = other.get_latest_materialization_event(AssetKey("surface_normals"))
        assert event is not None and event.run_id == result.run_id
        materialization = event.asset_materialization
        assert materialization.partition == shard and materialization.metadata["dagster/row_count"].value == rows > 0


@pytest.fixture
def celery_worker(tmp_path: Path, amqp_url: str, pipeline_env: dict) -> Iterator[Callable[[], str]]:
    """One `dagster-celery worker` (a stand-in host) on a queue of this test's own, with deploy's Celery settings
    pointed at NORMALS_TEST_AMQP_URL. Yields its name; the worker's whole process group is stopped afterwards."""
    config = yaml.safe_load((DEPLOY / "celery.yaml").read_text())
    queue, name = f"normals-test-{uuid.uuid4().hex[:12]}", f"test-{uuid.uuid4().hex[:8]}"
    config["execution"]["config"]["broker"] = amqp_url
    config["execution"]["config"]["config_source"]["task_default_queue"] = queue
    celery_yaml = tmp_path / "celery.yaml"
    celery_yaml.write_text(yaml.safe_dump(config))
    os.environ["NORMALS_CELERY_CONFIG"] = str(celery_yaml)  # this process's executor: the same queue
    (tmp_path / "home").mkdir(exist_ok=True)
    shutil.copy(DEPLOY / "dagster.yaml", tmp_path / "home" / "dagster.yaml")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # dagster-celery starts `celery` by name
        "DAGSTER_HOME": str(tmp_path / "home"),
        "NORMALS_STATE_DIR": str(tmp_path / "worker-state"),
    }
    log = tmp_path / "worker.log"
    command = [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app", "-y", str(celery_yaml),
               "-q", queue, "-n", name, "--", "--concurrency", "1"]  # fmt: skip
    with open(log, "w") as out:
        worker = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while " ready." not in log.read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Celery worker did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield lambda: name
    finally:
        del os.environ["NORMALS_CELERY_CONFIG"]
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        with Connection(amqp_url) as connection:  # the queue and exchange named after it, left by the worker
            connection.default_channel.queue_delete(queue)
            connection.default_channel.exchange_delete(queue)


# dagster-celery registers its task again on each executor's app: harmless, and not ours to fix
@pytest.mark.filterwarnings("ignore:Task name 'execute_plan' is already registered")
def test_a_shard_step_runs_in_a_celery_worker_through_the_deploy_code_location(
    tmp_path: Path, pipeline_env: dict, celery_worker: Callable[[], str]
) -> None:
    recon_job = ReconstructableRepository.for_file(str(DEPLOY / "definitions.py"), "defs").get_reconstructable_job(
        "enrich_shard"
    )
    with DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        with execute_job(recon_job, instance=instance, tags={PARTITION_NAME_TAG: pipeline_env["shard"]}) as result:
            assert result.success
            workers = [
                entry.value
                for event in instance.all_logs(result.run_id)
                if event.dagster_event and event.dagster_event.event_type_value == "ENGINE_EVENT"
                for key, entry in event.dagster_event.engine_event_data.metadata.items()
                if key == "Celery worker"
            ]
            assert workers and {worker.split("@")[0] for worker in workers} == {celery_worker()}  # one per step
            materialization = result.asset_materializations_for_node("surface_normals")[0]
    output = Path(pipeline_env["NORMALS_OUTPUT"])
    expected = ds.dataset(str(output / "inventory" / "inventory.parquet")).to_table().to_pandas()
    shard = pipeline_env["shard"]
    assert (
        shard_rows(output, shard) == (expected["shard"] == int(shard)).sum() == materialization.metadata["images"].value
    )
