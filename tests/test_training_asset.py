"""The `training_pairs` asset through Dagster: in the shard job with `surface_normals`, partitioned and backfilled
alike, one materialization per partition with its own figures, also in a run over a range."""

import pyarrow.dataset as pads
import pytest
from dagster import AssetCheckSeverity, AssetKey, DagsterInstance
from PIL import Image

from normals_pipeline.enrich import normal_map_path
from normals_pipeline.inventory import partition_key, shard_of
from normals_pipeline.manifest import read_manifest
from normals_pipeline.orchestration import ClipdropResource, build_definitions, normals_definitions
from normals_pipeline.storage import LocalStorage
from normals_pipeline.synthetic import make_portraits
from normals_pipeline.training import SCHEMA

SHARDS = 4
RANGE = {"dagster/asset_partition_range_start": "00", "dagster/asset_partition_range_end": "03"}


def definitions(dataset, output, url, **settings):
    resource = ClipdropResource(api_key="test-key", api_url=url, requests_per_minute=100_000)
    return build_definitions(
        dataset_uri=str(dataset), output_uri=str(output), shards=SHARDS, clipdrop=resource, **settings
    )


def training_materializations(instance, key: AssetKey = AssetKey("training_pairs")):  # noqa: B008
    """The latest materialization's metadata per partition."""
    latest = {}
    for record in instance.fetch_materializations(key, limit=1000).records:  # newest first
        latest.setdefault(record.asset_materialization.partition, record.asset_materialization.metadata)
    return latest


def test_a_ranged_run_builds_every_shards_pairs_with_its_own_metadata(tmp_path, emulator):
    make_portraits(tmp_path / "in", 10)
    output = tmp_path / "out"
    defs = definitions(tmp_path / "in", output, emulator.url, webdataset=True)
    instance = DagsterInstance.ephemeral()
    defs.resolve_job_def("refresh_inventory").execute_in_process(instance=instance)

    result = defs.resolve_job_def("enrich_shard").execute_in_process(instance=instance, tags=RANGE)

    assert result.success
    assert len([run for run in instance.get_runs() if run.job_name == "enrich_shard"]) == 1  # both assets, one run
    per_shard = {key: len(read_manifest(LocalStorage(output), key)) for key in ("00", "01", "02", "03")}
    materialized = training_materializations(instance)
    assert set(materialized) == set(per_shard)  # an empty shard too
    for key, metadata in materialized.items():
        assert metadata["pairs"].value == per_shard[key] and metadata["left_out"].value == 0
        assert sum(metadata["splits"].value.values()) == per_shard[key]
        assert metadata["path"].value == str(output / "training" / "parquet" / f"partition={key}")  # pastes in a shell
    table = pads.dataset(output / "training" / "parquet", partitioning="hive").to_table()
    assert table.num_rows == 10
    assert len(list((output / "training" / "webdataset").glob("*.tar"))) == sum(1 for n in per_shard.values() if n)

    # nothing changed: the next run keeps every shard's pairs as they are
    assert defs.resolve_job_def("enrich_shard").execute_in_process(instance=instance, tags=RANGE).success
    assert all(metadata["reused"].value for metadata in training_materializations(instance).values())

    # a map lost since, then a rebuild (another setting): the pair is left out, and the partition says why
    manifest = read_manifest(LocalStorage(output), "01")
    LocalStorage(output).delete(normal_map_path(manifest["content_hash"].iloc[0]))
    defs = definitions(tmp_path / "in", output, emulator.url, webdataset=False)
    defs.resolve_job_def("enrich_shard").execute_in_process(instance=instance, partition_key="01")
    metadata = training_materializations(instance)["01"]
    assert metadata["left_out_by_reason"].value == {"map_missing": 1}
    assert metadata["pairs"].value == per_shard["01"] - 1


def test_same_partitions_and_backfill_policy_as_surface_normals_under_the_prefix():
    defs = normals_definitions(dataset="/d", output="/o", shards=100, shards_per_run=8, key_prefix="portraits")
    normals = defs.resolve_assets_def(AssetKey(["portraits", "surface_normals"]))
    pairs = defs.resolve_assets_def(AssetKey(["portraits", "training_pairs"]))
    assert pairs.partitions_def == normals.partitions_def
    assert pairs.backfill_policy == normals.backfill_policy and pairs.backfill_policy.max_partitions_per_run == 8
    assert pairs.group_names_by_key[pairs.key] == normals.group_names_by_key[normals.key]
    assert normals.key in pairs.asset_deps[pairs.key]
    columns = pairs.metadata_by_key[pairs.key]["dagster/column_schema"].columns  # shown before any run
    assert [column.name for column in columns] == SCHEMA.names and all(column.description for column in columns)
    job = defs.resolve_job_def("portraits__enrich_shard")
    assert job.asset_layer.selected_asset_keys >= {normals.key, pairs.key}


def test_training_pairs_can_be_left_out_and_bad_splits_are_refused():
    defs = normals_definitions(dataset="/d", output="/o", training_pairs=False)
    keys = {key.to_user_string() for key in defs.get_repository_def().asset_graph.get_all_asset_keys()}
    assert keys == {"image_inventory", "surface_normals"}
    with pytest.raises(ValueError, match="sum to 1"):
        normals_definitions(dataset="/d", output="/o", training_splits={"train": 0.9})


def test_the_quality_check_counts_maps_of_no_one_per_partition_and_only_warns(tmp_path, emulator):
    """Photos of no one come back as flat maps: left out of the pairs, counted by each shard's own check (a
    warning: the run goes on), with the thresholds and the person_fraction quantiles as metadata."""
    make_portraits(tmp_path / "in", 8)
    blanks = [f"blank_{index}.jpg" for index in range(3)]
    for index, name in enumerate(blanks):
        Image.new("RGB", (320, 240 + 8 * index), (100 + 30 * index, 140, 160)).save(tmp_path / "in" / name)
    expected = {key: 0 for key in ("00", "01", "02", "03")}
    for name in blanks:
        expected[partition_key(shard_of(name, SHARDS), SHARDS)] += 1
    defs = definitions(tmp_path / "in", tmp_path / "out", emulator.url)
    instance = DagsterInstance.ephemeral()
    defs.resolve_job_def("refresh_inventory").execute_in_process(instance=instance)

    result = defs.resolve_job_def("enrich_shard").execute_in_process(instance=instance, tags=RANGE)

    assert result.success
    quality = [e for e in result.get_asset_check_evaluations() if e.check_name == "normal_map_quality"]
    own = {e.partition: e for e in quality if e.partition}
    assert {key: e.metadata["no_person"].value for key, e in own.items()} == expected
    for key, evaluation in own.items():
        assert evaluation.passed == (expected[key] == 0) and evaluation.severity == AssetCheckSeverity.WARN
        assert evaluation.metadata["min_person_fraction"].value == 0.01
        assert evaluation.metadata["unit_norm_above_bound"].value == 0
        quantiles = evaluation.metadata["person_fraction_quantiles"].value
        assert not quantiles or 0.2 < quantiles["p00"] <= quantiles["p50"] <= quantiles["p100"] < 1
    [whole] = [e for e in quality if not e.partition]
    assert not whole.passed and "3 with no person" in whole.description
    materialized = training_materializations(instance)
    assert {key: m["left_out_by_reason"].value.get("no_person", 0) for key, m in materialized.items()} == expected
    paths = pads.dataset(tmp_path / "out" / "training" / "parquet", partitioning="hive").to_table()["path"]
    assert len(paths) == 8 and not set(paths.to_pylist()) & set(blanks)

    single = defs.resolve_job_def("enrich_shard").execute_in_process(instance=instance, partition_key="00")
    [check] = [e for e in single.get_asset_check_evaluations() if e.check_name == "normal_map_quality"]
    assert check.partition == "00" and check.metadata["no_person"].value == expected["00"]  # reused, same figures


def test_export_layouts_are_written_in_the_same_runs_and_kept_when_nothing_changed(tmp_path, emulator):
    make_portraits(tmp_path / "in", 6)
    Image.new("RGB", (320, 240), (120, 140, 160)).save(tmp_path / "in" / "blank.jpg")
    output = tmp_path / "out"
    defs = definitions(tmp_path / "in", output, emulator.url, export_layouts=["sapiens", "marigold"])
    instance = DagsterInstance.ephemeral()
    defs.resolve_job_def("refresh_inventory").execute_in_process(instance=instance)
    assert defs.resolve_job_def("enrich_shard").execute_in_process(instance=instance, tags=RANGE).success

    exported = {key: m["exported"].value for key, m in training_materializations(instance).items()}
    assert sum(shard["sapiens"]["samples"] for shard in exported.values()) == 6  # the photo of no one left out
    sapiens = output / "training" / "sapiens"
    assert len(list(sapiens.glob("*/normals/*.npy"))) == len(list(sapiens.glob("*/masks/*.png"))) == 6
    listed = [
        (output / "training" / "marigold" / f"{split}.txt").read_text() for split in ("train", "validation", "test")
    ]
    assert sum(text.count("\n") for text in listed) == 6
    files = {path: path.stat().st_mtime_ns for path in (output / "training").rglob("*") if path.is_file()}

    assert defs.resolve_job_def("enrich_shard").execute_in_process(instance=instance, tags=RANGE).success
    again = {key: m["exported"].value for key, m in training_materializations(instance).items()}
    assert all(shard[layout]["reused"] for shard in again.values() for layout in ("sapiens", "marigold"))
    assert {path: path.stat().st_mtime_ns for path in (output / "training").rglob("*") if path.is_file()} == files

    with pytest.raises(ValueError, match="unknown layout"):
        normals_definitions(dataset="/d", output="/o", export_layouts=["hypersim"])
