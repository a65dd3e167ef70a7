"""Paid answers whose map cannot be stored: a full disk and a read-only `normals/`, on real file systems
(a tmpfs mounted for the test; skipped where mounting is not permitted). The maps wait in this host's spool
and the next run stores them without a request: every content is charged once."""

import json
import subprocess
from decimal import Decimal
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from normals_pipeline.cli import main
from normals_pipeline.manifest import spool_for
from normals_pipeline.storage import LocalStorage
from normals_pipeline.synthetic import make_portraits


def _mount(target: Path, options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def mounts():
    mounted: list[Path] = []

    def mount(target: Path, options: str) -> Path:
        _mount(target, options)
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


def run(dataset: Path, output: Path, url: str) -> int:
    args = ["run", "--dataset", str(dataset), "--output", str(output), "--api-url", url, "--rpm", "100000"]
    return main([*args, "--shards", "1", "--concurrency", "4"])


def manifest(output: Path):
    return ds.dataset(str(output / "manifest"), partitioning="hive").to_table().to_pandas()


def spooled_maps(output: Path) -> list[str]:
    return spool_for(LocalStorage(output)).list_prefix("normals")


def assert_spooled_maps_stored_without_a_request(before: dict, after: dict, images: int) -> None:
    """The re-run sent only the images never charged: none for the maps that waited in the spool."""
    assert after["requests"] - before["requests"] == images - len(before["charged_by_content"])
    assert after["charged_twice"] == 0 and set(after["charged_by_content"].values()) == {1}
    assert len(after["charged_by_content"]) == images


def test_disk_full_keeps_every_paid_row_and_the_rerun_adds_up_to_the_bill(
    tmp_path, emulator, mounts, monkeypatch, capsys
):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    make_portraits(tmp_path / "in", 40)
    output = mounts(tmp_path / "out", "size=160k")

    assert run(tmp_path / "in", output, emulator.url) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and str(output) in err[0]
    spool = spool_for(LocalStorage(output))
    assert f"paid maps wait in {spool.root / 'normals'}, stored by the next run with no request" in err[0]
    first = emulator.stats()
    assert 0 < Decimal(first["charged"]) < 40, "the disk should fill mid-run"
    assert spooled_maps(output)

    subprocess.run(["mount", "-o", "remount,size=20m", str(output)], check=True)
    assert run(tmp_path / "in", output, emulator.url) == 0
    table = manifest(output)
    stats = emulator.stats()
    assert len(table) == 40 and table["path"].is_unique and table["error_code"].isna().all()
    assert Decimal(str(table["credits_consumed"].sum())) == Decimal(stats["charged"])  # adds up to the bill
    assert_spooled_maps_stored_without_a_request(first, stats, 40)
    assert not spooled_maps(output)  # a spooled map is removed once stored


def test_a_read_only_normals_folder_keeps_every_paid_row(tmp_path, emulator, mounts, monkeypatch, capsys):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    make_portraits(tmp_path / "in", 8)
    output = tmp_path / "out"
    mounts(output / "normals", "ro,size=1m")

    assert run(tmp_path / "in", output, emulator.url) == 1
    err = capsys.readouterr().err.strip().splitlines()
    where = f"could not store the normal map at {output / 'normals'}/"  # a path to paste, not a file:// URI
    assert len(err) == 1 and where in err[0] and "Errno 30" in err[0]
    table = manifest(output)
    paid = table[table["error_code"] == "map_not_stored"]
    assert len(paid) >= 1 and (paid["credits_consumed"] == 1).all() and (paid["http_status"] == 200).all()
    first = emulator.stats()
    assert Decimal(str(table["credits_consumed"].sum())) == Decimal(first["charged"])
    assert len(spooled_maps(output)) == len(paid)
    capsys.readouterr()
    plan_args = ["--dataset", str(tmp_path / "in"), "--output", str(output), "--shards", "1", "--json"]
    main(["plan", *plan_args])
    plan = json.loads(capsys.readouterr().out)
    assert plan["credits_needed"] == 8 - Decimal(first["charged"])  # the spooled maps cost nothing more

    subprocess.run(["umount", "-l", str(output / "normals")], check=True)
    assert run(tmp_path / "in", output, emulator.url) == 0
    table = manifest(output)
    stats = emulator.stats()
    assert len(table) == 8 and table["error_code"].isna().all()
    assert Decimal(str(table["credits_consumed"].sum())) == Decimal(stats["charged"])
    assert_spooled_maps_stored_without_a_request(first, stats, 8)
    assert not spooled_maps(output)
    assert not json.dumps(table["error_message"].dropna().tolist()).count("test-key")
