"""Inventory: which files are images, stable shards, Parquet round-trip on local and S3 outputs."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from normals_pipeline.inventory import (
    INVENTORY_PATH,
    SKIPPED_KEY,
    SKIPPED_NAMES_KEY,
    InventoryMissing,
    partition_key,
    partition_keys,
    read_inventory,
    shard_of,
    skipped_entries,
    skipped_names,
    take_inventory,
    write_inventory,
)
from normals_pipeline.storage import Listing, LocalStorage, S3Storage


class ListedStorage:
    """Just enough Storage for take_inventory: a fixed listing."""

    uri = "mem://listed"

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def listing(self, suffixes: tuple[str, ...] | None = None) -> Listing:
        paths = [p for p in self.paths if p.lower().endswith(suffixes or "")]
        return Listing(paths, [len(p) for p in paths], [f"v-{p}" for p in paths])


IMAGES = ["a.jpg", "A.JPG", "dir/b.Jpeg", "c.png", "d.PNG", "e.webp", "x/y/z.WebP", "v1.2/f.jpg"]
NOT_IMAGES = ["a.gif", "b.jpg.txt", "c", "jpg", "dir.jpg/readme", ".jpg", "d.tiff", "e.jpgx", "f.pn", ".h/i.jpg"]


def test_image_suffixes_match_case_insensitively_and_nothing_else(tmp_path: Path) -> None:
    for path in IMAGES + NOT_IMAGES:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
    assert sorted(take_inventory(LocalStorage(tmp_path), 4)["path"].to_pylist()) == sorted(IMAGES)


def test_shard_values_are_pinned() -> None:
    # Changing the hash would silently move every image to another partition (CRC-32 of the UTF-8 path).
    assert shard_of("a.jpg", 16) == 6
    assert shard_of("photos/2024/IMG_0001.JPG", 1000) == 206
    assert shard_of("ünï/é.png", 7) == 3


@given(st.text(min_size=1), st.integers(min_value=1, max_value=10_000))
def test_shard_of_is_in_range(path: str, shards: int) -> None:
    assert 0 <= shard_of(path, shards) < shards


_segment = st.text(st.characters(exclude_characters="/.", exclude_categories=("Cs",)), min_size=1, max_size=8)
_image_path = st.builds(
    lambda parts, ext: "/".join(parts) + ext,
    st.lists(_segment, min_size=1, max_size=3),
    st.sampled_from([".jpg", ".PNG", ".webp", ".jpeg"]),
)


@given(
    st.lists(_image_path, min_size=1, max_size=30, unique=True),
    st.lists(_image_path, max_size=30),
    st.integers(min_value=1, max_value=64),
)
def test_new_images_never_move_old_ones(old: list[str], new: list[str], shards: int) -> None:
    before = take_inventory(ListedStorage(old), shards).to_pydict()
    after = take_inventory(ListedStorage(sorted(set(old + new))), shards).to_pydict()
    after_shards = dict(zip(after["path"], after["shard"]))
    assert all(after_shards[p] == s for p, s in zip(before["path"], before["shard"]))


def test_partition_keys_are_zero_padded() -> None:
    assert partition_keys(1) == ["00"]
    assert partition_keys(16) == [f"{i:02d}" for i in range(16)]
    assert partition_keys(100)[-1] == "99"
    assert partition_keys(101)[0] == "000" and partition_keys(101)[-1] == "100"
    assert partition_key(7, 1000) == "007"
    with pytest.raises(ValueError):
        partition_key(16, 16)
    with pytest.raises(ValueError):
        partition_keys(0)


def test_take_inventory_keeps_only_images_with_schema(tmp_path: Path) -> None:
    for name in ["b.JPG", "sub/a.png", "notes.txt", ".hidden.jpg", "sub/c.gif"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"1234")
    table = take_inventory(LocalStorage(tmp_path), 4)
    assert table.schema.names == ["path", "size", "version", "shard"]
    assert [f.type for f in table.schema] == [pa.string(), pa.int64(), pa.string(), pa.int32()]
    assert table.column("path").to_pylist() == ["b.JPG", "sub/a.png"]
    assert table.column("size").to_pylist() == [None, None]  # a local listing does not stat; the shard run does
    assert table.column("shard").to_pylist() == [shard_of("b.JPG", 4), shard_of("sub/a.png", 4)]


def test_empty_dataset_gives_empty_inventory(tmp_path: Path) -> None:
    table = take_inventory(LocalStorage(tmp_path), 8)
    assert table.num_rows == 0 and table.schema.names == ["path", "size", "version", "shard"]


def _round_trip(output: Any) -> None:
    paths = sorted(f"img{i}.jpg" for i in range(50))
    table = take_inventory(ListedStorage(paths), 4)
    assert write_inventory(output, table) == output.uri_for(INVENTORY_PATH)
    assert read_inventory(output).equals(table)
    for shard in range(4):
        part = read_inventory(output, shard)
        assert set(part.column("shard").to_pylist()) <= {shard}
        assert part.column("path").to_pylist() == [p for p in paths if shard_of(p, 4) == shard]


def test_write_read_round_trip_local(tmp_path: Path) -> None:
    _round_trip(LocalStorage(tmp_path))
    assert sorted(p.name for p in (tmp_path / "inventory").iterdir()) == ["inventory.parquet"]


def test_write_read_round_trip_s3(s3_client: Any, s3_bucket: str) -> None:
    _round_trip(S3Storage(s3_bucket, "runs/out", s3_client))


def test_missing_inventory_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(InventoryMissing, match="materialize the inventory asset first") as info:
        read_inventory(LocalStorage(tmp_path))
    assert isinstance(info.value, FileNotFoundError)
    assert LocalStorage(tmp_path).uri_for(INVENTORY_PATH) in str(info.value)


def test_a_name_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    (tmp_path / "fine.jpg").write_bytes(b"x")
    os.close(os.open(os.path.join(os.fsencode(tmp_path), b"bad-\xff.jpg"), os.O_CREAT | os.O_WRONLY))
    table = take_inventory(LocalStorage(tmp_path), 4)
    assert table["path"].to_pylist() == ["fine.jpg"]
    assert skipped_names(table) == 1
    assert skipped_entries(table) == {"non_utf8_name": 1}


def test_what_cannot_be_read_is_left_out_and_counted_by_reason(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "fine.jpg").write_bytes(b"x")
    os.mkfifo(root / "fifo.jpg")
    os.mkfifo(root / "fifo.txt")  # not an image name: not counted
    monkeypatch.chdir(root)  # bind by a relative name: a unix socket path must fit in 108 bytes
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock.png")
        (root / "a.jpg").symlink_to("b.jpg")
        (root / "b.jpg").symlink_to("a.jpg")
        (tmp_path / "secret.jpg").write_bytes(b"secret")
        (root / "out.jpg").symlink_to(tmp_path / "secret.jpg")
        (root / "broken.webp").symlink_to("missing.webp")
        (root / "album.jpg").mkdir()
        (root / "dir.jpeg").symlink_to("album.jpg", target_is_directory=True)
        os.close(os.open(os.path.join(os.fsencode(root), b"bad-\xff.jpg"), os.O_CREAT | os.O_WRONLY))
        table = take_inventory(LocalStorage(root), 4)
    assert table["path"].to_pylist() == ["fine.jpg"]
    expected = {
        "fifo": 1,
        "socket": 1,
        "symlink_loop": 2,
        "symlink_outside": 1,
        "broken_symlink": 1,
        "not_a_file": 1,
        "non_utf8_name": 1,
    }
    assert skipped_entries(table) == expected
    assert skipped_names(table) == 1
    output = LocalStorage(tmp_path / "out")
    write_inventory(output, table)
    assert skipped_entries(read_inventory(output)) == expected


def test_nothing_skipped_gives_empty_counts_even_from_a_listing_without_them() -> None:
    table = take_inventory(ListedStorage(["a.jpg", "b.png"]), 4)  # a Listing built with three columns
    assert skipped_entries(table) == {} and skipped_names(table) == 0
    assert table.schema.metadata[SKIPPED_KEY.encode()] == b"{}"


def test_skipped_entries_of_an_inventory_from_before_they_were_counted() -> None:
    table = take_inventory(ListedStorage(["a.jpg"]), 4)
    old = table.replace_schema_metadata({SKIPPED_NAMES_KEY: "2"})
    assert skipped_entries(old) == {"non_utf8_name": 2}
    assert skipped_entries(table.replace_schema_metadata({})) == {}


def test_reading_with_another_shard_count_says_to_take_the_inventory_again(tmp_path: Path) -> None:
    from normals_pipeline.inventory import InventoryMismatch

    output = LocalStorage(tmp_path)
    write_inventory(output, take_inventory(ListedStorage(["a.jpg"]), 16))
    assert read_inventory(output, 0, 16).num_rows <= 1
    with pytest.raises(InventoryMismatch, match="taken for 16 shards but the pipeline uses 8"):
        read_inventory(output, 0, 8)
