"""Declarative automation: the dataset observed, the inventory taken when it changed, the shards enriched.

The daemon's evaluation is `evaluate_automation_conditions`, a minute of evaluation time per tick; what it
requests is executed here as the daemon would launch it.
"""

import datetime
from decimal import Decimal

import pytest
from dagster import AssetKey, DagsterInstance, Definitions, EnvVar, evaluate_automation_conditions
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from normals_pipeline import open_storage, read_manifests
from normals_pipeline.inventory import partition_key, partition_keys, shard_of
from normals_pipeline.orchestration import merge_normals_definitions, normals_definitions
from normals_pipeline.synthetic import make_portraits

PREFIX = "photos"
SHARDS = 4
SHARD_KEYS = partition_keys(SHARDS)
START = datetime.datetime(2026, 12, 1, 12, 0, 30)


class Daemon:
    """Ticks once per evaluation minute and runs what each tick requests."""

    def __init__(self, defs: Definitions, instance: DagsterInstance) -> None:
        self.defs, self.instance, self.cursor, self.minute = defs, instance, None, 0
        self.requested: list[dict[str, list[str | None]]] = []

    def tick(self) -> dict[str, list[str | None]]:
        result = evaluate_automation_conditions(
            defs=self.defs,
            instance=self.instance,
            evaluation_time=START + datetime.timedelta(minutes=self.minute),
            cursor=self.cursor,
        )
        self.cursor, self.minute = result.cursor, self.minute + 1
        keys = self.defs.resolve_asset_graph().get_all_asset_keys()
        requested = {
            key.path[-1]: sorted(result.get_requested_partitions(key), key=str)
            for key in keys
            if result.get_requested_partitions(key)
        }
        self.requested.append(requested)
        self._run(requested)
        return requested

    def _run(self, requested: dict[str, list[str | None]]) -> None:
        job = self.defs.resolve_implicit_global_asset_job_def()
        by_partition: dict[str | None, list[AssetKey]] = {}
        for name, partitions in requested.items():
            for partition in partitions:
                by_partition.setdefault(partition, []).append(AssetKey([PREFIX, name]))
        for partition, keys in sorted(by_partition.items(), key=lambda item: str(item[0])):
            job.execute_in_process(instance=self.instance, asset_selection=keys, partition_key=partition)

    def ticks(self, count: int) -> list[dict[str, list[str | None]]]:
        return [self.tick() for _ in range(count)]


def _defs(tmp_path, url: str, automation: str, **settings) -> Definitions:
    return normals_definitions(
        dataset=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        shards=SHARDS,
        api_key=EnvVar("CLIPDROP_API_KEY"),
        api_url=url,
        requests_per_minute=100_000,
        key_prefix=PREFIX,
        automation=automation,
        **settings,
    )


def _enriched(tmp_path) -> set[str]:
    rows = read_manifests(open_storage(str(tmp_path / "out")))
    return set(rows.loc[rows["error_code"].isna(), "path"])


def test_eager_enriches_new_images_and_runs_only_their_shards(tmp_path, emulator, monkeypatch):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    make_portraits(tmp_path / "in", 6)
    daemon = Daemon(_defs(tmp_path, emulator.url, "eager"), DagsterInstance.ephemeral())

    # the first tick starts the cron; then the dataset is observed, the inventory taken (with the next
    # observation, in one run), the shards' digests observed from it, and every shard run
    assert daemon.ticks(5) == [
        {},
        {"dataset": [None]},
        {"dataset": [None], "image_inventory": [None]},
        {"dataset": [None]},
        {"dataset": [None], "surface_normals": SHARD_KEYS, "training_pairs": SHARD_KEYS},
    ]
    assert len(_enriched(tmp_path)) == 6
    assert daemon.ticks(2) == [{"dataset": [None]}] * 2  # unchanged: observed, nothing else

    new = make_portraits(tmp_path / "in" / "later", 2, seed=7)
    paths = {path.relative_to(tmp_path / "in").as_posix() for path in new}
    their_shards = sorted({partition_key(shard_of(path, SHARDS), SHARDS) for path in paths})
    assert len(their_shards) < SHARDS
    assert daemon.ticks(4) == [
        {"dataset": [None]},  # the listing changed
        {"dataset": [None], "image_inventory": [None]},
        {"dataset": [None]},  # the inventory's shard digests
        {"dataset": [None], "surface_normals": their_shards, "training_pairs": their_shards},
    ]
    assert paths <= _enriched(tmp_path) and len(_enriched(tmp_path)) == 8
    assert Decimal(emulator.stats()["charged"]) == 8  # each image charged once


def test_on_cron_observes_on_the_schedule(tmp_path):
    make_portraits(tmp_path / "in", 1)
    defs = _defs(tmp_path, "http://127.0.0.1:9", "on_cron", schedule_cron="0 * * * *")
    daemon = Daemon(defs, DagsterInstance.ephemeral())
    ticks = daemon.ticks(3)
    assert ticks == [{}, {}, {}]  # 12:00:30 to 12:02:30: no hourly tick passed
    daemon.minute = 60  # 13:00:30: the 13:00 tick passed
    assert daemon.tick() == {"dataset": [None]}


def test_none_requests_nothing_and_adds_nothing(tmp_path):
    make_portraits(tmp_path / "in", 2)
    defs = _defs(tmp_path, "http://127.0.0.1:9", "none")
    daemon = Daemon(defs, DagsterInstance.ephemeral())
    assert daemon.ticks(3) == [{}, {}, {}]
    assert all(spec.automation_condition is None for spec in defs.resolve_all_asset_specs())
    assert AssetKey([PREFIX, "dataset"]) not in defs.resolve_asset_graph().get_all_asset_keys()
    assert {sensor.name for sensor in defs.get_repository_def().sensor_defs} == {f"{PREFIX}__new_images_sensor"}


def test_automation_runs_its_own_sensor_by_default(tmp_path):
    defs = _defs(tmp_path, "http://127.0.0.1:9", "eager")
    sensor = defs.resolve_sensor_def(f"{PREFIX}__automation_sensor")
    assert sensor.default_status.value == "RUNNING"


@pytest.mark.parametrize("automation", ["eager", "on_cron"])
@pytest.mark.parametrize("enabled", ["sensor_enabled", "schedule_enabled"])
def test_automation_with_the_sensor_or_the_schedule_on_is_refused(tmp_path, automation, enabled):
    with pytest.raises(ValueError, match=f"automation='{automation}' with {enabled} would request the same runs twice"):
        _defs(tmp_path, "http://127.0.0.1:9", automation, **{enabled: True})


def test_an_unknown_automation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="automation must be one of eager, on_cron, none"):
        _defs(tmp_path, "http://127.0.0.1:9", "daily")


def test_observing_dataset_shards_records_every_shard_from_the_stored_inventory(tmp_path, monkeypatch):
    make_portraits(tmp_path / "in", 6)
    defs = _defs(tmp_path, "http://127.0.0.1:9", "eager")
    instance = DagsterInstance.ephemeral()
    defs.resolve_job_def(f"{PREFIX}__refresh_inventory").execute_in_process(instance=instance)
    job = defs.resolve_implicit_global_asset_job_def()
    key = AssetKey([PREFIX, "dataset_shards"])
    job.execute_in_process(instance=instance, asset_selection=[key], partition_key="01")
    records = (instance.get_latest_data_version_record(key, partition_key=p) for p in SHARD_KEYS)
    versions = [record.asset_observation.tags[DATA_VERSION_TAG] for record in records]
    assert all(versions) and len(set(versions)) > 1  # one digest per shard, from the one run


def test_two_automated_datasets_load_into_one_code_location(tmp_path):
    defs = merge_normals_definitions(
        *(
            normals_definitions(dataset=f"/d/{name}", output=f"/o/{name}", key_prefix=name, automation="eager")
            for name in ("a", "b")
        )
    )
    repository = defs.get_repository_def()
    assert {sensor.name for sensor in repository.sensor_defs} >= {"a__automation_sensor", "b__automation_sensor"}
    assert {key.to_user_string() for key in repository.asset_graph.get_all_asset_keys()} >= {
        "a/dataset",
        "a/dataset_shards",
        "b/dataset",
        "b/dataset_shards",
    }
