"""Storage: local folder rules (hidden, symlinks, atomic writes, URIs) and S3 over moto's HTTP server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from normals_pipeline.storage import (
    DatasetNotFound,
    FileEntry,
    LocalStorage,
    S3Storage,
    open_storage,
)


def _write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _paths(storage: Any) -> list[str]:
    return storage.listing().paths


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


# --- local ---------------------------------------------------------------------------------


def test_listing_recurses_without_a_stat_and_stat_gives_size_and_version(root: Path) -> None:
    _write(root / "b.jpg", b"12345")
    _write(root / "a" / "z.png")
    _write(root / "a.txt")
    _write(root / "a" / "b" / "c.jpg")
    storage = LocalStorage(root)
    assert set(_paths(storage)) == {"b.jpg", "a/z.png", "a.txt", "a/b/c.jpg"}
    listing = storage.listing()
    assert set(listing.sizes) == set(listing.versions) == {None}
    assert set(storage.listing((".jpg", ".png")).paths) == {"b.jpg", "a/z.png", "a/b/c.jpg"}
    st = (root / "b.jpg").stat()
    assert storage.stat("b.jpg") == FileEntry("b.jpg", 5, f"{st.st_mtime_ns}-5")


def test_hidden_files_and_directories_are_skipped(root: Path) -> None:
    _write(root / ".hidden.jpg")
    _write(root / ".cache" / "x.jpg")
    _write(root / "ok" / ".DS_Store")
    _write(root / "ok" / "y.jpg")
    assert _paths(LocalStorage(root)) == ["ok/y.jpg"]


def test_symlinked_file_inside_root_is_yielded(root: Path) -> None:
    _write(root / "real" / "a.jpg", b"inside")
    (root / "link.jpg").symlink_to(root / "real" / "a.jpg")
    storage = LocalStorage(root)
    assert _paths(storage) == ["link.jpg", "real/a.jpg"]
    assert storage.read_bytes("link.jpg") == b"inside"


def test_symlink_leading_out_of_root_is_neither_listed_nor_read(root: Path, tmp_path: Path) -> None:
    secret = _write(tmp_path / "secret.jpg", b"secret")
    (root / "escape.jpg").symlink_to(secret)
    storage = LocalStorage(root)
    assert _paths(storage) == []
    with pytest.raises(PermissionError, match="outside"):
        storage.read_bytes("escape.jpg")
    assert not storage.exists("escape.jpg")


def test_link_swapped_after_listing_is_not_followed_out(root: Path, tmp_path: Path) -> None:
    _write(root / "a.jpg", b"inside")
    (root / "l.jpg").symlink_to(root / "a.jpg")
    storage = LocalStorage(root)
    assert "l.jpg" in _paths(storage)
    (root / "l.jpg").unlink()
    (root / "l.jpg").symlink_to(_write(tmp_path / "secret.jpg", b"secret"))
    with pytest.raises(PermissionError):
        storage.read_bytes("l.jpg")


def test_symlinked_directory_is_not_followed(root: Path, tmp_path: Path) -> None:
    _write(tmp_path / "elsewhere" / "a.jpg")
    _write(root / "own" / "b.jpg")
    (root / "outdir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    assert _paths(LocalStorage(root)) == ["own/b.jpg"]


def test_broken_symlink_is_skipped(root: Path) -> None:
    (root / "broken.jpg").symlink_to(root / "missing.jpg")
    assert _paths(LocalStorage(root)) == []


@pytest.mark.parametrize("bad", ["../x.jpg", "a/../../x.jpg", "/etc/passwd", ""])
def test_traversal_and_absolute_paths_are_refused(root: Path, bad: str) -> None:
    storage = LocalStorage(root)
    for call in (storage.read_bytes, storage.exists, storage.uri_for, lambda p: storage.write_bytes(p, b"")):
        with pytest.raises(ValueError):
            call(bad)


def test_atomic_write_creates_parents_and_leaves_no_temp_files(root: Path) -> None:
    storage = LocalStorage(root)
    storage.write_bytes("out/deep/n.png", b"first")
    storage.write_bytes("out/deep/n.png", b"second", content_type="image/png")
    assert storage.read_bytes("out/deep/n.png") == b"second"
    assert storage.exists("out/deep/n.png")
    assert os.listdir(root / "out" / "deep") == ["n.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert (root / "out" / "deep" / "n.png").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_cleans_up_temp_file(root: Path) -> None:
    (root / "target").mkdir()  # os.replace onto a directory fails after the temp file exists
    with pytest.raises(OSError):
        LocalStorage(root).write_bytes("target", b"data")
    assert os.listdir(root) == ["target"]


def test_write_through_symlinked_dir_out_of_root_is_refused(root: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (root / "out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(PermissionError):
        LocalStorage(root).write_bytes("out/x.bin", b"data")
    assert os.listdir(tmp_path / "elsewhere") == []


@pytest.mark.parametrize("name", ["with space.jpg", "ünïcødé/日本語 é.png", "per%cent#hash?.jpg"])
def test_uri_for_round_trips_unusual_names(root: Path, name: str) -> None:
    _write(root / name, b"data")
    storage = LocalStorage(root)
    uri = storage.uri_for(name)
    assert uri == (root / name).as_uri()
    assert uri.isascii()
    base = name.rpartition("/")[2]
    reopened = open_storage(uri.rpartition("/")[0])
    assert reopened.read_bytes(base) == b"data"
    assert open_storage(storage.uri).read_bytes(name) == b"data"
    assert name in _paths(storage)


def test_list_prefix_returns_root_relative_paths(root: Path) -> None:
    storage = LocalStorage(root)
    storage.write_bytes("manifests/b.json", b"{}")
    storage.write_bytes("manifests/sub/a.json", b"{}")
    _write(root / "manifests" / ".tmp-partial")
    _write(root / "other.json")
    assert storage.list_prefix("manifests") == ["manifests/b.json", "manifests/sub/a.json"]
    assert storage.list_prefix("manifests/") == storage.list_prefix("manifests")
    assert storage.list_prefix("absent") == []


def test_missing_or_non_directory_root_raises_dataset_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="nope"):
        LocalStorage(tmp_path / "nope").listing()
    with pytest.raises(DatasetNotFound):
        LocalStorage(_write(tmp_path / "file")).listing()
    assert issubclass(DatasetNotFound, FileNotFoundError)


def test_open_storage_accepts_paths_and_rejects_unknown_schemes(root: Path, s3_client: Any) -> None:
    assert isinstance(open_storage(str(root)), LocalStorage)
    assert open_storage(root.as_uri()).uri == root.as_uri()
    s3 = open_storage("s3://bucket/some/prefix/", s3_client=s3_client)
    assert isinstance(s3, S3Storage)
    assert (s3.uri, s3.uri_for("a.jpg")) == ("s3://bucket/some/prefix", "s3://bucket/some/prefix/a.jpg")
    assert open_storage("s3://bucket", s3_client=s3_client).uri_for("a.jpg") == "s3://bucket/a.jpg"
    with pytest.raises(ValueError, match="unsupported storage URI scheme 'gs'"):
        open_storage("gs://bucket/x")
    with pytest.raises(ValueError, match="no bucket"):
        open_storage("s3:///x", s3_client=s3_client)


# --- S3 (moto server over HTTP) -----------------------------------------------------------


def test_s3_listing_paginates_and_skips_hidden_and_markers(s3_client: Any, s3_bucket: str) -> None:
    keys = [f"ds/img{i:02d}.jpg" for i in range(7)] + ["ds/sub/deep.png"]
    for key in keys + ["ds/.hidden.jpg", "ds/.cache/x.jpg", "ds/sub/", "outside.jpg", "ds2/x.jpg"]:
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=b"abc")
    calls: list[str] = []
    s3_client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append("list"))
    storage = S3Storage(s3_bucket, "ds", s3_client, page_size=2)
    listing = storage.listing()
    assert len(calls) >= 6  # 12 keys under ds/, two per page
    assert listing.paths == [k.removeprefix("ds/") for k in keys]
    head = s3_client.head_object(Bucket=s3_bucket, Key="ds/img00.jpg")
    assert (listing.sizes[0], listing.versions[0]) == (3, head["ETag"].strip('"'))


def test_s3_write_read_exists_round_trip(s3_client: Any, s3_bucket: str) -> None:
    storage = S3Storage(s3_bucket, "out/", s3_client)
    assert not storage.exists("normals/a.png")
    storage.write_bytes("normals/a.png", b"\x89PNG", content_type="image/png")
    assert storage.exists("normals/a.png")
    assert storage.read_bytes("normals/a.png") == b"\x89PNG"
    head = s3_client.head_object(Bucket=s3_bucket, Key="out/normals/a.png")
    assert head["ContentType"] == "image/png"
    assert storage.list_prefix("normals") == ["normals/a.png"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("normals/missing.png")
    with pytest.raises(ValueError):
        storage.read_bytes("../escape.png")


def test_s3_missing_bucket_raises_dataset_not_found(s3_client: Any) -> None:
    storage = S3Storage("no-such-bucket-here", "", s3_client)
    with pytest.raises(DatasetNotFound, match="s3://no-such-bucket-here"):
        storage.listing()


def test_open_storage_without_client_uses_standard_aws_env(s3_client: Any, s3_bucket: str) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="p/a.jpg", Body=b"abc")
    assert _paths(open_storage(f"s3://{s3_bucket}/p")) == ["a.jpg"]


def test_s3_stat_gives_size_and_etag(s3_client: Any, s3_bucket: str) -> None:
    storage = S3Storage(s3_bucket, "p", s3_client)
    storage.write_bytes("x.jpg", b"12345")
    entry = storage.stat("x.jpg")
    assert (entry.path, entry.size) == ("x.jpg", 5) and entry.version
    with pytest.raises(FileNotFoundError):
        storage.stat("missing.jpg")
