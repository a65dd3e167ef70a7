"""End to end through the Dagster definitions: a folder (or S3) of portraits against the emulator."""

import hashlib
import os
import shutil
from collections import Counter
from decimal import Decimal

import pyarrow.dataset as ds
import pytest
from dagster import DagsterInstance

from normals_pipeline.emulator import Faults
from normals_pipeline.orchestration import ClipdropResource, DatasetResource, S3Settings, build_definitions
from normals_pipeline.orchestration.runner import RunFailed, run_pipeline
from normals_pipeline.synthetic import make_portraits

SHARDS = 4


@pytest.fixture
def portraits(tmp_path):
    folder = tmp_path / "portraits"
    make_portraits(folder, 8)
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / ".hidden.jpg").write_bytes(b"hidden files are skipped")
    (folder / "notes.txt").write_text("not a candidate")
    first = sorted(p for p in folder.iterdir() if p.suffix == ".png")[0]
    shutil.copy(first, folder / "duplicate of first.png")  # same bytes: charged once
    return folder


def definitions(dataset, output, url, **clipdrop):
    resource = ClipdropResource(api_key="test-key", api_url=url, requests_per_minute=100_000, **clipdrop)
    return build_definitions(dataset_uri=str(dataset), output_uri=str(output), shards=SHARDS, clipdrop=resource)


def read_manifest(output):
    return ds.dataset(str(output / "manifest"), partitioning="hive").to_table().to_pandas()


def test_a_run_enriches_every_image_once_and_a_rerun_charges_nothing(portraits, tmp_path, emulator):
    output = tmp_path / "out"
    defs = definitions(portraits, output, emulator.url)
    instance = DagsterInstance.ephemeral()

    summary = run_pipeline(defs, SHARDS, instance)

    df = read_manifest(output)
    images = 10  # 8 portraits + broken + duplicate
    assert len(df) == images and df["path"].is_unique
    assert summary.images == images and summary.enriched == 9
    assert dict(summary.errors) == {"unreadable_image": 1}
    charged = Decimal(emulator.stats()["charged"])
    assert charged == 8  # the duplicate reuses its twin's map
    assert Decimal(str(df["credits_consumed"].sum())) == charged
    assert df.loc[df["error_code"].isna(), "normal_map_uri"].str.startswith("file://").all()
    assert not df["path"].str.contains("hidden").any()

    again = run_pipeline(defs, SHARDS, instance)
    assert Decimal(emulator.stats()["charged"]) == charged
    assert again.credits_consumed == 0 and again.requests == 0
    assert len(read_manifest(output)) == images


def test_new_images_are_picked_up_without_moving_old_ones(portraits, tmp_path, emulator):
    output = tmp_path / "out"
    defs = definitions(portraits, output, emulator.url)
    instance = DagsterInstance.ephemeral()
    run_pipeline(defs, SHARDS, instance)
    before = read_manifest(output).set_index("path")["partition"]

    make_portraits(portraits / "later", 3, seed=7)
    run_pipeline(defs, SHARDS, instance)

    after = read_manifest(output).set_index("path")["partition"]
    assert len(after) == len(before) + 3
    assert (after[before.index] == before).all()
    assert Decimal(emulator.stats()["charged"]) == 8 + 3


def test_materialization_metadata_and_check(portraits, tmp_path, emulator):
    output = tmp_path / "out"
    defs = definitions(portraits, output, emulator.url)
    instance = DagsterInstance.ephemeral()
    defs.resolve_job_def("refresh_inventory").execute_in_process(instance=instance)
    result = defs.resolve_job_def("enrich_shard").execute_in_process(partition_key="00", instance=instance)

    [materialization] = result.asset_materializations_for_node("surface_normals")
    metadata = materialization.metadata
    for key in (
        "images",
        "enriched",
        "errors_by_code",
        "credits_consumed",
        "remaining_credits",
        "images_per_second",
        "preview",
    ):
        assert key in metadata
    checks = {check.check_name: check for check in result.get_asset_check_evaluations()}
    assert set(checks) == {"manifest_schema", "normal_map_quality"}  # the manifest's and the pairs'
    assert all(check.passed for check in checks.values())


def test_out_of_credits_stops_the_run_and_keeps_what_is_done(portraits, tmp_path, emulator_factory):
    emulator = emulator_factory(faults=Faults(credits_after=3))
    output = tmp_path / "out"
    defs = definitions(portraits, output, emulator.url, concurrency=1)

    with pytest.raises(RunFailed, match="no credits left"):
        run_pipeline(defs, SHARDS, DagsterInstance.ephemeral())

    df = read_manifest(output)
    assert df["error_code"].isna().sum() >= 3
    assert Decimal(str(df["credits_consumed"].sum())) == Decimal(emulator.stats()["charged"])


def test_a_refused_key_fails_fast_with_a_clear_message(portraits, tmp_path, emulator):
    resource = ClipdropResource(api_key="sk-wrong-canary", api_url=emulator.url)
    defs = build_definitions(
        dataset_uri=str(portraits), output_uri=str(tmp_path / "o"), shards=SHARDS, clipdrop=resource
    )
    with pytest.raises(RunFailed) as raised:
        run_pipeline(defs, SHARDS, DagsterInstance.ephemeral())
    assert "refused the API key" in str(raised.value) and "canary" not in str(raised.value)
    assert emulator.stats()["requests"] == 1


def test_a_missing_dataset_is_one_clear_line(tmp_path, emulator):
    defs = definitions(tmp_path / "nope", tmp_path / "out", emulator.url)
    with pytest.raises(RunFailed) as raised:
        run_pipeline(defs, SHARDS, DagsterInstance.ephemeral())
    assert "nope" in str(raised.value) and not raised.value.started


def test_output_inside_the_dataset_is_refused(portraits, emulator):
    defs = definitions(portraits, portraits / "out", emulator.url)
    with pytest.raises(RunFailed, match="inside the dataset"):
        run_pipeline(defs, SHARDS, DagsterInstance.ephemeral())


def test_s3_dataset_to_s3_output(portraits, s3_client, s3_bucket, s3_endpoint, emulator):
    for path in portraits.rglob("*"):
        if path.is_file():
            s3_client.put_object(
                Bucket=s3_bucket, Key=f"in/{path.relative_to(portraits).as_posix()}", Body=path.read_bytes()
            )
    storage = DatasetResource(dataset_uri=f"s3://{s3_bucket}/in", output_uri=f"s3://{s3_bucket}/out")
    resource = ClipdropResource(api_key="test-key", api_url=emulator.url, requests_per_minute=100_000)
    defs = build_definitions(dataset_uri="", output_uri="", shards=SHARDS, clipdrop=resource, storage=storage)
    instance = DagsterInstance.ephemeral()

    summary = run_pipeline(defs, SHARDS, instance)

    assert summary.images == 10 and summary.enriched == 9
    import pyarrow.fs

    fs = pyarrow.fs.S3FileSystem(
        endpoint_override=s3_endpoint, access_key="testing", secret_key="testing", region="us-east-1"
    )
    df = ds.dataset(f"{s3_bucket}/out/manifest", filesystem=fs, partitioning="hive").to_table().to_pandas()
    assert len(df) == 10
    assert df.loc[df["error_code"].isna(), "normal_map_uri"].str.startswith(f"s3://{s3_bucket}/out/normals/").all()
    assert Decimal(str(df["credits_consumed"].sum())) == Decimal(emulator.stats()["charged"]) == 8

    run_pipeline(defs, SHARDS, instance)
    assert Decimal(emulator.stats()["charged"]) == 8


def test_a_run_on_s3_reads_each_new_image_once_and_sends_the_bytes_the_plan_hashed(
    portraits, s3_client, s3_bucket, s3_requests, emulator
):
    """The inventory's plan reads and hashes every pending image; the shards' run that follows in the process
    takes what it read instead of a second GET, and sends those very bytes (the emulator hashes what it got)."""
    from normals_pipeline.orchestration._metadata import PREVIEW_ROWS

    files = {path.relative_to(portraits).as_posix(): path.read_bytes() for path in portraits.rglob("*.*")}
    files = {name: data for name, data in files.items() if not name.startswith(".") and not name.endswith(".txt")}
    for name, data in files.items():
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=data)
    storage = DatasetResource(dataset_uri=f"s3://{s3_bucket}/in", output_uri=f"s3://{s3_bucket}/out")
    resource = ClipdropResource(api_key="test-key", api_url=emulator.url, requests_per_minute=100_000)
    defs = build_definitions(
        dataset_uri="", output_uri="", shards=1, clipdrop=resource, storage=storage, training_pairs=False
    )
    s3_requests.clear()

    summary = run_pipeline(defs, 1, DagsterInstance.ephemeral())

    reads = Counter(path for method, path in s3_requests if method == "GET" and path.startswith(f"/{s3_bucket}/in/"))
    assert set(reads) == {f"/{s3_bucket}/in/{name}" for name in files}
    assert sum(reads.values()) == len(files) + PREVIEW_ROWS  # the plan's, and the preview's thumbnails
    assert (summary.images, summary.enriched, dict(summary.errors)) == (10, 9, {"unreadable_image": 1})
    sent = {hashlib.sha256(data).hexdigest() for name, data in files.items() if name != "broken.jpg"}
    assert emulator.stats()["charged_by_content"] == dict.fromkeys(sent, 1)  # the duplicate charged once


def test_s3_keys_with_empty_or_dot_parts_are_counted_as_skipped_and_no_run_fails(
    portraits, s3_client, s3_bucket, emulator
):
    """'in//double.png' listed as '/double.png' failed the manifest's schema (every run on the prefix exited
    1), and dot-part keys vanished: now each is counted as skipped with its reason, as non-UTF-8 names are."""
    from dagster import AssetKey

    odd = {"in//double.png": "empty_part", "in/a//b.jpg": "empty_part", "in/./a.png": "dot_part"}
    odd |= {"in/x/../y.webp": "dot_part", "in/x/./../z.png": "dot_part", "in/./notes.txt": None}
    image = (portraits / "portrait_000.jpg").read_bytes()
    for key in [*odd, "in/portrait_000.jpg", "in/x/.hidden/../h.png"]:  # a hidden part: neither read nor counted
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=image)
    storage = DatasetResource(dataset_uri=f"s3://{s3_bucket}/in", output_uri=f"s3://{s3_bucket}/out")
    resource = ClipdropResource(api_key="test-key", api_url=emulator.url, requests_per_minute=100_000)
    defs = build_definitions(dataset_uri="", output_uri="", shards=SHARDS, clipdrop=resource, storage=storage)
    instance = DagsterInstance.ephemeral()

    for _ in range(2):  # a re-run too
        summary = run_pipeline(defs, SHARDS, instance)
        assert (summary.images, summary.enriched) == (1, 1)
    assert emulator.stats()["charged_by_content"] == {hashlib.sha256(image).hexdigest(): 1}
    [record, *_] = instance.fetch_materializations(AssetKey("image_inventory"), limit=1).records
    skipped = record.asset_materialization.metadata["skipped_by_reason"].value
    assert skipped == {"empty_part": 2, "dot_part": 3}


def test_a_state_file_set_aside_is_a_warning_in_the_run_log(portraits, tmp_path, emulator):
    """A UI or daemon run has no console: the step that had to set a state file aside says so in its log."""
    import logging
    import os
    from pathlib import Path

    from normals_pipeline.guards import key_fingerprint

    state = Path(os.environ["NORMALS_STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    (state / f"{key_fingerprint('test-key')}.state.sqlite").write_bytes(b"not a database " * 100)
    instance = DagsterInstance.ephemeral()

    summary = run_pipeline(definitions(portraits, tmp_path / "out", emulator.url), SHARDS, instance)

    assert summary.enriched == 9
    logged = [
        entry.user_message
        for run in instance.get_runs()
        for entry in instance.all_logs(run.run_id)
        if entry.level == logging.WARNING and "state file" in entry.user_message
    ]
    assert len(logged) == 1 and "state.sqlite could not be read" in logged[0]
    assert "quarantine" in logged[0] and "balance is unknown" in logged[0]


def test_a_fifo_swapped_in_during_a_run_gets_an_error_row_and_does_not_hang(tmp_path, emulator):
    import os

    from normals_pipeline import LocalStorage
    from normals_pipeline.enrich import current_items
    from normals_pipeline.inventory import take_inventory

    make_portraits(tmp_path / "in", 6)
    dataset, output = LocalStorage(tmp_path / "in"), LocalStorage(tmp_path / "out")
    items = current_items(dataset, take_inventory(dataset, 1))  # listed and stat'ed: then the swap
    victim = tmp_path / "in" / items[0].path
    victim.unlink()
    os.mkfifo(victim)
    result = _enrich_unblocking(emulator.url, dataset, output, items, [victim])
    rows = result.manifest.set_index("path")
    assert rows.loc[items[0].path, "error_code"] == "unreadable_file"
    assert "FIFO" in rows.loc[items[0].path, "error_message"]
    assert result.enriched == 5 and result.stopped is None


def _enrich_unblocking(url, dataset, output, items, fifos):
    """One shard enriched on a thread: a regression would block in a FIFO's open(), so a writer unblocks each
    FIFO if the shard is not done within a minute, and the suite can end."""
    from concurrent.futures import ThreadPoolExecutor

    from normals_pipeline import ClipdropClient, RateGuard
    from normals_pipeline.enrich import enrich_shard

    with ClipdropClient("test-key", base_url=url, rate_guard=RateGuard(100_000)) as client:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(enrich_shard, dataset, output, client, "00", items)
            try:
                return future.result(timeout=60)
            finally:
                for fifo in fifos if not future.done() else []:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def _swap(folder, victims):
    """Each victim swapped for what the test names: a FIFO, or a link inside, out, to nowhere, in a loop,
    to a directory, to a FIFO. Returns the FIFOs (to open their other end if a read blocks)."""
    import os

    (folder / "a dir").mkdir()
    os.mkfifo(folder / "a fifo.jpg.tmp")
    (folder.parent / "secret.png").write_bytes(b"outside")
    fifos = [folder / "a fifo.jpg.tmp"]
    for path, kind in victims.items():
        victim = folder / path
        victim.unlink()
        if kind == "fifo":
            os.mkfifo(victim)
            fifos.append(victim)
        else:
            target = {"inside": folder / "more" / "portrait_000.jpg", "outside": folder.parent / "secret.png"}
            target |= {"dangling": folder / "missing.png", "loop": victim, "directory": folder / "a dir"}
            victim.symlink_to(target.get(kind, folder / "a fifo.jpg.tmp"))
    return fifos


@pytest.mark.parametrize("when", ["after the listing", "after the stat"])
def test_files_swapped_for_links_or_fifos_get_a_row_each_and_are_counted(tmp_path, emulator, when):
    """A swap after the listing (before the shard stats the files) or after the stat (before the read):
    every name still there gets a row, `unreadable_file` unless it leads to a regular file inside the folder
    (read as the listing would have: here a copy of another image, so it reuses that one's map)."""

    from normals_pipeline import LocalStorage
    from normals_pipeline.enrich import current_items
    from normals_pipeline.inventory import take_inventory

    folder = tmp_path / "in"
    make_portraits(folder, 8)
    make_portraits(folder / "more", 1, seed=5)
    dataset, output = LocalStorage(folder), LocalStorage(tmp_path / "out")
    inventory = take_inventory(dataset, 1)
    kinds = ["fifo", "inside", "outside", "dangling", "loop", "directory", "to a fifo"]
    victims = dict(zip(sorted(p for p in inventory["path"].to_pylist() if "/" not in p), kinds))
    items = None if when == "after the listing" else current_items(dataset, inventory)
    fifos = _swap(folder, victims)
    items = items or current_items(dataset, inventory)
    result = _enrich_unblocking(emulator.url, dataset, output, items, fifos)

    rows = result.manifest.set_index("path")
    assert len(rows) == 9 and result.stopped is None  # 7 victims, nested/portrait_001.png, more/portrait_000.jpg
    for path, kind in victims.items():
        assert rows.loc[path, "error_code"] == (None if kind == "inside" else "unreadable_file"), (path, kind)
    assert result.errors == {"unreadable_file": 6} and result.enriched == 3
    stats = emulator.stats()
    assert stats["charged_twice"] == 0 and len(stats["charged_by_content"]) == 2  # the link reuses its target's map


def _materializations(instance):
    from dagster import AssetKey

    records = instance.fetch_materializations(AssetKey("surface_normals"), limit=1000).records
    return {record.asset_materialization.partition: record.asset_materialization.metadata for record in records}


def test_a_range_run_is_one_stream_with_a_manifest_and_a_materialization_per_shard(portraits, tmp_path, emulator):
    output = tmp_path / "out"
    defs = definitions(portraits, output, emulator.url)
    instance = DagsterInstance.ephemeral()

    summary = run_pipeline(defs, SHARDS, instance)  # one run over the 4 shards

    runs = instance.get_runs()
    assert len([run for run in runs if run.job_name == "enrich_shard"]) == 1
    per_shard = read_manifest(output).groupby("partition", observed=True).size()
    materialized = _materializations(instance)
    assert set(materialized) == {f"{shard:02d}" for shard in range(SHARDS)}  # an empty shard too
    for key, metadata in materialized.items():  # each partition its own figures, not the run's
        assert metadata["images"].value == per_shard.get(int(key), 0)
        assert metadata["manifest"].value.endswith(f"/partition={key}/manifest.parquet")  # a path, not a URI
    assert summary.images == 10 and Decimal(emulator.stats()["charged"]) == 8


def test_a_stop_mid_range_keeps_every_finished_row_and_materializes_only_finished_shards(
    portraits, tmp_path, emulator_factory
):
    make_portraits(portraits / "more", 30, seed=11)
    emulator = emulator_factory(faults=Faults(credits_after=12))
    output = tmp_path / "out"
    defs = definitions(portraits, output, emulator.url, concurrency=2)
    instance = DagsterInstance.ephemeral()

    with pytest.raises(RunFailed, match="no credits left"):
        run_pipeline(defs, SHARDS, instance)

    df = read_manifest(output)
    assert df["error_code"].isna().sum() >= 12 and df["path"].is_unique
    assert Decimal(str(df["credits_consumed"].sum())) == Decimal(emulator.stats()["charged"])
    finished = _materializations(instance)
    assert len(finished) < SHARDS  # the stopped shards failed; finished ones (if any) are materialized
    for key in finished:
        assert (df[df["partition"] == int(key)]["error_code"] != "out_of_credits").all()


def test_a_backfill_puts_16_shards_in_a_run():
    defs = build_definitions(dataset_uri="/d", output_uri="/o", shards=100)
    policy = defs.resolve_assets_def("surface_normals").backfill_policy
    assert policy.max_partitions_per_run == 16


def test_a_range_run_ties_a_check_evaluation_to_every_partition(portraits, tmp_path, emulator):
    defs = definitions(portraits, tmp_path / "out", emulator.url)
    instance = DagsterInstance.ephemeral()
    defs.resolve_job_def("refresh_inventory").execute_in_process(instance=instance)
    tags = {"dagster/asset_partition_range_start": "00", "dagster/asset_partition_range_end": "03"}
    result = defs.resolve_job_def("enrich_shard").execute_in_process(instance=instance, tags=tags)

    evaluations = result.get_asset_check_evaluations()
    tied = {evaluation.partition for evaluation in evaluations if evaluation.partition}
    assert tied == {"00", "01", "02", "03"} and all(evaluation.passed for evaluation in evaluations)
    wholes = {evaluation.check_name: evaluation for evaluation in evaluations if not evaluation.partition}
    assert set(wholes) == {"manifest_schema", "normal_map_quality"}  # one each: the manifest's and the pairs'
    for whole in wholes.values():
        assert whole.metadata["shards"].value == "00, 01, 02, 03"  # the range's own result names its shards


def test_the_dataset_resources_s3_settings_reach_its_client(s3_endpoint, s3_client, s3_bucket, monkeypatch):
    """`DatasetResource.s3` takes dagster-aws's `S3Resource` settings; given, they win over the environment."""
    s3_client.put_object(Bucket=s3_bucket, Key="in/a.jpg", Body=b"x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the environment's endpoint: nothing listens
    resource = DatasetResource(
        dataset_uri=f"s3://{s3_bucket}/in",
        output_uri=f"s3://{s3_bucket}/out",
        s3=S3Settings(endpoint_url=s3_endpoint, region_name="eu-west-3", max_attempts=2),
    )
    assert resource.dataset().listing().paths == ["a.jpg"]
    client = resource.s3.get_client()
    assert client.meta.region_name == "eu-west-3"
    assert client.meta.config.retries == {"total_max_attempts": 2, "mode": "standard"}  # the first included
