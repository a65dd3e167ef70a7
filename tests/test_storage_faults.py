"""Paid answers whose map cannot be stored: a full disk and a read-only `normals/`, on real file systems
(a tmpfs mounted for the test; skipped where mounting is not permitted)."""

import json
import subprocess
from decimal import Decimal
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from normals_pipeline.cli import main
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


def test_disk_full_keeps_every_paid_row_and_the_rerun_adds_up_to_the_bill(
    tmp_path, emulator, mounts, monkeypatch, capsys
):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    make_portraits(tmp_path / "in", 40)
    output = mounts(tmp_path / "out", "size=160k")

    assert run(tmp_path / "in", output, emulator.url) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and str(output) in err[0]
    assert 0 < Decimal(emulator.stats()["charged"]) < 40, "the disk should fill mid-run"

    subprocess.run(["mount", "-o", "remount,size=20m", str(output)], check=True)
    assert run(tmp_path / "in", output, emulator.url) == 0
    table = manifest(output)
    stats = emulator.stats()
    assert len(table) == 40 and table["path"].is_unique and table["error_code"].isna().all()
    assert Decimal(str(table["credits_consumed"].sum())) == Decimal(stats["charged"])  # adds up to the bill
    assert stats["charged_twice"] > 0  # the answers that could not be stored were bought again


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
    assert Decimal(str(table["credits_consumed"].sum())) == Decimal(emulator.stats()["charged"])

    subprocess.run(["umount", "-l", str(output / "normals")], check=True)
    assert run(tmp_path / "in", output, emulator.url) == 0
    table = manifest(output)
    assert len(table) == 8 and table["error_code"].isna().all()
    assert Decimal(str(table["credits_consumed"].sum())) == Decimal(emulator.stats()["charged"])
    assert not json.dumps(table["error_message"].dropna().tolist()).count("test-key")
