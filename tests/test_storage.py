"""Storage: local folder rules (hidden, symlinks, atomic writes, URIs) and S3 over moto's HTTP server."""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from normals_pipeline.enrich import MAX_IN_FLIGHT
from normals_pipeline.plan import REMOTE_READERS
from normals_pipeline.storage import (
    EXPECT_FROM_BYTES,
    S3_CONNECTIONS,
    SKIP_REASONS,
    DatasetNotFound,
    FileEntry,
    LocalStorage,
    NotARegularFile,
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


@pytest.fixture
def bind_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], None]]:
    """Bind a unix socket at a path (relative to its folder: tmp paths can exceed the 108-byte limit)."""
    sockets: list[socket.socket] = []

    def bind(path: Path) -> None:
        monkeypatch.chdir(path.parent)
        sock = socket.socket(socket.AF_UNIX)
        sockets.append(sock)
        sock.bind(path.name)

    yield bind
    for sock in sockets:
        sock.close()


def _promptly(call: Callable[[], Any], fifo: Path | None = None) -> Any:
    """`call()`, failing (not hanging the suite) if it has not returned within 5 s. A call stuck opening
    `fifo` is released by opening the FIFO's other end, so its thread never outlives the test."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(call)
        try:
            return future.result(timeout=5)
        except concurrent.futures.TimeoutError:
            if fifo is not None:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a reader is blocked in open: let it go
            pytest.fail(f"{call} blocked for 5 s")


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


def test_stat_many_answers_as_stat_does_for_every_kind_of_name(root: Path, tmp_path: Path) -> None:
    """The batch form takes a shortcut for plain files (one realpath per folder): every other name, a folder
    swapped for a link out included, must still get `stat`'s own answer or error."""
    _write(root / "a" / "plain.jpg", b"12345")
    _write(root / "a" / "real.jpg", b"inside")
    (root / "a" / "link.jpg").symlink_to(root / "a" / "real.jpg")
    (root / "a" / "out.jpg").symlink_to(_write(tmp_path / "secret.jpg", b"secret"))
    (root / "a" / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    os.mkfifo(root / "a" / "pipe.jpg")
    _write(tmp_path / "elsewhere" / "b.jpg")
    (root / "swapped").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    storage = LocalStorage(root)
    names = ["a/plain.jpg", "a/link.jpg", "a/out.jpg", "a/dangling.jpg", "a/pipe.jpg", "a/gone.jpg", "swapped/b.jpg"]

    def one(path: str) -> object:
        try:
            return storage.stat(path)
        except OSError as error:
            return (type(error), str(error))

    many = [found if isinstance(found, FileEntry) else (type(found), str(found)) for found in storage.stat_many(names)]
    assert many == [one(path) for path in names]
    assert isinstance(many[0], FileEntry) and many[0].size == 5
    assert many[-1][0] is PermissionError


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


def test_listing_skips_and_counts_what_is_not_a_regular_file(
    root: Path, tmp_path: Path, bind_socket: Callable[[Path], None]
) -> None:
    _write(root / "fine.jpg")
    _write(root / "sub" / "also.png")
    (root / "in.jpg").symlink_to(root / "fine.jpg")  # a link to a regular file inside: kept
    os.mkfifo(root / "fifo.jpg")
    os.mkfifo(root / "sub" / "pipe.PNG")
    bind_socket(root / "sock.webp")
    (root / "a.jpg").symlink_to("b.jpg")
    (root / "b.jpg").symlink_to("a.jpg")
    (root / "self.jpg").symlink_to("self.jpg")
    (root / "out.jpg").symlink_to(_write(tmp_path / "secret.jpg"))
    (root / "null.jpg").symlink_to("/dev/null")  # a device, but outside the root
    (root / "broken.jpg").symlink_to("missing.jpg")
    (root / "dir.jpg").symlink_to(root / "sub", target_is_directory=True)
    (root / "to-fifo.jpg").symlink_to("fifo.jpg")  # inside, but to a FIFO: counted as what it leads to
    os.mkfifo(root / "notes.fifo")  # not an image name: not counted when only images are listed
    os.mkfifo(root / ".hidden.jpg")  # hidden: neither listed nor counted
    storage = LocalStorage(root)

    listing = _promptly(lambda: storage.listing((".jpg", ".png", ".webp")))
    assert sorted(listing.paths) == ["fine.jpg", "in.jpg", "sub/also.png"]
    assert listing.skipped == {
        "fifo": 3,
        "socket": 1,
        "symlink_loop": 3,
        "symlink_outside": 2,
        "broken_symlink": 1,
        "not_a_file": 1,
    }
    assert set(listing.skipped) <= set(SKIP_REASONS)
    everything = _promptly(storage.listing)
    assert sorted(everything.paths) == ["fine.jpg", "in.jpg", "sub/also.png"]
    assert everything.skipped["fifo"] == 4
    assert _promptly(lambda: storage.list_prefix("sub")) == ["sub/also.png"]


def test_device_files_are_skipped_and_counted(root: Path) -> None:
    try:
        os.mknod(root / "char.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # what /dev/null is
        os.mknod(root / "block.jpg", stat.S_IFBLK | 0o600, os.makedev(7, 0))  # what /dev/loop0 is
    except PermissionError:
        pytest.skip("creating device files needs CAP_MKNOD")
    storage = LocalStorage(root)
    listing = storage.listing((".jpg",))
    assert (listing.paths, dict(listing.skipped)) == ([], {"device": 2})
    with pytest.raises(NotARegularFile, match="'char.jpg'.* character device"):
        _promptly(lambda: storage.read_bytes("char.jpg"))
    with pytest.raises(NotARegularFile, match="'block.jpg'.* block device"):
        storage.stat("block.jpg")


def test_listing_of_regular_files_skips_nothing(root: Path) -> None:
    _write(root / "a.jpg")
    assert LocalStorage(root).listing().skipped == {}


def test_read_bytes_of_a_fifo_fails_at_once_instead_of_blocking(root: Path) -> None:
    os.mkfifo(root / "fifo.jpg")  # no writer: a plain open() for reading would wait for one forever
    storage = LocalStorage(root)
    with pytest.raises(NotARegularFile, match=r"'fifo.jpg'.* is a FIFO, not a regular file") as info:
        _promptly(lambda: storage.read_bytes("fifo.jpg"), root / "fifo.jpg")
    assert isinstance(info.value, OSError)  # the shard turns it into an `unreadable_file` row
    assert (info.value.path, info.value.kind) == ("fifo.jpg", "FIFO")
    with pytest.raises(NotARegularFile, match="FIFO"):
        storage.stat("fifo.jpg")
    assert not storage.exists("fifo.jpg")


def test_file_swapped_for_a_fifo_or_socket_after_listing_is_refused(
    root: Path, bind_socket: Callable[[Path], None]
) -> None:
    _write(root / "a.jpg", b"first")
    _write(root / "b.jpg", b"second")
    storage = LocalStorage(root)
    assert sorted(storage.listing().paths) == ["a.jpg", "b.jpg"]
    (root / "a.jpg").unlink()
    os.mkfifo(root / "a.jpg")
    (root / "b.jpg").unlink()
    bind_socket(root / "b.jpg")
    for path, kind in [("a.jpg", "FIFO"), ("b.jpg", "socket")]:
        with pytest.raises(NotARegularFile, match=f"'{path}'.* is a {kind}"):
            _promptly(lambda path=path: storage.read_bytes(path), root / "a.jpg")
        with pytest.raises(NotARegularFile, match=f"is a {kind}"):
            storage.stat(path)


def test_a_name_swapped_for_a_link_that_leads_nowhere_is_refused_not_gone(root: Path, tmp_path: Path) -> None:
    """Only a name that is gone is FileNotFoundError (the shard leaves it out); a name still there that
    leads to no readable file is refused with what it is, so the shard gives it a row."""
    for name in ("dangling.jpg", "loop.jpg", "dir.jpg", "out.jpg", "gone.jpg", "in.jpg"):
        _write(root / name)
    storage = LocalStorage(root)
    assert len(storage.listing().paths) == 6
    for name in ("dangling.jpg", "loop.jpg", "dir.jpg", "out.jpg", "gone.jpg", "in.jpg"):
        (root / name).unlink()
    (root / "dangling.jpg").symlink_to("missing.jpg")
    (root / "loop.jpg").symlink_to("loop.jpg")
    (root / "dir.jpg").symlink_to(_write(root / "sub" / "a.jpg").parent, target_is_directory=True)
    (root / "out.jpg").symlink_to(_write(tmp_path / "secret.jpg", b"secret"))
    (root / "in.jpg").symlink_to("sub/a.jpg")  # a link to a regular file inside: read, as the listing keeps it
    for call in (storage.stat, storage.read_bytes):
        for name, kind in [("dangling.jpg", "broken symlink"), ("loop.jpg", "symlink loop"), ("dir.jpg", "directory")]:
            with pytest.raises(NotARegularFile, match=f"'{name}'.* is a {kind}, not a regular file"):
                call(name)
        with pytest.raises(PermissionError, match="outside"):
            call("out.jpg")
        with pytest.raises(FileNotFoundError):
            call("gone.jpg")
    assert storage.read_bytes("in.jpg") == b"x"


@pytest.mark.parametrize("kind", ["FIFO", "socket"])
def test_swap_between_the_check_and_the_open_is_caught_after_the_open(
    root: Path, kind: str, monkeypatch: pytest.MonkeyPatch, bind_socket: Callable[[Path], None]
) -> None:
    if kind == "FIFO":
        os.mkfifo(root / "x.jpg")
    else:
        bind_socket(root / "x.jpg")
    check = LocalStorage._regular
    checks: list[str] = []

    def passes_once(path: str, real: str) -> Any:  # as if a regular file was there at the check
        checks.append(path)
        return None if len(checks) == 1 else check(path, real)

    monkeypatch.setattr(LocalStorage, "_regular", staticmethod(passes_once))
    with pytest.raises(NotARegularFile, match=f"'x.jpg'.* is a {kind}"):
        _promptly(lambda: LocalStorage(root).read_bytes("x.jpg"), root / "x.jpg")


def test_read_bytes_reads_a_large_regular_file_whole(root: Path) -> None:
    data = os.urandom(3 << 20)  # more than one read() chunk: O_NONBLOCK must not cut it short
    _write(root / "big.png", data)
    assert LocalStorage(root).read_bytes("big.png") == data


def test_directory_is_not_a_regular_file(root: Path) -> None:
    _write(root / "sub.jpg" / "x.jpg")
    storage = LocalStorage(root)
    for call in (storage.stat, storage.read_bytes):
        with pytest.raises(NotARegularFile, match="'sub.jpg'.* is a directory"):
            call("sub.jpg")


def test_not_a_regular_file_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(NotARegularFile("a/b.jpg", "FIFO")))
    assert (type(error), error.path, error.kind, str(error)) == (
        NotARegularFile,
        "a/b.jpg",
        "FIFO",
        "refusing 'a/b.jpg': it is a FIFO, not a regular file",
    )


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


def test_create_if_absent_writes_once_whole_and_leaves_no_temp_files(root: Path) -> None:
    storage = LocalStorage(root)
    assert storage.create_if_absent("owner/lease.json", b"first")
    assert not storage.create_if_absent("owner/lease.json", b"second")
    assert storage.read_bytes("owner/lease.json") == b"first" and os.listdir(root / "owner") == ["lease.json"]


def test_of_writers_racing_to_create_one_file_one_wins(root: Path) -> None:
    storage, start, won = LocalStorage(root), threading.Barrier(8), []

    def race(index: int) -> None:
        start.wait()
        if storage.create_if_absent("lease.json", str(index).encode()):
            won.append(index)

    threads = [threading.Thread(target=race, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and storage.read_bytes("lease.json") == str(won[0]).encode()
    assert os.listdir(root) == ["lease.json"]


def test_s3_create_if_absent_is_a_conditional_put(s3_client: Any, s3_bucket: str) -> None:
    storage = S3Storage(s3_bucket, "out", s3_client)
    assert storage.create_if_absent("owner/lease.json", b"first", "application/json")
    assert not storage.create_if_absent("owner/lease.json", b"second")
    assert storage.read_bytes("owner/lease.json") == b"first"
    assert s3_client.head_object(Bucket=s3_bucket, Key="out/owner/lease.json")["ContentType"] == "application/json"


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
    assert listing.skipped == {}


def test_s3_keys_with_empty_or_dot_parts_are_not_listed_but_counted(s3_client: Any, s3_bucket: str) -> None:
    """No path names them as they are ('//double.png' would read as absolute; 'x/../y.webp' as 'y.webp'):
    left out and counted by reason, those with a wanted name only, like a local folder's FIFOs."""
    keys = ["ds//double.png", "ds/a//b.JPG", "ds/./a.png", "ds/x/../y.webp", "ds/..", "ds/./n.txt", "ds/ok.jpg"]
    for key in [*keys, "ds/x/.hidden/../h.png"]:
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=b"abc")
    storage = S3Storage(s3_bucket, "ds", s3_client)
    listing = storage.listing((".jpg", ".png", ".webp"))
    assert (listing.paths, dict(listing.skipped)) == (["ok.jpg"], {"empty_part": 2, "dot_part": 2})
    assert set(listing.skipped) <= set(SKIP_REASONS)
    assert storage.listing().skipped == {"empty_part": 2, "dot_part": 4}
    assert storage.list_prefix("") == ["ok.jpg"]


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


def test_s3_delete_many_is_one_request_per_thousand_keys_and_skips_missing_ones(
    s3_client: Any, s3_bucket: str, s3_requests: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = S3Storage(s3_bucket, "out/", s3_client)
    for i in range(5):
        storage.write_bytes(f"journal/{i}.jsonl", b"{}")
    storage.write_bytes("journal/kept.jsonl", b"{}")
    monkeypatch.setattr("normals_pipeline.storage.DELETE_BATCH", 2)  # three requests for five names
    s3_requests.clear()
    storage.delete_many([f"journal/{i}.jsonl" for i in range(4)] + ["journal/never-there.jsonl"])
    assert [method for method, _ in s3_requests] == ["POST"] * 3
    assert storage.list_prefix("journal") == ["journal/4.jsonl", "journal/kept.jsonl"]
    s3_requests.clear()
    storage.delete_many([])
    assert s3_requests == []


def test_s3_delete_many_names_a_key_s3_would_not_delete(s3_client: Any, s3_bucket: str) -> None:
    class Refusing:
        def __getattr__(self, name: str) -> Any:
            return getattr(s3_client, name)

        def delete_objects(self, **kwargs: Any) -> dict:
            return {"Errors": [{"Key": "out/j/1", "Code": "AccessDenied", "Message": "Access Denied"}]}

    with pytest.raises(OSError, match=r"did not delete 1 of 2 objects.*out/j/1: AccessDenied"):
        S3Storage(s3_bucket, "out/", Refusing()).delete_many(["j/1", "j/2"])


def test_s3_delete_many_deletes_each_key_where_the_store_has_no_deleteobjects(
    s3_client: Any, s3_bucket: str, s3_requests: list[tuple[str, str]]
) -> None:
    from botocore.exceptions import ClientError

    class WithoutDeleteObjects:
        def __getattr__(self, name: str) -> Any:
            return getattr(s3_client, name)

        def delete_objects(self, **kwargs: Any) -> dict:
            raise ClientError({"Error": {"Code": "NotImplemented", "Message": "no"}}, "DeleteObjects")

    storage = S3Storage(s3_bucket, "out/", WithoutDeleteObjects())
    storage.write_bytes("j/1", b"1")
    storage.write_bytes("j/2", b"2")
    s3_requests.clear()
    storage.delete_many(["j/1", "j/2"])
    assert [method for method, _ in s3_requests] == ["DELETE", "DELETE"]
    assert storage.list_prefix("j") == []


def test_local_delete_many_deletes_each_and_skips_missing_ones(root: Path) -> None:
    storage = LocalStorage(root)
    storage.write_bytes("j/1", b"1")
    storage.write_bytes("j/2", b"2")
    storage.delete_many(["j/1", "j/2", "j/3"])
    assert storage.list_prefix("j") == []


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


def test_a_file_uri_reads_as_the_path_to_paste_and_other_uris_stay():
    from normals_pipeline.storage import readable_location

    assert (
        readable_location("file:///data/en%20riched/partition%3D01/m.parquet")
        == "/data/en riched/partition=01/m.parquet"
    )
    assert readable_location("s3://bucket/partition=01/m.parquet") == "s3://bucket/partition=01/m.parquet"


def test_s3_small_writes_go_without_waiting_for_100_continue(
    s3_client: Any, s3_bucket: str, s3_expects: list[tuple[str, str | None]]
) -> None:
    """A map or a journal file is one round trip, not two; a body of `EXPECT_FROM_BYTES` or more still asks first."""
    storage = S3Storage(s3_bucket, "out", s3_client)
    S3Storage(s3_bucket, "other", s3_client)  # another prefix on the same client: the handler is there once
    storage.write_bytes("normals/ab/map.jpg", b"\xff\xd8" + b"x" * 50_000, "image/jpeg")
    storage.create_if_absent("owner/lease-1.json", b"{}")
    storage.write_bytes("big.bin", b"x" * EXPECT_FROM_BYTES)
    assert s3_expects == [
        (f"/{s3_bucket}/out/normals/ab/map.jpg", None),
        (f"/{s3_bucket}/out/owner/lease-1.json", None),
        (f"/{s3_bucket}/out/big.bin", "100-continue"),
    ]
    assert storage.read_bytes("big.bin") == b"x" * EXPECT_FROM_BYTES


@pytest.mark.parametrize("made_by", ["open_storage", "S3Settings"])
def test_an_s3_client_of_the_pipeline_keeps_a_connection_for_each_request_a_run_makes_at_once(
    s3_endpoint: str, s3_bucket: str, made_by: str
) -> None:
    """botocore keeps 10 connections; a run makes up to 64 requests at once (images in flight), and each past the
    10 would open a connection (on S3 a TLS handshake) and close it after. (moto's test server closes every
    connection, so the pool's reuse is seen in the bench's S3 stand-in, not here.)"""
    uri = f"s3://{s3_bucket}/out"
    if made_by == "open_storage":
        storage = open_storage(uri)
    else:
        from normals_pipeline.orchestration.resources import DatasetResource, S3Settings

        storage = DatasetResource(dataset_uri=uri, output_uri=uri, s3=S3Settings(endpoint_url=s3_endpoint)).output()
    assert storage.client.meta.config.max_pool_connections == S3_CONNECTIONS >= MAX_IN_FLIGHT + REMOTE_READERS
    storage.write_bytes("normals/a.jpg", b"map")
    assert storage.read_bytes("normals/a.jpg") == b"map"


@pytest.fixture(params=["local", "s3"])
def either_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "local":
        return LocalStorage(tmp_path / "out")
    return S3Storage(request.getfixturevalue("s3_bucket"), "out", request.getfixturevalue("s3_client"))


def test_a_streamed_write_stores_what_was_written_in_pieces(either_store: Any) -> None:
    """A training part is written straight from its table, never held whole as bytes."""

    def write(file: Any) -> None:
        for piece in (b"PAR1", b"x" * 3_000_000, b"PAR1"):
            file.write(piece)

    either_store.write_stream("training/part-00000.parquet", write, "application/vnd.apache.parquet")
    assert either_store.read_bytes("training/part-00000.parquet") == b"PAR1" + b"x" * 3_000_000 + b"PAR1"


def test_a_streamed_write_that_fails_leaves_nothing(either_store: Any) -> None:
    either_store.write_bytes("training/part-00000.parquet", b"the last build's")

    def write(file: Any) -> None:
        file.write(b"half a part")
        raise OSError("the table could not be written")

    with pytest.raises(OSError, match="could not be written"):
        either_store.write_stream("training/part-00000.parquet", write)
    assert either_store.read_bytes("training/part-00000.parquet") == b"the last build's"
    assert either_store.list_prefix("training") == ["training/part-00000.parquet"]
