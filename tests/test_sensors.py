"""The sensor turns new images into inventory refreshes, then into runs of the shards that have them."""

import pytest
from dagster import DagsterInstance, build_sensor_context, instance_for_test

from normals_pipeline.inventory import partition_key, shard_of
from normals_pipeline.orchestration import ClipdropResource, build_definitions
from normals_pipeline.synthetic import make_portraits

SHARDS = 4


@pytest.fixture
def instance():
    with instance_for_test() as instance:
        yield instance


def requests_of(result):
    return result.run_requests


def tick(defs, instance: DagsterInstance, cursor=None, name="new_images_sensor"):
    """One evaluation as the daemon makes it (resources by key, as a prefixed dataset has them)."""
    sensor = defs.resolve_sensor_def(name)
    with build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources, definitions=defs) as context:
        return sensor.evaluate_tick(context)


def test_new_images_refresh_the_inventory_then_run_their_shards(tmp_path, instance):
    make_portraits(tmp_path / "in", 6)
    defs = build_definitions(
        dataset_uri=str(tmp_path / "in"),
        output_uri=str(tmp_path / "out"),
        shards=SHARDS,
        clipdrop=ClipdropResource(api_key="unused", api_url="http://127.0.0.1:9"),
    )
    refresh = defs.resolve_job_def("refresh_inventory")

    [request] = requests_of(tick(defs, instance))
    assert request.job_name == "refresh_inventory"

    refresh.execute_in_process(instance=instance)
    result = tick(defs, instance)
    shards = {r.partition_key for r in requests_of(result)}
    assert {r.job_name for r in requests_of(result)} == {"enrich_shard"} and 1 <= len(shards) <= SHARDS
    cursor = result.cursor

    skipped = tick(defs, instance, cursor)
    assert not skipped.run_requests and skipped.skip_message == "no new or changed images"

    [new_image] = make_portraits(tmp_path / "in" / "later", 1, seed=3)
    [request] = requests_of(tick(defs, instance, cursor))
    assert request.job_name == "refresh_inventory"
    refresh.execute_in_process(instance=instance)
    [request] = requests_of(tick(defs, instance, cursor))
    expected = partition_key(shard_of(new_image.relative_to(tmp_path / "in").as_posix(), SHARDS), SHARDS)
    assert (request.job_name, request.partition_key) == ("enrich_shard", expected)
