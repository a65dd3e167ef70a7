"""The Airflow provider (normals_pipeline.airflow): the hook, and the example DAG run by `airflow dags test` against
the emulator on Airflow's SQLite database: the same manifest and pairs as `normals-pipeline run`, the key's rate kept
with a Dagster run on the same key at once, and a mapped task retried after a kill sending nothing twice.

Runs under `make airflow-test` (NORMALS_AIRFLOW_TEST=1, the `airflow` extra); plain `pytest` skips it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

if os.environ.get("NORMALS_AIRFLOW_TEST") != "1":
    pytest.skip("the Airflow tests run with `make airflow-test` (NORMALS_AIRFLOW_TEST=1)", allow_module_level=True)
pytest.importorskip("airflow.sdk", reason="the Airflow tests need the `airflow` extra (make airflow-install)")

import pyarrow.dataset as ds  # noqa: E402
from _emulator_fixtures import kill_once_charged  # noqa: E402
from airflow.sdk.exceptions import AirflowFailException  # noqa: E402

from normals_pipeline.airflow import (  # noqa: E402
    ClipdropHook,
    NormalsEnrichOperator,
    NormalsTrainingPairsOperator,
    normals_dag,
    pool_for,
)
from normals_pipeline.guards import key_fingerprint  # noqa: E402
from normals_pipeline.inventory import refresh_inventory  # noqa: E402
from normals_pipeline.storage import open_storage  # noqa: E402
from normals_pipeline.synthetic import make_portraits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
AIRFLOW, CLI = str(BIN / "airflow"), str(BIN / "normals-pipeline")
KEY = "test-key"
LOGICAL_DATE = "2026-01-02T00:00:00+00:00"


def connection(url: str, **extra: object) -> str:
    return json.dumps({"conn_type": "http", "host": url, "password": KEY, "extra": extra})


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> Path:
    """One migrated SQLite metadata database for the module (`airflow db migrate` takes ~15 s)."""
    home = tmp_path_factory.mktemp("airflow_home")
    subprocess.run([AIRFLOW, "db", "migrate"], env=airflow_env(home), check=True, capture_output=True, timeout=300)
    return home


def airflow_env(home: Path, **more: str) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "examples" / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        **more,
    }


def dags_test(home: Path, dataset: Path, output: Path, url: str, *, rpm: int = 300, **extra: object):
    """`airflow dags test normals_enrichment` on the example DAG, started (a Popen) so a test can run or kill it."""
    env = airflow_env(
        home,
        NORMALS_DATASET=str(dataset),
        NORMALS_OUTPUT=str(output),
        AIRFLOW_CONN_CLIPDROP_DEFAULT=connection(url, requests_per_minute=rpm, **extra),
    )
    args = [AIRFLOW, "dags", "test", "normals_enrichment", LOGICAL_DATE]
    log = open(output.parent / f"{output.name}.airflow.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def cli_run(dataset: Path, output: Path, url: str, rpm: int = 300) -> subprocess.Popen:
    args = [CLI, "run", "--dataset", str(dataset), "--output", str(output), "--api-url", url, "--rpm", str(rpm)]
    env = {**os.environ, "CLIPDROP_API_KEY": KEY}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(process: subprocess.Popen, timeout: float = 300) -> int:
    return process.wait(timeout=timeout)


def manifest_of(output: Path):
    return ds.dataset(str(output / "manifest"), partitioning="hive").to_table().to_pandas()


def pairs_of(output: Path):
    table = ds.dataset(str(output / "training" / "parquet"), partitioning="hive").to_table(columns=["path", "split"])
    return table.to_pandas().sort_values("path", ignore_index=True)


def log_of(output: Path) -> str:
    return (output.parent / f"{output.name}.airflow.log").read_text()


# -- the hook -------------------------------------------------------------------------------------------------


def test_the_hook_reads_key_url_and_rate_from_the_connection_and_names_the_pool_without_the_key(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_CLIPDROP_DEFAULT", connection("http://127.0.0.1:9", requests_per_minute=300))
    settings = ClipdropHook().settings()
    assert (settings.api_key, settings.api_url, settings.requests_per_minute) == (KEY, "http://127.0.0.1:9", 300)
    assert KEY not in repr(settings)
    assert pool_for("clipdrop_default") == f"clipdrop_{key_fingerprint(KEY)}"


def test_without_a_connection_the_hook_reads_the_same_variables_as_definitions(monkeypatch):
    monkeypatch.setenv("CLIPDROP_API_KEY", "env-key")
    monkeypatch.setenv("CLIPDROP_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CLIPDROP_RPM", "120")
    settings = ClipdropHook("no_such_connection").settings()
    assert (settings.api_key, settings.api_url, settings.requests_per_minute) == ("env-key", "http://127.0.0.1:9", 120)


def test_no_key_in_the_connection_or_the_environment_fails_the_task_naming_both(monkeypatch):
    monkeypatch.delenv("CLIPDROP_API_KEY", raising=False)
    with pytest.raises(AirflowFailException, match="no Clipdrop API key: .*'no_such_connection'.*CLIPDROP_API_KEY"):
        ClipdropHook("no_such_connection").settings()


@pytest.mark.parametrize(
    ("extra", "message"),
    [({"rpm_typo": 5}, "unknown Clipdrop connection extra"), ({"requests_per_minute": 0}, "requests_per_minute")],
)
def test_a_bad_connection_fails_the_task_in_one_line(monkeypatch, extra, message):
    monkeypatch.setenv("AIRFLOW_CONN_CLIPDROP_DEFAULT", connection("http://127.0.0.1:9", **extra))
    with pytest.raises(AirflowFailException, match=message):
        ClipdropHook().settings()


def test_the_factory_maps_enrichment_over_ranges_of_shards_in_the_keys_pool(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_CLIPDROP_DEFAULT", connection("http://127.0.0.1:9"))
    dag = normals_dag("d", dataset=str(tmp_path / "in"), output=str(tmp_path / "out"), shards=16)
    assert list(dag.task_dict) == ["refresh_inventory", "enrich_shards", "validate_manifests", "training_pairs"]
    enrich = dag.task_dict["enrich_shards"]
    assert enrich.pool == f"clipdrop_{key_fingerprint(KEY)}"
    assert [len(keys) for keys in enrich.expand_input.value["shard_keys"]] == [4, 4, 4, 4]
    uris = {outlet.uri for task in dag.tasks for outlet in task.outlets}
    assert uris == {(tmp_path / "out" / "manifest").as_uri(), (tmp_path / "out" / "training").as_uri()}


def test_credits_running_out_fail_the_task_with_the_clis_line_and_keep_what_was_paid(
    monkeypatch, tmp_path, emulator_factory
):
    emulator = emulator_factory(keys={KEY: Decimal(3)})
    monkeypatch.setenv("AIRFLOW_CONN_CLIPDROP_DEFAULT", connection(emulator.url, requests_per_minute=6000))
    make_portraits(tmp_path / "in", 8)
    dataset, output = open_storage(str(tmp_path / "in")), open_storage(str(tmp_path / "out"))
    refresh_inventory(dataset, output, 1)
    where = {"dataset_uri": str(tmp_path / "in"), "output_uri": str(tmp_path / "out"), "shards": 1}
    task = NormalsEnrichOperator(task_id="enrich", shard_keys=["00"], **where)
    with pytest.raises(AirflowFailException, match=r"^run stopped: .*credits.*finished images are kept"):
        task.execute({})
    table = manifest_of(tmp_path / "out")
    assert table["normal_map_uri"].notna().sum() == 3 == int(Decimal(emulator.stats()["charged"]))


def test_the_training_task_exports_layouts_and_carries_the_quality_figures(monkeypatch, tmp_path, emulator):
    monkeypatch.setenv("AIRFLOW_CONN_CLIPDROP_DEFAULT", connection(emulator.url, requests_per_minute=6000))
    make_portraits(tmp_path / "in", 6)
    where = {"dataset_uri": str(tmp_path / "in"), "output_uri": str(tmp_path / "out"), "shards": 1}
    refresh_inventory(open_storage(where["dataset_uri"]), open_storage(where["output_uri"]), 1)
    NormalsEnrichOperator(task_id="enrich", shard_keys=["00"], **where).execute({})
    task = NormalsTrainingPairsOperator(task_id="pairs", export_layouts=["sapiens"], **where)
    extra = task.execute({})
    assert extra["pairs"] == 6 and extra["no_person"] == 0 and extra["layouts"] == ["sapiens"]
    assert len(list((tmp_path / "out" / "training" / "sapiens").rglob("*.npy"))) == 6
    assert task.execute({})["shards_reused"] == 1  # nothing changed: kept


# -- whole DAG runs -------------------------------------------------------------------------------------------


def test_dags_test_writes_the_manifest_and_pairs_of_a_cli_run_each_content_once_within_the_rate(
    airflow_home, tmp_path, emulator_factory
):
    emulator = emulator_factory(rpm=300)  # strict: the 301st request in any 60 s is answered 429
    make_portraits(tmp_path / "in", 20)
    (tmp_path / "in" / "copy.jpg").write_bytes((tmp_path / "in" / "portrait_000.jpg").read_bytes())
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not an image")
    run = dags_test(airflow_home, tmp_path / "in", tmp_path / "airflow", emulator.url)
    assert finished(run) == 0, log_of(tmp_path / "airflow")[-4000:]
    cli = cli_run(tmp_path / "in", tmp_path / "cli", emulator.url)
    assert finished(cli) == 0, cli.stdout.read()

    by_airflow, by_cli = manifest_of(tmp_path / "airflow"), manifest_of(tmp_path / "cli")
    columns = ["path", "content_hash", "error_code"]
    assert len(by_airflow) == 22 and by_airflow["path"].is_unique
    assert (by_airflow.sort_values("path")[columns].reset_index(drop=True)).equals(
        by_cli.sort_values("path")[columns].reset_index(drop=True)
    )
    # the credit of a content is on one of its paths: whichever shard sent it first (copy.jpg and
    # portrait_000.jpg are in different shards, which each run orders as it goes)
    credits = [table.groupby("content_hash")["credits_consumed"].sum() for table in (by_airflow, by_cli)]
    assert credits[0].equals(credits[1]) and set(credits[0]) == {0.0, 1.0}
    assert pairs_of(tmp_path / "airflow").equals(pairs_of(tmp_path / "cli"))
    stats = emulator.stats()
    assert stats["by_status"].get(429, 0) == 0
    # 20 distinct contents (the copy shares one), charged once for each output; the broken file never sent
    assert Counter(stats["charged_by_content"].values()) == Counter({2: 20})
    log = log_of(tmp_path / "airflow")
    assert "to send" in log and "credits" in log and KEY not in log


def test_a_dagster_run_and_an_airflow_dag_on_one_key_at_once_keep_its_rate(airflow_home, tmp_path, emulator_factory):
    emulator = emulator_factory(rpm=120)  # both together would need 2 x 30 requests in well under 60 s
    make_portraits(tmp_path / "in", 30)
    run = dags_test(airflow_home, tmp_path / "in", tmp_path / "airflow", emulator.url, rpm=120)
    deadline = time.monotonic() + 120  # the Dagster run starts as the DAG's enrichment does (Airflow starts slower)
    while not (tmp_path / "airflow" / "inventory").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    cli = cli_run(tmp_path / "in", tmp_path / "cli", emulator.url, rpm=120)
    assert finished(cli) == 0, cli.stdout.read()
    assert finished(run) == 0, log_of(tmp_path / "airflow")[-4000:]
    stats = emulator.stats()
    assert stats["by_status"].get(429, 0) == 0 and stats["max_in_any_60s"] <= 120
    assert Counter(stats["charged_by_content"].values()) == Counter({2: 30})  # once per output
    assert len(manifest_of(tmp_path / "airflow")) == len(manifest_of(tmp_path / "cli")) == 30


def test_a_mapped_task_retried_after_a_kill_sends_nothing_twice(airflow_home, tmp_path, emulator_factory):
    images, in_flight = 16, 4
    emulator = emulator_factory(latency=0.3)
    make_portraits(tmp_path / "in", images)
    output = tmp_path / "airflow"
    victim = dags_test(airflow_home, tmp_path / "in", output, emulator.url, rpm=6000, concurrency=in_flight)
    charged_before = kill_once_charged(emulator, victim, 6)
    assert 6 <= charged_before < images, "the kill should land mid-task"

    retry = dags_test(airflow_home, tmp_path / "in", output, emulator.url, rpm=6000, concurrency=in_flight)
    assert finished(retry) == 0, log_of(output)[-4000:]
    table = manifest_of(output)
    assert len(table) == images and table["path"].is_unique and table["error_code"].isna().all()
    charged = Decimal(emulator.stats()["charged"])
    recorded = Decimal(str(table["credits_consumed"].sum()))
    assert charged - recorded <= in_flight  # only answers lost with the killed task are unrecorded
    assert charged <= images + in_flight  # and only those could be sent twice
    assert not list((output / "journal").rglob("*.json*"))
