"""The factory: several datasets in one code location, and an asset of the user's downstream of one."""

from decimal import Decimal
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, Definitions, EnvVar, asset, materialize

from normals_pipeline import open_storage, read_manifests
from normals_pipeline.orchestration import merge_normals_definitions, normals_definitions
from normals_pipeline.synthetic import make_portraits


def two_datasets(tmp_path, url, **settings):
    for name in ("a", "b"):
        make_portraits(tmp_path / f"in_{name}", 5, seed=ord(name))
    return Definitions.merge(
        *(
            normals_definitions(
                dataset=str(tmp_path / f"in_{name}"),
                output=str(tmp_path / f"out_{name}"),
                shards=4,
                api_key=EnvVar("CLIPDROP_API_KEY"),
                api_url=url,
                key_prefix=["photos", name],
                **settings,
            )
            for name in ("a", "b")
        )
    )


def test_two_datasets_merge_into_one_code_location_under_their_prefixes(tmp_path):
    defs = two_datasets(tmp_path, "http://127.0.0.1:9")
    repository = defs.get_repository_def()
    keys = {key.to_user_string() for key in repository.asset_graph.get_all_asset_keys()}
    assert keys == {f"photos/{n}/{a}" for n in "ab" for a in ("image_inventory", "surface_normals", "training_pairs")}
    assert {job.name for job in repository.get_all_jobs()} >= {
        "photos_a__refresh_inventory",
        "photos_a__enrich_shard",
        "photos_b__refresh_inventory",
        "photos_b__enrich_shard",
    }
    assert {s.name for s in repository.sensor_defs} == {"photos_a__new_images_sensor", "photos_b__new_images_sensor"}
    assert {s.name for s in repository.schedule_defs} == {
        "photos_a__daily_inventory_schedule",
        "photos_b__daily_inventory_schedule",
    }
    pools = {defs.resolve_assets_def(AssetKey(["photos", n, "surface_normals"])).op.pool for n in "ab"}
    assert pools == {"clipdrop"}  # one key, one pool


def test_pools_follow_the_key_and_never_name_it():
    other = normals_definitions(dataset="/d", output="/o", api_key=EnvVar("TEAM_B_KEY"), key_prefix="b")
    literal = normals_definitions(dataset="/d", output="/o", api_key="sk-canary-123", key_prefix="c")
    assert other.resolve_assets_def(AssetKey(["b", "surface_normals"])).op.pool == "clipdrop_team_b_key"
    pool = literal.resolve_assets_def(AssetKey(["c", "surface_normals"])).op.pool
    assert pool.startswith("clipdrop_") and "canary" not in pool


@pytest.mark.parametrize("prefix", ["a/b", "", "x y"])
def test_a_bad_prefix_is_refused(prefix):
    with pytest.raises(ValueError, match="key_prefix"):
        normals_definitions(dataset="/d", output="/o", key_prefix=prefix)


def test_a_downstream_asset_reads_the_manifest_through_the_public_api(tmp_path, emulator, monkeypatch):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    defs = two_datasets(tmp_path, emulator.url, requests_per_minute=100_000)
    instance = DagsterInstance.ephemeral()
    defs.resolve_job_def("photos_a__refresh_inventory").execute_in_process(instance=instance)
    defs.resolve_job_def("photos_a__enrich_shard").execute_in_process(
        instance=instance, tags={"dagster/asset_partition_range_start": "00", "dagster/asset_partition_range_end": "03"}
    )

    @asset(deps=[AssetKey(["photos", "a", "surface_normals"])])
    def enriched_count() -> int:
        """The user's own asset: it reads the manifest with `normals_pipeline.read_manifests`."""
        rows = read_manifests(open_storage(str(tmp_path / "out_a")))
        return int(rows["error_code"].isna().sum())

    result = materialize([enriched_count], instance=instance)
    assert result.output_for_node("enriched_count") == 5
    assert Decimal(emulator.stats()["charged"]) == 5
    assert read_manifests(open_storage(str(tmp_path / "nothing"))).empty


def test_owners_and_code_references_on_every_asset():
    owners = ["team:vision", "ml-ops@example.com"]
    for automation in ("none", "eager"):
        defs = normals_definitions(dataset="/d", output="/o", key_prefix="p", owners=owners, automation=automation)
        specs = list(defs.resolve_all_asset_specs())
        assert len(specs) == (3 if automation == "none" else 5)  # + the observed dataset and its shards
        for spec in specs:
            assert spec.owners == owners
            [reference] = spec.metadata["dagster/code_references"].code_references
            assert Path(reference.file_path).is_file() and reference.line_number > 0
            assert "normals_pipeline/orchestration/" in reference.file_path
    unowned = normals_definitions(dataset="/d", output="/o")
    assert all(spec.owners == [] for spec in unowned.resolve_all_asset_specs())


def test_merging_two_datasets_on_one_output_is_refused_naming_both(tmp_path):
    one = normals_definitions(dataset="/d1", output=str(tmp_path / "out"), key_prefix=["photos", "a"])
    other = normals_definitions(dataset="/d2", output=f"file://{tmp_path}/x/../out/", key_prefix="b")
    with pytest.raises(ValueError, match=r"^the instances photos_a and b share the output .*/out: give each its own"):
        merge_normals_definitions(one, other)
    third = normals_definitions(dataset="/d3", output=str(tmp_path / "out3"), key_prefix="c")
    merged = merge_normals_definitions(one, third)
    assert {"photos_a__storage", "c__storage"} <= set(merged.resources)
