"""`normals-pipeline plan` and the plan on the inventory's materialization: what the next run would send and
charge, found with no request and nothing written, checked against what that run then does (emulator on
loopback)."""

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pyarrow.dataset as ds
import pytest
from _emulator_fixtures import TEST_KEY
from dagster import DagsterInstance

from normals_pipeline import manifest
from normals_pipeline._state import SQLiteClaims, default_state_dir
from normals_pipeline.cli import main
from normals_pipeline.enrich import claim_namespace
from normals_pipeline.inventory import partition_key, shard_of
from normals_pipeline.orchestration import ClipdropResource, build_definitions
from normals_pipeline.orchestration.runner import run_pipeline
from normals_pipeline.plan import json_number, make_plan
from normals_pipeline.storage import LocalStorage
from normals_pipeline.synthetic import make_portraits

SHARDS = 4
KEYS = {
    "images",
    "done",
    "to_send",
    "duplicates",
    "refused",
    "credits_needed",
    "balance",
    "balance_age_seconds",
    "eta_seconds",
}
LOCAL_CODES = {"empty_file", "unreadable_image", "truncated_image"}


def run(dataset: Path | str, output: Path | str, url: str) -> int:
    common = ["--rpm", "100000", "--shards", str(SHARDS), "--no-training-pairs"]
    return main(["run", "--dataset", str(dataset), "--output", str(output), "--api-url", url, *common])


def plan(dataset: Path | str, output: Path | str, *extra: str) -> int:
    return main(["plan", "--dataset", str(dataset), "--output", str(output), "--shards", str(SHARDS), *extra])


def planned(capsys, dataset: Path | str, output: Path | str, *extra: str) -> tuple[int, dict, str]:
    """Exit code, the one JSON object printed, and stderr."""
    code = plan(dataset, output, "--json", *extra)
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 1, out
    return code, json.loads(out), err


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` with its size and mtime: a write of any kind changes it."""
    return {
        str(path.relative_to(folder)): (path.lstat().st_size, path.lstat().st_mtime_ns) for path in folder.rglob("*")
    }


def manifest_rows(output: Path):
    return ds.dataset(str(output / "manifest"), partitioning="hive").to_table().to_pandas()


def traffic(emulator) -> tuple[int, str]:
    """Requests and credits charged, as the emulator's own counters say."""
    stats = httpx.get(f"{emulator.url}/_emulator/stats").json()
    return stats["requests"], stats["charged"]


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("CLIPDROP_API_KEY", TEST_KEY)


@pytest.fixture
def enriched_then_grown(tmp_path, emulator, key, capsys):
    """Six portraits enriched once, then: a copy of a done one, three new ones and a twin of one of them, and
    three files the local checks refuse (empty, not an image, a JPEG cut short)."""
    dataset, output = tmp_path / "in put", tmp_path / "out"
    first = make_portraits(dataset, 6)
    assert run(dataset, output, emulator.url) == 0
    shutil.copy(first[3], dataset / "copy of done.jpg")
    new = make_portraits(dataset / "new", 3, seed=5)
    shutil.copy(new[0], dataset / "new" / "twin.jpg")
    (dataset / "empty.png").write_bytes(b"")
    (dataset / "notes.png").write_text("not an image")
    jpeg = first[0].read_bytes()
    (dataset / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    capsys.readouterr()
    return dataset, output


def test_the_plan_is_what_the_next_run_sends_and_charges(enriched_then_grown, emulator, capsys):
    dataset, output = enriched_then_grown
    before, sent = listing(output), traffic(emulator)

    code, figures, _ = planned(capsys, dataset, output)

    assert code == 0
    assert traffic(emulator) == sent and listing(output) == before  # no request, nothing written
    expected = {"images": 14, "done": 6, "to_send": 3, "duplicates": 2, "refused": 3, "credits_needed": 3}
    assert {name: figures[name] for name in expected} == expected
    for name in ("images", "done", "to_send", "duplicates", "refused"):
        assert sum(shard[name] for shard in figures["shards"]) == figures[name]

    started = manifest_rows(output)["processed_at"].max()
    assert run(dataset, output, emulator.url) == 0
    requests, charged = traffic(emulator)
    assert requests - sent[0] == figures["to_send"] == Decimal(charged) - Decimal(sent[1])
    rows = manifest_rows(output)
    new = rows[rows["processed_at"] > started]
    assert len(rows) - len(new) == figures["done"]
    refused = new[new["error_code"].isin(LOCAL_CODES)]
    assert len(refused) == figures["refused"] and refused["http_status"].isna().all()  # error rows, no request
    succeeded = new[new["error_code"].isna()]
    assert (succeeded["credits_consumed"] == 0).sum() == figures["duplicates"]
    assert (succeeded["credits_consumed"] == 1).sum() == figures["to_send"]


def test_json_is_one_object_and_the_budget_decides_the_exit_code(tmp_path, emulator, monkeypatch, capsys):
    monkeypatch.delenv("CLIPDROP_API_KEY", raising=False)  # no key: fine for a plan, the balance is unknown
    make_portraits(tmp_path / "in", 5)

    code, figures, err = planned(capsys, tmp_path / "in", tmp_path / "out")

    assert code == 0 and err == ""
    assert set(figures) == KEYS | {"shards", "warnings", "shortfall"}
    assert figures["to_send"] == figures["credits_needed"] == 5 and figures["balance"] is None
    assert figures["shortfall"] is None
    assert figures["eta_seconds"] > 0
    assert figures["shards"] and all(set(shard) == KEYS | {"shard"} for shard in figures["shards"])
    assert planned(capsys, tmp_path / "in", tmp_path / "out", "--budget", "5")[0] == 0

    code, over, err = planned(capsys, tmp_path / "in", tmp_path / "out", "--budget", "4.5")
    assert code == 1
    [line] = err.strip().splitlines()
    assert line == f"normals-pipeline: {over['shortfall']}"  # the same reason in the JSON
    assert line.startswith("normals-pipeline: ") and "needs 5 credits" in line and "budget of 4.5" in line
    assert not (tmp_path / "out").exists() and emulator.stats()["requests"] == 0


def test_the_keys_last_known_balance_less_the_floor_must_cover_the_plan(tmp_path, emulator, key, capsys):
    dataset, output = tmp_path / "in", tmp_path / "out"
    make_portraits(dataset, 4)
    assert run(dataset, output, emulator.url) == 0
    make_portraits(dataset / "new", 3, seed=9)
    capsys.readouterr()

    code, figures, _ = planned(capsys, dataset, output)
    assert code == 0 and figures["balance"] == 996 and 0 <= figures["balance_age_seconds"] < 60
    assert planned(capsys, dataset, output, "--credit-floor", "993")[0] == 0  # 996 - 993 = 3 = needed
    code, _, err = planned(capsys, dataset, output, "--credit-floor", "994")
    assert code == 1
    assert "balance of 996" in err and "credit floor of 994" in err and len(err.strip().splitlines()) == 1


def test_the_text_has_plain_numbers_and_paths_to_paste(tmp_path, emulator_factory, key, capsys):
    emulator = emulator_factory(keys={TEST_KEY: Decimal(2_000_000)})
    dataset, output = tmp_path / "my portraits", tmp_path / "out"
    make_portraits(dataset, 3)
    assert run(dataset, output, emulator.url) == 0
    (dataset / "empty.png").write_bytes(b"")
    capsys.readouterr()

    assert plan(dataset, output) == 0

    out = capsys.readouterr().out
    assert f"'{dataset}'" in out  # quoted: the space would split it
    assert "1999997 credits" in out and "e+" not in out
    total = next(line for line in out.splitlines() if line.strip().startswith("total"))
    assert total.split()[1:] == ["4", "3", "0", "0", "1", "0", "0.0"]
    assert json.dumps(json_number(Decimal("1000000"))) == "1000000"


def test_an_unreadable_manifest_is_left_in_place_and_its_images_count_as_not_done(tmp_path, emulator, key, capsys):
    dataset, output = tmp_path / "in", tmp_path / "out"
    make_portraits(dataset, 8)
    assert run(dataset, output, emulator.url) == 0
    key_of_shard = manifest.manifest_keys(LocalStorage(output))[0]
    broken = output / manifest.partition_path(key_of_shard)
    lost = len(manifest.read_manifest(LocalStorage(output), key_of_shard))
    broken.write_bytes(broken.read_bytes()[:40])
    before, sent = listing(output), traffic(emulator)
    capsys.readouterr()

    code, figures, _ = planned(capsys, dataset, output)

    assert code == 0 and listing(output) == before and traffic(emulator) == sent
    [warning] = figures["warnings"]
    assert LocalStorage(output).uri_for(manifest.partition_path(key_of_shard)) in warning and "left in place" in warning
    [shard] = [shard for shard in figures["shards"] if shard["shard"] == key_of_shard]
    assert shard["done"] == 0 and shard["duplicates"] == lost and shard["to_send"] == 0  # their maps are stored
    assert run(dataset, output, emulator.url) == 0
    assert traffic(emulator)[1] == sent[1]  # the run reused the maps, as planned


def test_rows_a_killed_run_left_in_the_journal_count_as_done(tmp_path, emulator, key, capsys):
    dataset, output = tmp_path / "in", tmp_path / "out"
    make_portraits(dataset, 6)
    assert run(dataset, output, emulator.url) == 0
    storage = LocalStorage(output)
    for shard in manifest.manifest_keys(storage):  # as if killed before writing its manifests: rows journaled only
        journal = manifest.Journal(storage, shard)
        rows = json.loads(manifest.read_manifest(storage, shard).to_json(orient="records", date_format="iso"))
        for row in rows:
            journal.write({**row, "processed_at": datetime.fromisoformat(row["processed_at"])})
        (output / manifest.partition_path(shard)).unlink()
    before, sent = listing(output), traffic(emulator)
    capsys.readouterr()

    code, figures, _ = planned(capsys, dataset, output)

    assert code == 0 and listing(output) == before and traffic(emulator) == sent
    assert (figures["done"], figures["to_send"], figures["duplicates"]) == (6, 0, 0)


def test_what_another_run_holds_is_not_counted_to_send(tmp_path, emulator, key, capsys):
    dataset, output = tmp_path / "in", tmp_path / "out"
    [held, *_] = make_portraits(dataset, 3)
    claims, namespace = SQLiteClaims(default_state_dir()), claim_namespace(LocalStorage(output))

    claims.claim(f"{namespace}:{hashlib.sha256(held.read_bytes()).hexdigest()}", "another run", 60)
    shard = partition_key(shard_of(held.relative_to(dataset).as_posix(), SHARDS), SHARDS)
    claims.claim(f"{namespace}:shard-{shard}", "another run", 60)

    code, figures, _ = planned(capsys, dataset, output)

    assert code == 0 and figures["to_send"] == 2 and figures["duplicates"] == 1
    assert figures["warnings"] == [
        f"shard {shard} is being enriched by another run now: its figures drop as it finishes"
    ]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--dataset", "/nonexistent/portraits"], "dataset not found"),
        (["--rpm", "0"], "argument --rpm: must be at least 1"),
        (["--shards", "3"], "was enriched with 4 shards, not 3"),
    ],
)
def test_what_cannot_start_is_one_line_and_exit_2(tmp_path, emulator, key, capsys, args, says):
    dataset, output = tmp_path / "in", tmp_path / "out"
    make_portraits(dataset, 2)
    assert run(dataset, output, emulator.url) == 0
    before = listing(output)
    capsys.readouterr()
    base = {"--dataset": str(dataset), "--output": str(output), "--shards": str(SHARDS)}
    base.update(zip(args[::2], args[1::2]))

    assert main(["plan", *[part for pair in base.items() for part in pair]]) == 2

    out, err = capsys.readouterr()
    [line] = err.strip().splitlines()
    assert line.startswith("normals-pipeline: ") and says in line and out == ""
    assert listing(output) == before


def test_the_inventory_materialization_carries_the_plan(tmp_path, emulator):
    dataset, output = tmp_path / "in", tmp_path / "out"
    make_portraits(dataset, 6)
    shutil.copy(next(dataset.glob("*.jpg")), dataset / "twin.jpg")
    (dataset / "broken.jpg").write_bytes(b"not a jpeg at all")
    clipdrop = ClipdropResource(api_key=TEST_KEY, api_url=emulator.url, requests_per_minute=100_000)
    defs = build_definitions(dataset_uri=str(dataset), output_uri=str(output), shards=SHARDS, clipdrop=clipdrop)
    instance = DagsterInstance.ephemeral()

    metadata = inventory_metadata(defs, instance)

    assert emulator.stats()["requests"] == 0
    assert {name: metadata[name] for name in ("to_send", "credits_needed", "duplicates", "refused", "done")} == {
        "to_send": 6,
        "credits_needed": 6,
        "duplicates": 1,
        "refused": 1,
        "done": 0,
    }
    assert metadata["eta_seconds"] > 0 and "balance" not in metadata  # the key has answered nothing yet
    table = metadata["plan_by_shard"]
    assert sum(row.data["to_send"] for row in table.records) == 6
    assert sum(row.data["images"] for row in table.records) == 8 == metadata["images"]
    assert [column.type for column in table.schema.columns][1:] == ["int"] * 6 + ["float"]

    run_pipeline(defs, SHARDS, instance)
    again = inventory_metadata(defs, instance)
    assert again["to_send"] == 0 and again["done"] == 8 and again["balance"] == 1000 - 6


def inventory_metadata(defs, instance) -> dict:
    result = defs.resolve_job_def("refresh_inventory").execute_in_process(instance=instance)
    [materialization] = result.asset_materializations_for_node("image_inventory")
    return {name: getattr(value, "value", value) for name, value in materialization.metadata.items()}


def test_the_key_is_in_no_line_or_file_of_the_plan(tmp_path, monkeypatch, capsys):
    canary = f"sk-canary-{uuid.uuid4().hex}"
    monkeypatch.setenv("CLIPDROP_API_KEY", canary)
    make_portraits(tmp_path / "in", 3)

    assert plan(tmp_path / "in", tmp_path / "out") == 0
    assert plan(tmp_path / "in", tmp_path / "out", "--json") == 0

    out, err = capsys.readouterr()
    assert canary not in out + err
    state = default_state_dir()
    assert not [path for path in state.rglob("*") if path.is_file() and canary.encode() in path.read_bytes()]


def test_on_s3_the_plan_writes_no_object_and_matches_the_run(tmp_path, s3_client, s3_bucket, emulator, key, capsys):
    make_portraits(tmp_path / "in", 5)
    shutil.copy(tmp_path / "in" / "portrait_000.jpg", tmp_path / "in" / "twin.jpg")
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    for path in (tmp_path / "in").rglob("*"):
        if path.is_file():
            s3_client.put_object(
                Bucket=s3_bucket, Key=f"in/{path.relative_to(tmp_path / 'in').as_posix()}", Body=path.read_bytes()
            )
    dataset, output = f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out"

    def objects() -> dict[str, tuple[str, object]]:
        listed = s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])
        return {entry["Key"]: (entry["ETag"], entry["LastModified"]) for entry in listed}

    before = objects()
    code, figures, _ = planned(capsys, dataset, output)

    assert code == 0 and objects() == before and emulator.stats()["requests"] == 0
    assert (figures["to_send"], figures["duplicates"], figures["refused"]) == (5, 1, 1)
    assert run(dataset, output, emulator.url) == 0
    assert Decimal(emulator.stats()["charged"]) == figures["to_send"]


def test_the_plan_command_runs_on_the_core_alone(tmp_path):
    """Orchestrator-free: planning loads no Dagster, so it starts quickly."""
    make_portraits(tmp_path / "in", 2)
    code = (
        "import sys; from normals_pipeline.cli import main; "
        f"code = main(['plan', '--dataset', {str(tmp_path / 'in')!r}, '--output', {str(tmp_path / 'out')!r}]); "
        "assert code == 0 and not [m for m in sys.modules if m.startswith('dagster')], 'the plan loaded dagster'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)


def test_every_shard_is_listed_an_empty_one_at_0_images(tmp_path, capsys):
    """`shards` has one object per shard, so an empty shard says 0 images instead of being left out."""
    make_portraits(tmp_path / "in", 1)
    code, figures, _ = planned(capsys, tmp_path / "in", tmp_path / "out")
    assert code == 0
    assert [shard["shard"] for shard in figures["shards"]] == [partition_key(n, SHARDS) for n in range(SHARDS)]
    assert sorted(shard["images"] for shard in figures["shards"]) == [0] * (SHARDS - 1) + [1]


def test_taking_the_inventory_needs_no_key_and_then_the_balance_is_unknown(tmp_path, monkeypatch):
    """The key is read when a shard runs; the inventory's plan only reads the balance, if the variable is set."""
    monkeypatch.delenv("CLIPDROP_API_KEY", raising=False)
    make_portraits(tmp_path / "in", 3)
    defs = build_definitions(dataset_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), shards=SHARDS)
    metadata = inventory_metadata(defs, DagsterInstance.ephemeral())
    assert metadata["to_send"] == 3 and "balance" not in metadata


class _Remote:
    """A folder read as a remote store is (not a `LocalStorage`), noting how many reads are under way at most."""

    def __init__(self, root: Path) -> None:
        self._folder = LocalStorage(root)
        self._lock = threading.Lock()
        self.reading = self.most = self.bytes = self.most_bytes = 0

    def __getattr__(self, name: str):
        return getattr(self._folder, name)

    def read_bytes(self, path: str) -> bytes:
        size = self._folder.stat(path).size
        with self._lock:
            self.reading, self.bytes = self.reading + 1, self.bytes + size
            self.most, self.most_bytes = max(self.most, self.reading), max(self.most_bytes, self.bytes)
        time.sleep(0.02)  # a GET's wait
        with self._lock:
            self.reading, self.bytes = self.reading - 1, self.bytes - size
        return self._folder.read_bytes(path)


def test_the_plan_reads_a_remote_dataset_many_at_once_within_a_byte_budget(tmp_path, monkeypatch):
    """On S3 each read is mostly a wait: more readers than on disk, but never more bytes at once than READ_BYTES."""
    import normals_pipeline.plan as plan_module

    make_portraits(tmp_path / "in", 48)
    dataset = _Remote(tmp_path / "in")
    planned_ = make_plan(dataset, LocalStorage(tmp_path / "out"), 1, rpm=60)
    assert planned_.total.to_send == 48
    assert plan_module.READERS < dataset.most <= plan_module.REMOTE_READERS

    largest = max(entry.stat().st_size for entry in (tmp_path / "in").iterdir())
    monkeypatch.setattr(plan_module, "READ_BYTES", 2 * largest)  # two of the largest files at once
    dataset = _Remote(tmp_path / "in")
    assert make_plan(dataset, LocalStorage(tmp_path / "out"), 1, rpm=60).total.to_send == 48
    assert 2 <= dataset.most < plan_module.REMOTE_READERS and dataset.most_bytes <= 2 * largest
