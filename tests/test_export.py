"""Trainers' layouts (`normals_pipeline.export`), written from the training pairs of an enrichment against the
emulator in which some photos show no one (flat maps): those are in no layout; every other pair's normals are
`normals.decode`'s, its mask the decoded one, exactly; a re-run with nothing changed writes nothing."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image
from test_training import add_blanks

from normals_pipeline import normals
from normals_pipeline.client import ClipdropClient
from normals_pipeline.enrich import current_items, enrich_shard
from normals_pipeline.export import check_layout, export_layout, export_partitions
from normals_pipeline.guards import RateGuard
from normals_pipeline.inventory import take_inventory
from normals_pipeline.storage import LocalStorage, S3Storage, Storage
from normals_pipeline.synthetic import make_portraits
from normals_pipeline.training import PARQUET_DIR, write_training_pairs

EVEN = {"train": 0.5, "validation": 0.25, "test": 0.25}


def enrich_and_pair(dataset: Storage, output: Storage, url: str) -> None:
    """One shard of everything in `dataset`, enriched and paired, as the assets do."""
    items = current_items(dataset, take_inventory(dataset, 1))
    with ClipdropClient("test-key", base_url=url, rate_guard=RateGuard(100_000)) as client:
        manifest = enrich_shard(dataset, output, client, "00", items).manifest
    write_training_pairs(dataset, output, "00", manifest, splits=EVEN)


@pytest.fixture
def paired(tmp_path, emulator):
    """6 portraits and 2 photos of no one, enriched and paired into `out`."""
    folder = tmp_path / "in"
    make_portraits(folder, 6)
    add_blanks(folder)
    dataset, output = LocalStorage(folder), LocalStorage(tmp_path / "out")
    enrich_and_pair(dataset, output, emulator.url)
    return dataset, output


def pairs(output: Storage) -> list[dict]:
    table = pads.dataset(output.root / PARQUET_DIR, partitioning="hive").to_table()
    return sorted(table.to_pylist(), key=lambda row: row["key"])


def mtimes(folder) -> dict[str, int]:
    """The layout's files (its hidden records aside: a grown partition's record is rewritten)."""
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and ".built" not in p.parts}


def test_sapiens_holds_every_pair_with_decoded_normals_and_masks_and_none_of_no_one(paired, tmp_path):
    _, output = paired
    result = export_layout(output, "sapiens")
    rows = pairs(output)
    assert result.samples == len(rows) == 6 and result.convention == "opencv"
    assert not any(row["path"].startswith("blank") for row in rows)
    root = tmp_path / "out" / "training" / "sapiens"
    assert len(list(root.glob("*/images/*"))) == len(list(root.glob("*/masks/*.png"))) == 6
    for row in rows:
        split, stem = row["split"], row["key"]
        [image] = root.glob(f"{split}/images/{stem}.*")
        assert image.read_bytes() == row["image"]["bytes"]  # the image as sent
        vectors, mask = normals.decode(row["normal_map"]["bytes"], convention="opencv")
        stored = np.load(root / split / "normals" / f"{stem}.npy")
        assert stored.dtype == np.float32 and stored.shape == vectors.shape
        assert np.array_equal(stored[mask], vectors[mask]) and not stored[~mask].any()  # background (0, 0, 0)
        assert np.allclose(np.linalg.norm(stored[mask], axis=-1), 1, atol=1e-5)
        png = np.asarray(Image.open(root / split / "masks" / f"{stem}.png"))
        assert png.dtype == np.uint8 and np.array_equal(png == 255, mask) and set(np.unique(png)) <= {0, 255}
    meta = json.loads((root / "meta.json").read_bytes())
    assert meta["convention"] == "opencv" and meta["axes"] == {"x": "right", "y": "down", "z": "into the scene"}

    before = {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}  # the records too
    again = export_layout(output, "sapiens")
    assert again.reused and again.written == again.deleted == 0  # nothing written, the records included
    assert {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


def test_a_new_image_writes_its_own_files_and_a_gone_one_takes_its_files_along(paired, tmp_path, emulator):
    dataset, output = paired
    export_layout(output, "sapiens")
    root = tmp_path / "out" / "training" / "sapiens"
    before = mtimes(root)
    shutil.copy(tmp_path / "in" / "portrait_000.jpg", tmp_path / "in" / "zz later.jpg")  # same content, new path
    enrich_and_pair(dataset, output, emulator.url)
    grown = export_layout(output, "sapiens")
    assert (grown.samples, grown.written, grown.deleted) == (7, 3, 0)
    assert all(mtimes(root)[path] == mtime for path, mtime in before.items())  # the others untouched

    (tmp_path / "in" / "zz later.jpg").unlink()
    enrich_and_pair(dataset, output, emulator.url)
    shrunk = export_layout(output, "sapiens")
    assert shrunk.samples == 6 and shrunk.deleted >= 3
    assert len(list(root.glob("*/images/*"))) == len(list(root.glob("*/normals/*.npy"))) == 6


def test_marigold_lists_rgb_normal_pairs_in_its_convention(paired, tmp_path):
    _, output = paired
    result = export_layout(output, "marigold")
    root = tmp_path / "out" / "training" / "marigold"
    by_key = {row["key"]: row for row in pairs(output)}
    lines = {split: (root / f"{split}.txt").read_text().splitlines() for split in EVEN}
    assert sum(map(len, lines.values())) == result.samples == 6
    for split, listed in lines.items():
        for line in listed:
            rgb, normal = line.split(" ")
            stem = normal.rpartition("/")[2].removesuffix(".npy")
            assert rgb.startswith(f"{split}/images/{stem}.") and by_key[stem]["split"] == split
            assert (root / rgb).read_bytes() == by_key[stem]["image"]["bytes"]
            vectors, mask = normals.decode(by_key[stem]["normal_map"]["bytes"])  # opengl, Marigold's
            assert np.array_equal(np.load(root / normal)[mask], vectors[mask])
    before = mtimes(root)
    assert export_layout(output, "marigold").written == 0 and mtimes(root) == before


def test_dsine_pngs_read_back_through_dsines_own_rule(paired, tmp_path):
    _, output = paired
    export_layout(output, "dsine")
    root = tmp_path / "out" / "training" / "dsine"
    rows = pairs(output)
    listed = [line for split in EVEN for line in (root / f"{split}.txt").read_text().splitlines()]
    assert len(listed) == len(rows) == 6
    for row in rows:
        stem, split = row["key"], row["split"]
        image = next(line for line in listed if line.startswith(f"{split}/{stem}_img."))
        normal_path = root / image.replace("_img" + image[image.rindex(".") :], "_normal.png")  # as DSINE finds it
        png = np.asarray(Image.open(normal_path))
        valid = png.sum(axis=2) > 0  # DSINE's normal_mask
        read = png.astype(np.float32) / 255.0 * 2.0 - 1.0
        vectors, mask = normals.decode(row["normal_map"]["bytes"], convention="dsine")
        assert np.array_equal(valid, mask)
        assert np.abs(read[mask] - vectors[mask]).max() <= 1 / 255 + 1e-6  # 8 bits
        assert np.array_equal(np.asarray(Image.open(root / split / f"{stem}_mask.png")) == 255, mask)


def test_another_convention_rewrites_every_sample_and_unknown_ones_are_refused(paired, tmp_path):
    _, output = paired
    export_layout(output, "sapiens")
    result = export_layout(output, "sapiens", "opengl")
    assert result.written == 6 * 3 + 1  # every sample and meta.json
    root = tmp_path / "out" / "training" / "sapiens"
    assert json.loads((root / "meta.json").read_bytes())["convention"] == "opengl"
    with pytest.raises(ValueError, match="unknown layout"):
        check_layout("omnidata")
    with pytest.raises(ValueError, match="unknown convention"):
        check_layout("sapiens", "blender")


def test_a_dataset_on_s3_exports_to_s3(tmp_path, emulator, s3_client, s3_bucket):
    folder = tmp_path / "in"
    make_portraits(folder, 3)
    add_blanks(folder, 1)
    for path in folder.rglob("*"):
        if path.is_file():
            key = f"in/{path.relative_to(folder).as_posix()}"
            s3_client.put_object(Bucket=s3_bucket, Key=key, Body=path.read_bytes())
    dataset, output = S3Storage(s3_bucket, "in", s3_client), S3Storage(s3_bucket, "out", s3_client)
    enrich_and_pair(dataset, output, emulator.url)

    result = export_partitions(output, ["00"], "sapiens")
    assert result.samples == 3 and result.uri == f"s3://{s3_bucket}/out/training/sapiens"
    files = output.list_prefix("training/sapiens")
    assert len([path for path in files if path.endswith(".npy")]) == 3 and "training/sapiens/meta.json" in files
    [npy] = [path for path in files if path.endswith(".npy")][:1]
    stored = np.load(io.BytesIO(output.read_bytes(npy)))
    assert stored.dtype == np.float32 and stored.ndim == 3
    again = export_partitions(output, ["00"], "sapiens")
    assert again.reused and again.written == 0
