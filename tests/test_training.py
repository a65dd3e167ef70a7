"""Training pairs (`normals_pipeline.training`): built from an enrichment against the emulator, read back by the
loaders ML users have (Hugging Face datasets, pyarrow.dataset, duckdb, polars, WebDataset tars, NormalsDataset)."""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import shutil
import tarfile
from collections import Counter

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image

from normals_pipeline import normals
from normals_pipeline.client import ClipdropClient
from normals_pipeline.emulator._normals import render_normal_map
from normals_pipeline.enrich import current_items, enrich_shard, normal_map_path
from normals_pipeline.guards import RateGuard
from normals_pipeline.inventory import take_inventory
from normals_pipeline.storage import LocalStorage, S3Storage, Storage
from normals_pipeline.synthetic import make_portraits
from normals_pipeline.training import (
    PARQUET_DIR,
    QUALITY_COLUMNS,
    SCHEMA,
    WEBDATASET_DIR,
    NormalsDataset,
    _S3File,
    check_splits,
    quality_figures,
    split_files,
    split_of,
    write_training_pairs,
)

prepare_module = importlib.import_module("normals_pipeline.prepare")  # the package re-exports the function
EVEN = {"train": 0.5, "validation": 0.25, "test": 0.25}  # every split gets some of a few images


def enrich(dataset: Storage, output: Storage, url: str):
    """One shard of everything in `dataset`, through the core, as the asset does; returns its manifest."""
    items = current_items(dataset, take_inventory(dataset, 1))
    with ClipdropClient("test-key", base_url=url, rate_guard=RateGuard(100_000)) as client:
        return enrich_shard(dataset, output, client, "00", items).manifest


@pytest.fixture
def enriched(tmp_path, emulator):
    """12 portraits, a broken file and a byte-for-byte duplicate, enriched into `out`."""
    folder = tmp_path / "in"
    make_portraits(folder, 12)
    (folder / "broken.jpg").write_bytes(b"not an image")
    shutil.copy(folder / "portrait_000.jpg", folder / "copy of 000.jpg")
    dataset, output = LocalStorage(folder), LocalStorage(tmp_path / "out")
    return dataset, output, enrich(dataset, output, emulator.url)


def add_blanks(folder, count: int = 2) -> None:
    """Plain photos with no one in them: the emulator, like the API, answers each with a flat map."""
    for index in range(count):
        Image.new("RGB", (320 + 16 * index, 240), (90 + 40 * index, 120, 150)).save(folder / f"blank_{index}.jpg")


@pytest.fixture
def mixed(tmp_path, emulator):
    """6 portraits and 2 photos of no one, enriched into `out`."""
    folder = tmp_path / "in"
    make_portraits(folder, 6)
    add_blanks(folder)
    dataset, output = LocalStorage(folder), LocalStorage(tmp_path / "out")
    return dataset, output, enrich(dataset, output, emulator.url)


def pairs_table(output: Storage):
    return pads.dataset(output.root / PARQUET_DIR, partitioning="hive").to_table().sort_by("path")


def test_maps_of_no_one_are_left_out_and_the_pairs_carry_their_figures(mixed):
    dataset, output, manifest = mixed
    assert manifest["error_code"].isna().all()  # each flat map was paid for
    result = write_training_pairs(dataset, output, "00", manifest)
    assert result.pairs == 6 and result.left_out == {"no_person": 2}
    table = pairs_table(output)
    assert not any(path.startswith("blank") for path in table["path"].to_pylist())
    for row in table.to_pylist():
        quality = normals.assess(row["normal_map"]["bytes"])
        for name in QUALITY_COLUMNS:
            assert row[name] == pytest.approx(getattr(quality, name), rel=1e-6)
        assert row["person_fraction"] > 0.2 and 0 < row["unit_norm_error"] < 0.05 and 0 < row["facing_fraction"] < 1
    figures = quality_figures(result)
    assert (figures["maps"], figures["no_person"], figures["unit_norm_above_bound"]) == (8, 2, 0)
    assert figures["person_fraction_quantiles"]["p00"] == pytest.approx(min(table["person_fraction"].to_pylist()), 1e-3)

    again = write_training_pairs(dataset, output, "00", manifest)  # no_person is lasting: the build is kept
    assert again.reused and again.left_out == {"no_person": 2} and quality_figures(again) == figures

    kept = write_training_pairs(dataset, output, "00", manifest, keep_no_person=True)  # another setting: rebuilt
    assert not kept.reused and kept.pairs == 8 and not kept.left_out
    flat = [row for row in pairs_table(output).to_pylist() if row["path"].startswith("blank")]
    assert [(row["person_fraction"], row["unit_norm_error"], row["facing_fraction"]) for row in flat] == [
        (0.0, None, None)
    ] * 2
    assert quality_figures(kept)["no_person"] == 2 and quality_figures(kept, min_person_fraction=0.0)["no_person"] == 0

    strict = write_training_pairs(dataset, output, "00", manifest, min_person_fraction=0.99)
    assert not strict.reused and strict.pairs == 0 and strict.left_out == {"no_person": 8}


def test_pairs_added_to_a_kept_build_keep_every_pairs_figures(mixed):
    dataset, output, manifest = mixed
    ordered = manifest.sort_values("path", ignore_index=True)
    first = write_training_pairs(dataset, output, "00", ordered.drop(index=[0, 5]))  # a blank and a portrait
    grown = write_training_pairs(dataset, output, "00", manifest)
    assert not grown.reused and grown.pairs == 6 and grown.left_out == {"no_person": 2}
    assert set(first.files) < set(grown.files)  # kept and added to
    stored = sorted(pairs_table(output)["person_fraction"].to_pylist())
    assert sorted(grown.quality["person_fraction"]) == pytest.approx(stored, rel=1e-6)  # the kept pairs' and the new
    assert (quality_figures(grown)["maps"], quality_figures(grown)["no_person"]) == (8, 2)
    assert write_training_pairs(dataset, output, "00", manifest).quality.equals(grown.quality)


def test_pairs_load_through_all_four_readers(enriched, tmp_path):
    dataset, output, manifest = enriched
    result = write_training_pairs(dataset, output, "00", manifest, splits=EVEN)
    assert result.pairs == 13 and not result.left_out  # 12 + the duplicate; the broken file has no map
    assert set(result.splits) == {"train", "validation", "test"} and sum(result.splits.values()) == 13
    root = tmp_path / "out" / PARQUET_DIR

    import datasets

    loaded = datasets.load_dataset(str(root), cache_dir=str(tmp_path / "hf"))  # splits found by file name
    assert {name: len(split) for name, split in loaded.items()} == dict(result.splits)
    for split, rows in loaded.items():
        for row in rows:
            assert isinstance(row["image"], Image.Image) and isinstance(row["normal_map"], Image.Image)
            assert row["image"].size == row["normal_map"].size == (row["width"], row["height"])
            assert row["split"] == split

    table = pads.dataset(root, partitioning="hive").to_table()
    assert table.num_rows == 13 and set(table["partition"].to_pylist()) == {0}
    assert Counter(table["split"].to_pylist()) == result.splits

    import duckdb

    counts = duckdb.sql(
        f"SELECT split, count(*), min(partition) FROM read_parquet('{root}/*/*.parquet', hive_partitioning=true) "
        "GROUP BY split"
    ).fetchall()
    assert {split: n for split, n, _ in counts} == dict(result.splits) and {int(p) for *_, p in counts} == {0}

    import polars as pl

    frame = pl.scan_parquet(f"{root}/**/*.parquet", hive_partitioning=True).select("split", "partition").collect()
    assert Counter(frame["split"].to_list()) == result.splits and {int(p) for p in frame["partition"].to_list()} == {0}


def test_the_files_carry_the_huggingface_image_features(enriched):
    dataset, output, manifest = enriched
    result = write_training_pairs(dataset, output, "00", manifest)
    schema = pq.read_schema(io.BytesIO(output.read_bytes(result.files[0])))
    assert schema.equals(SCHEMA, check_metadata=True)
    assert str(schema.field("image").type) == "struct<bytes: binary, path: string>"
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == features["normal_map"] == {"_type": "Image"}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif


def test_an_exif_turned_image_and_a_downscaled_one_pair_pixel_for_pixel(tmp_path, emulator, monkeypatch):
    monkeypatch.setattr(prepare_module, "MAX_PIXELS", 300 * 400)  # the 480×640 portrait needs a downscale
    folder = tmp_path / "in"
    [turned_source, big_source] = make_portraits(folder, 2)
    portrait = Image.open(turned_source).convert("RGB").resize((150, 200))  # small: only turned
    turned = portrait.transpose(Image.Transpose.ROTATE_90)  # stored on its side, EXIF 6 shows it upright
    turned.save(folder / "turned.jpg", quality=95, exif=_exif(6))
    turned_source.unlink()
    Image.open(big_source).convert("RGB").resize((480, 640)).save(folder / "big.png")
    big_source.unlink()
    dataset, output = LocalStorage(folder), LocalStorage(tmp_path / "out")
    manifest = enrich(dataset, output, emulator.url)
    assert dict(zip(manifest["path"], manifest["preparation"])) == {
        "turned.jpg": "exif_transpose",
        "big.png": "downscaled",
    }

    write_training_pairs(dataset, output, "00", manifest, splits={"train": 1.0})
    rows = pq.read_table(tmp_path / "out" / PARQUET_DIR / "partition=00" / "train-00000.parquet").to_pylist()
    assert {row["path"] for row in rows} == {"turned.jpg", "big.png"}
    for row in rows:
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert image.getexif().get(ExifTags.Base.Orientation, 1) == 1  # upright pixels, no tag to apply twice
        # the emulator renders a map in the pixel grid of what it received: these are exactly those pixels
        assert render_normal_map(image) == row["normal_map"]["bytes"]
        source = Image.open(folder / row["path"])
        assert source.size != image.size  # the file in the dataset would not have lined up
    sizes = {row["path"]: (row["width"], row["height"]) for row in rows}
    assert sizes["turned.jpg"] == portrait.size
    assert sizes["big.png"][0] * sizes["big.png"][1] <= 300 * 400


def test_a_source_changed_or_gone_since_enrichment_is_left_out_and_counted(enriched, tmp_path):
    dataset, output, manifest = enriched
    folder = tmp_path / "in"
    Image.new("RGB", (64, 64), "red").save(folder / "portrait_003.jpg")  # edited after its map was made
    (folder / "portrait_004.png").unlink()
    hashes = manifest.set_index("path")["content_hash"]
    output.delete(normal_map_path(hashes["portrait_006.jpg"]))
    small = io.BytesIO()
    Image.new("RGB", (10, 10), (128, 128, 255)).save(small, "JPEG")
    output.write_bytes(normal_map_path(hashes["portrait_009.jpg"]), small.getvalue())  # not the image's size
    (folder / "portrait_010.png").unlink()
    os.mkfifo(folder / "portrait_010.png")  # never opened: refused as not a regular file
    result = write_training_pairs(dataset, output, "00", manifest)
    assert dict(result.left_out) == {
        "source_changed": 1,
        "source_missing": 1,
        "map_missing": 1,
        "size_mismatch": 1,
        "source_unreadable": 1,
    }
    assert result.pairs == 13 - 5


def test_splits_are_stable_across_reruns_and_duplicates_share_theirs(enriched, tmp_path, emulator):
    dataset, output, manifest = enriched

    def splits() -> dict[str, str]:
        table = pads.dataset(tmp_path / "out" / PARQUET_DIR, partitioning="hive").to_table(columns=["path", "split"])
        return dict(zip(table["path"].to_pylist(), table["split"].to_pylist()))

    first = write_training_pairs(dataset, output, "00", manifest, splits=EVEN)
    before = splits()
    make_portraits(tmp_path / "in" / "later", 4, seed=5)  # more images: nothing moves
    again = write_training_pairs(dataset, output, "00", enrich(dataset, output, emulator.url), splits=EVEN)
    after = splits()
    assert {path: after[path] for path in before} == before and len(after) == len(before) + 4
    assert first.pairs + 4 == again.pairs
    assert before["copy of 000.jpg"] == before["portrait_000.jpg"]


@settings(max_examples=200, deadline=None)
@given(
    content=st.text(min_size=1, max_size=80),
    weights=st.tuples(*(st.integers(0, 20) for _ in range(3))).filter(lambda w: sum(w) > 0),
)
def test_split_of_depends_on_the_content_alone_and_never_picks_an_empty_split(content, weights):
    fractions = {name: w / sum(weights) for name, w in zip(("train", "validation", "test"), weights)}
    split = split_of(content, fractions)
    assert split == split_of(content, dict(fractions)) == split_of(str(content), fractions)
    assert fractions[split] > 0


def test_split_of_follows_the_fractions():
    hashes = [f"{i:064x}" for i in range(20_000)]
    counts = Counter(split_of(h, {"train": 0.8, "validation": 0.15, "test": 0.05}) for h in hashes)
    assert abs(counts["train"] / 20_000 - 0.8) < 0.015 and abs(counts["test"] / 20_000 - 0.05) < 0.01


@pytest.mark.parametrize(
    "bad", [{"train": 0.9}, {"train": 1.2, "test": -0.2}, {"train": 0.5, "dev": 0.5}, {"train": float("nan")}]
)
def test_split_fractions_are_checked(bad):
    with pytest.raises(ValueError, match="split"):
        check_splits(bad)
    assert check_splits({"train": 0.8, "test": 0.2}) == {"train": 0.8, "validation": 0.0, "test": 0.2}


def test_a_rerun_rewrites_the_shard_and_leaves_no_stale_file(enriched, tmp_path):
    dataset, output, manifest = enriched
    write_training_pairs(dataset, output, "00", manifest, splits=EVEN, webdataset=True)
    assert {p.rsplit("/", 1)[1].split("-")[0] for p in split_files_all(output)} == {"train", "validation", "test"}
    result = write_training_pairs(dataset, output, "00", manifest, splits={"train": 1.0})
    assert split_files_all(output) == [f"{PARQUET_DIR}/partition=00/train-00000.parquet"] == result.files
    assert output.list_prefix(WEBDATASET_DIR) == []  # turned off: its tars went too
    assert split_files(output, "validation") == []


def split_files_all(output: Storage) -> list[str]:
    return output.list_prefix(PARQUET_DIR)


def test_webdataset_shards_in_img2dataset_layout(enriched):
    dataset, output, manifest = enriched
    result = write_training_pairs(dataset, output, "00", manifest, splits=EVEN, webdataset=True)
    assert output.list_prefix(WEBDATASET_DIR) == [
        f"{WEBDATASET_DIR}/00_0000.tar",
        f"{WEBDATASET_DIR}/00_0000_stats.json",
    ]
    stats = json.loads(output.read_bytes(f"{WEBDATASET_DIR}/00_0000_stats.json"))
    assert stats["count"] == stats["successes"] == 13 and stats["splits"] == dict(result.splits)
    with tarfile.open(fileobj=io.BytesIO(output.read_bytes(f"{WEBDATASET_DIR}/00_0000.tar"))) as tar:
        names = tar.getnames()
        samples: dict[str, dict[str, bytes]] = {}
        for name in names:
            key, _, field = name.partition(".")  # as webdataset splits a member's name
            samples.setdefault(key, {})[field] = tar.extractfile(name).read()
    assert len(samples) == 13 and all("." not in key for key in samples)
    for key, fields in samples.items():
        meta = json.loads(fields["json"])
        image_field = next(f for f in fields if f in ("jpg", "png", "webp"))
        assert set(fields) == {image_field, "normal.jpg", "json"} and meta["key"] == key
        image, normal_map = (Image.open(io.BytesIO(fields[f])) for f in (image_field, "normal.jpg"))
        assert image.size == normal_map.size == (meta["width"], meta["height"])
        assert meta["split"] in ("train", "validation", "test") and meta["path"]


def test_normals_dataset_gives_aligned_numpy_arrays(enriched):
    dataset, output, manifest = enriched
    result = write_training_pairs(dataset, output, "00", manifest, splits=EVEN)
    data = NormalsDataset(output, split="train", convention="opencv")
    assert len(data) == result.splits["train"]
    for index in range(len(data)):
        item = data[index]
        assert item["image"].dtype == np.uint8 and item["normals"].dtype == np.float32 and item["mask"].dtype == bool
        assert item["image"].shape == item["normals"].shape and item["mask"].shape == item["image"].shape[:2]
        norms = np.linalg.norm(item["normals"], axis=2)
        assert np.allclose(norms, 1, atol=1e-3) and 0 < item["mask"].mean() < 1
    with pytest.raises(IndexError):
        data[len(data)]
    copy = pickle.loads(pickle.dumps(data))  # what a DataLoader worker gets
    assert all(np.array_equal(copy[-1][name], data[-1][name]) for name in ("image", "normals", "mask"))


def test_normals_dataset_resizes_and_flips_all_three_together(enriched):
    dataset, output, manifest = enriched
    write_training_pairs(dataset, output, "00", manifest, splits={"train": 1.0})
    plain = NormalsDataset(output, size=(64, 96))[0]
    flipped = NormalsDataset(output, size=(64, 96), hflip=1.0)[0]
    assert plain["image"].shape == (96, 64, 3) and plain["normals"].shape == (96, 64, 3)
    assert plain["mask"].shape == (96, 64)
    assert np.array_equal(flipped["image"], plain["image"][:, ::-1])
    assert np.array_equal(flipped["mask"], plain["mask"][:, ::-1])
    mirrored = plain["normals"][:, ::-1] * np.array([-1, 1, 1], np.float32)
    assert np.allclose(flipped["normals"], mirrored, atol=1e-6)
    draws = [NormalsDataset(output, hflip=0.5, seed=3) for _ in range(2)]
    assert all(np.array_equal(draws[0][i]["image"], draws[1][i]["image"]) for i in range(4))  # reproducible


def test_normals_dataset_feeds_a_torch_dataloader(enriched):
    torch = pytest.importorskip("torch")
    dataset, output, manifest = enriched
    write_training_pairs(dataset, output, "00", manifest, splits={"train": 1.0})
    data = NormalsDataset(output, size=(32, 48), hflip=0.5)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, num_workers=2)
    batches = list(loader)
    assert sum(len(batch["image"]) for batch in batches) == len(data) == 13
    assert tuple(batches[0]["normals"].shape[1:]) == (48, 32, 3) and batches[0]["mask"].dtype == torch.bool


def test_training_pairs_on_s3(tmp_path, emulator, s3_client, s3_bucket):
    folder = tmp_path / "in"
    make_portraits(folder, 4)
    for path in folder.rglob("*"):
        if path.is_file():
            s3_client.put_object(
                Bucket=s3_bucket, Key=f"in/{path.relative_to(folder).as_posix()}", Body=path.read_bytes()
            )
    dataset, output = S3Storage(s3_bucket, "in", s3_client), S3Storage(s3_bucket, "out", s3_client)
    manifest = enrich(dataset, output, emulator.url)

    result = write_training_pairs(dataset, output, "00", manifest, splits={"train": 1.0}, webdataset=True)
    assert result.pairs == 4 and result.uri == f"s3://{s3_bucket}/out/{PARQUET_DIR}/partition=00"
    assert output.list_prefix("training") == sorted(result.files)
    [path] = split_files(output, "train")
    whole = pq.read_table(io.BytesIO(output.read_bytes(path)))
    item = NormalsDataset(output, split="train")[3]
    assert item["image"].shape == item["normals"].shape and item["mask"].any()
    assert pickle.loads(pickle.dumps(NormalsDataset(output)))[3]["mask"].sum() == item["mask"].sum()  # reopened
    ranged = pq.ParquetFile(_S3File(output, path))  # what NormalsDataset reads on S3: footer and one row group
    assert ranged.metadata.num_rows == 4 and ranged.read_row_group(0).equals(
        whole.slice(0, ranged.metadata.row_group(0).num_rows)
    )


def test_a_large_shard_is_written_in_parts_that_a_rerun_folds_back(enriched, monkeypatch):
    import normals_pipeline.training as training

    dataset, output, manifest = enriched
    monkeypatch.setattr(training, "PART_BYTES", 1)  # every pair fills a part
    write_training_pairs(dataset, output, "00", manifest, splits={"train": 1.0}, webdataset=True)
    assert len(split_files(output, "train")) == 13
    tars = [p for p in output.list_prefix(WEBDATASET_DIR) if p.endswith(".tar")]
    keys = set()
    for path in tars:
        with tarfile.open(fileobj=io.BytesIO(output.read_bytes(path))) as tar:
            keys |= {name.partition(".")[0] for name in tar.getnames()}
    assert len(tars) == len(keys) == 13  # keys go on across the shard's tars
    data = NormalsDataset(output)
    assert len(data) == 13 and all(data[i]["mask"].any() for i in (*range(13), 0))  # 13 files, 8 kept open

    monkeypatch.setattr(training, "PART_BYTES", 64 * 2**20)
    write_training_pairs(dataset, output, "00", manifest, splits={"train": 1.0})
    assert split_files(output, "train") == [f"{PARQUET_DIR}/partition=00/train-00000.parquet"]
    assert len(NormalsDataset(output)) == 13


def test_a_part_turned_into_arrow_a_pair_at_a_time_is_the_part_made_at_once(enriched, monkeypatch):
    """The writer holds a part's pairs as Arrow chunks as they come (memory: the bytes once, not twice)."""
    import normals_pipeline.training as training

    dataset, output, manifest = enriched
    monkeypatch.setattr(training, "ROW_GROUP_ROWS", 5)  # groups cross the chunks
    part = f"{PARQUET_DIR}/partition=00/train-00000.parquet"
    built = {}
    for chunk_bytes in (1, 2**40):  # each pair on its own; all of them at the part's end
        monkeypatch.setattr(training, "TABLE_CHUNK_BYTES", chunk_bytes)
        output.delete_many(output.list_prefix(training.TRAINING_DIR))  # built again, not kept
        write_training_pairs(dataset, output, "00", manifest, splits={"train": 1.0})
        built[chunk_bytes] = pq.ParquetFile(io.BytesIO(output.read_bytes(part)))
    by_pair, at_once = built.values()
    assert by_pair.read().equals(at_once.read()) and by_pair.metadata.num_rows == 13
    groups = [by_pair.metadata.row_group(i).num_rows for i in range(by_pair.num_row_groups)]
    assert groups == [at_once.metadata.row_group(i).num_rows for i in range(at_once.num_row_groups)] == [5, 5, 3]


def test_an_unchanged_shard_is_kept_and_one_with_left_outs_is_built_again(enriched, tmp_path):
    dataset, output, manifest = enriched
    first = write_training_pairs(dataset, output, "00", manifest)
    written = {path: (tmp_path / "out" / path).stat().st_mtime_ns for path in first.files}
    again = write_training_pairs(dataset, output, "00", manifest)
    assert (
        again.reused
        and not first.reused
        and (again.pairs, again.splits, again.files)
        == (
            first.pairs,
            first.splits,
            first.files,
        )
    )
    assert {path: (tmp_path / "out" / path).stat().st_mtime_ns for path in first.files} == written  # not rewritten

    missing = tmp_path / "in" / "portrait_003.jpg"
    saved = missing.read_bytes()
    missing.unlink()
    assert write_training_pairs(dataset, output, "00", manifest, splits=EVEN).left_out == {"source_missing": 1}
    missing.write_bytes(saved)  # back (a transient failure): the next run builds its pair again
    back = write_training_pairs(dataset, output, "00", manifest, splits=EVEN)
    assert not back.reused and back.pairs == 13 and not back.left_out
    (tmp_path / "out" / back.files[0]).unlink()  # a file of the last build lost: built again
    assert not write_training_pairs(dataset, output, "00", manifest, splits=EVEN).reused


def _tar_keys(output: Storage) -> list[str]:
    keys = []
    for path in sorted(p for p in output.list_prefix(WEBDATASET_DIR) if p.endswith(".tar")):
        with tarfile.open(fileobj=io.BytesIO(output.read_bytes(path))) as tar:
            keys += sorted({name.partition(".")[0] for name in tar.getnames()})
    return keys


def test_rows_only_added_keep_the_built_files_and_add_parts_for_the_new_pairs(enriched, tmp_path):
    """A run that enriched a few new images reads those again, not the whole shard; a row gone or changed
    rebuilds the shard, so no pair of an image no longer there is kept."""
    import normals_pipeline.training as training

    dataset, output, manifest = enriched
    ordered = manifest[manifest["error_code"].isna()].sort_values("path", ignore_index=True)
    earlier = ordered.drop(index=[4, 9])
    first = write_training_pairs(dataset, output, "00", earlier, splits=EVEN, webdataset=True)
    assert first.pairs == 11
    written = {path: (tmp_path / "out" / path).stat().st_mtime_ns for path in first.files}

    grown = write_training_pairs(dataset, output, "00", manifest, splits=EVEN, webdataset=True)
    assert not grown.reused and grown.pairs == 13 and not grown.left_out
    assert set(first.files) < set(grown.files) and sorted(output.list_prefix("training/parquet")) == sorted(
        path for path in grown.files if path.endswith(".parquet")
    )
    assert {path: (tmp_path / "out" / path).stat().st_mtime_ns for path in first.files} == written  # kept
    keys = _tar_keys(output)
    assert len(keys) == len(set(keys)) == 13  # sample keys go on after the kept tars'
    assert sorted(pairs_table(output)["key"].to_pylist()) == sorted(keys)  # the pairs name their samples alike
    assert grown.splits == Counter(training.split_of(digest, EVEN) for digest in ordered["content_hash"])
    assert sum(len(NormalsDataset(output, split=split)) for split in EVEN) == 13
    assert write_training_pairs(dataset, output, "00", manifest, splits=EVEN, webdataset=True).reused

    shrunk = write_training_pairs(dataset, output, "00", earlier, splits=EVEN, webdataset=True)
    assert not shrunk.reused and shrunk.pairs == 11
    assert len([p for p in shrunk.files if p.endswith(".parquet")]) == len(shrunk.splits)  # rebuilt: one part each
    assert sum(len(NormalsDataset(output, split=s)) for s in EVEN) == 11


def test_a_build_stopped_before_its_record_is_never_taken_for_built(enriched, tmp_path):
    """Its rows list is written before its record: rows listed by no record make the next run rebuild."""
    dataset, output, manifest = enriched
    earlier = manifest[manifest["error_code"].isna()].sort_values("path", ignore_index=True).drop(index=[4])
    write_training_pairs(dataset, output, "00", earlier, splits=EVEN)
    record = (tmp_path / "out" / "training" / ".built" / "00.json").read_bytes()
    write_training_pairs(dataset, output, "00", manifest, splits=EVEN)
    (tmp_path / "out" / "training" / ".built" / "00.json").write_bytes(record)  # as if stopped before the record
    again = write_training_pairs(dataset, output, "00", manifest, splits=EVEN)
    assert not again.reused and again.pairs == 13
    assert sum(len(NormalsDataset(output, split=s)) for s in EVEN) == 13
