"""Declarative automation: the dataset observed, the inventory taken when it changed, the shards enriched.

The daemon's evaluation is `evaluate_automation_conditions`, a minute of evaluation time per tick; what it
requests is executed here as the daemon would launch it.
"""

import datetime
from decimal import Decimal

import pytest
from dagster import AssetKey, DagsterInstance, Definitions, EnvVar, evaluate_automation_conditions

from normals_pipeline import open_storage, read_manifests
from normals_pipeline.orchestration import normals_definitions
from normals_pipeline.synthetic import make_portraits

PREFIX = "photos"
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
        shards=4,
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


def test_eager_enriches_new_images_and_only_asks_again_when_the_dataset_changed(tmp_path, emulator, monkeypatch):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    make_portraits(tmp_path / "in", 4)
    daemon = Daemon(_defs(tmp_path, emulator.url, "eager"), DagsterInstance.ephemeral())

    first = daemon.ticks(4)  # the first tick only starts the cron; then observe, inventory, shards
    assert [set(tick) for tick in first] == [
        set(),
        {"dataset"},
        {"dataset", "image_inventory"},
        {"dataset", "surface_normals", "training_pairs"},
    ]
    assert len(_enriched(tmp_path)) == 4
    assert all(tick == {"dataset": [None]} for tick in daemon.ticks(2))  # unchanged: observed, nothing else

    new = make_portraits(tmp_path / "in" / "later", 2, seed=7)
    daemon.ticks(3)
    assert {path.relative_to(tmp_path / "in").as_posix() for path in new} <= _enriched(tmp_path)
    assert len(_enriched(tmp_path)) == 6
    assert Decimal(emulator.stats()["charged"]) == 6  # the shards re-run for the new images charged only them


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
