"""One interface over a local folder and an S3 prefix.

Every path handed in or out is relative to the storage root and '/'-separated, so
the rest of the pipeline never cares where the dataset lives.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, Protocol

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

# Files written through mkstemp are 0600; give them the mode a plain open() would.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
# The resolved final component must not turn into a link (O_NOFOLLOW); a FIFO must not block the open until
# a writer comes (O_NONBLOCK: cleared again once fstat has shown a regular file); a tty must not become ours.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY

# Why a local listing left out an entry with a wanted name (`Listing.skipped`).
SKIP_REASONS = (
    "fifo",
    "socket",
    "device",  # character or block
    "symlink_loop",
    "symlink_outside",  # resolves outside the root
    "broken_symlink",
    "not_a_file",  # a link to a directory (or to anything else that is not a regular file)
    "empty_part",  # an S3 key with an empty part below the prefix: 'pre//a.png', 'pre/a//b.png'
    "dot_part",  # an S3 key with a '.' or '..' part: 'pre/./a.png', 'pre/x/../y.webp'
)


class DatasetNotFound(FileNotFoundError):
    """The dataset root (local folder or S3 bucket) does not exist."""


class NotARegularFile(OSError):
    """A dataset path is a FIFO, socket, device or directory: it is never read (a FIFO would block)."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"refusing {path!r}: it is a {kind}, not a regular file")
        self.path = path
        self.kind = kind  # "FIFO", "socket", "character device", "block device", "directory", ...

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (e.g. across processes) with its own signature
        return type(self), (self.path, self.kind)


# A non-regular file's mode test, what it is called in messages, and its `Listing.skipped` reason.
_NOT_REGULAR = (
    (stat.S_ISFIFO, "FIFO", "fifo"),
    (stat.S_ISSOCK, "socket", "socket"),
    (stat.S_ISCHR, "character device", "device"),
    (stat.S_ISBLK, "block device", "device"),
    (stat.S_ISDIR, "directory", "not_a_file"),
    (stat.S_ISLNK, "symlink", "not_a_file"),
)


def _kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    return next((kind for test, kind, _ in _NOT_REGULAR if test(mode)), "special file")


def _skip_reason(mode: int) -> str:
    """The `Listing.skipped` reason for a non-regular file's mode."""
    return next((reason for test, _, reason in _NOT_REGULAR if test(mode)), "not_a_file")


class FileEntry(NamedTuple):
    path: str  # relative to the root, '/'-separated
    size: int | None  # None where listing does not give it for free (a local folder): see `stat`
    version: str | None  # local: f"{mtime_ns}-{size}"; S3: the ETag without quotes


class Listing(NamedTuple):
    """Files under a root, as columns: a listing of 100 000 files makes no object per file."""

    paths: list[str]
    sizes: list[int | None]
    versions: list[str | None]
    # Entries with a wanted name that were left out, by reason (see SKIP_REASONS); only reasons that
    # occurred. On S3 only keys with an empty or dot part.
    skipped: Mapping[str, int] = MappingProxyType({})


class Storage(Protocol):
    uri: str

    def listing(self, suffixes: tuple[str, ...] | None = None) -> Listing: ...
    def stat(self, path: str) -> FileEntry: ...
    def stat_many(self, paths: list[str]) -> list[FileEntry | OSError]: ...
    def read_bytes(self, path: str) -> bytes: ...
    def write_bytes(self, path: str, data: bytes, content_type: str | None = None) -> None: ...
    # What `write` writes to the file it is given, stored as one object, without all of it in memory at once.
    def write_stream(self, path: str, write: Callable[[BinaryIO], None], content_type: str | None = None) -> None: ...
    def create_if_absent(self, path: str, data: bytes, content_type: str | None = None) -> bool: ...
    def exists(self, path: str) -> bool: ...
    def uri_for(self, path: str) -> str: ...
    def list_prefix(self, prefix: str) -> list[str]: ...
    def delete(self, path: str) -> None: ...  # a missing file is not an error
    def delete_many(self, paths: list[str]) -> None: ...  # `delete` of each, in as few requests as the store has


def _check_relative(path: str) -> None:
    """Refuse paths that could address something outside the root."""
    if not path or posixpath.isabs(path) or os.path.isabs(path):
        raise ValueError(f"expected a non-empty relative path, got {path!r}")
    if ".." in path.split("/"):
        raise ValueError(f"path {path!r} must not contain '..'")


def path_problem(path: str) -> str | None:
    """Why `path` is no dataset path, as a `Listing.skipped` reason: an empty part (it would read as absolute,
    '/a.png', or lose its '//'), or a '.' or '..' part (readers that resolve it find another file, or one
    outside the root); None for a path every reader takes as it is. S3 keys can have such parts, a local
    folder's names cannot."""
    parts = path.split("/")
    if "" in parts:
        return "empty_part"
    if "." in parts or ".." in parts:
        return "dot_part"
    return None


def _normalise_prefix(prefix: str) -> str:
    """'' for the root, else 'a/b/' (validated, exactly one trailing slash)."""
    prefix = prefix.strip("/")
    if prefix:
        _check_relative(prefix)
        prefix += "/"
    return prefix


class LocalStorage:
    """A dataset folder; reads never leave the folder, even through symlinks."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(os.path.abspath(root))
        self.uri = self.root.as_uri()
        self._top = str(self.root)
        self._real_root = os.path.realpath(self._top)
        self._real_prefix = self._real_root.rstrip(os.sep) + os.sep

    def listing(self, suffixes: tuple[str, ...] | None = None) -> Listing:
        """Files under the root (those whose lower-cased name ends with one of `suffixes`, if given).

        No stat per file, so sizes and versions are None: listing 100 000 files stays within a small
        factor of a bare `os.scandir` walk, and the shard that reads a file stats it then. FIFOs,
        sockets, devices and symlinks that loop, dangle, lead out of the root or to a directory are
        left out and counted in `skipped` (only those with a wanted name).
        """
        if not os.path.isdir(self._top):
            raise DatasetNotFound(f"dataset not found: {self.uri} is not a directory")
        skipped: dict[str, int] = {}
        paths = self._paths(self._top, "", suffixes, skipped)
        return Listing(paths, [None] * len(paths), [None] * len(paths), skipped)

    def stat(self, path: str) -> FileEntry:
        """Size and version of a regular file; for anything else, what `_resolved` raises (it would not be read)."""
        st = self._resolved(path)[1]
        return FileEntry(path, st.st_size, f"{st.st_mtime_ns}-{st.st_size}")

    def stat_many(self, paths: list[str]) -> list[FileEntry | OSError]:
        """`stat` of each path, or the error it raises, in order: the same answers for a fraction of the cost at
        100 000 files (a realpath per folder, resolved in this call, instead of one per file; a name that is not
        a plain regular file, or a folder that leads out, goes the long way)."""
        folders: dict[str, str] = {}
        found: list[FileEntry | OSError] = []
        for path in paths:
            try:
                found.append(self._quick_stat(path, folders))
            except OSError as error:
                found.append(error)
        return found

    def _quick_stat(self, path: str, folders: dict[str, str]) -> FileEntry:
        """`stat`, where the name itself is no link: then it resolves to its folder's real path and its name."""
        folder, _, name = path.rpartition("/")
        if not name or name == ".." or path[0] == "/":
            return self.stat(path)  # which refuses it
        if (real_folder := folders.get(folder)) is None:
            real_folder = folders[folder] = os.path.realpath(self._join(folder) if folder else self._top)
        try:
            st = os.lstat(os.path.join(self._top, path))
        except OSError:
            return self.stat(path)
        if not stat.S_ISREG(st.st_mode) or not self._inside(os.path.join(real_folder, name)):
            return self.stat(path)
        return FileEntry(path, st.st_size, f"{st.st_mtime_ns}-{st.st_size}")

    def read_bytes(self, path: str) -> bytes:
        """The whole file; never opens what is not a regular file, and never blocks on one swapped in
        between that check and the open (a FIFO): NotARegularFile instead."""
        real = self._resolved(path)[0]  # a FIFO or device is refused before any open (opening one can act)
        try:
            fd = os.open(real, _READ_FLAGS)
        except OSError as err:
            if err.errno == errno.ENXIO:  # opening a unix socket, swapped in since the check
                self._regular(path, real)
            raise
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise NotARegularFile(path, _kind(mode))
            os.set_blocking(fd, True)  # a plain read from here on, whatever the file system does with O_NONBLOCK
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            return f.read()

    def write_bytes(self, path: str, data: bytes, content_type: str | None = None) -> None:
        """Write via a temp file + rename so readers never see a partial file."""
        self.write_stream(path, lambda file: file.write(data), content_type)

    def write_stream(self, path: str, write: Callable[[BinaryIO], None], content_type: str | None = None) -> None:
        """As `write_bytes`: `write` fills the temp file, then it is synced and renamed into place."""
        target = self._join(path)
        tmp = self._staged(path, target, write)
        try:
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def create_if_absent(self, path: str, data: bytes, content_type: str | None = None) -> bool:
        """Write `path` only if nothing is there; False if something was. Of writers racing on any hosts one
        wins: a hard link of a complete temp file is atomic (local file systems, NFS) and, unlike an `O_EXCL`
        create followed by the write, never shows a reader a file still being written."""
        target = self._join(path)
        tmp = self._staged(path, target, lambda file: file.write(data))
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def _staged(self, path: str, target: str, write: Callable[[BinaryIO], None]) -> str:
        """What `write` writes, in a complete, synced temp file beside `target` (a hidden name no listing shows)."""
        parent = os.path.dirname(target)
        if not self._inside(os.path.realpath(parent)):
            raise PermissionError(f"refusing to write {path!r}: its folder resolves outside {self.uri}")
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fchmod(f.fileno(), _FILE_MODE)
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp

    def exists(self, path: str) -> bool:
        """Whether a regular file inside the root is there. Most asked-for names (a map not stored yet) are not:
        one stat says so; only a name that is there is resolved (a link may lead out), a stat per folder."""
        if not os.path.isfile(self._join(path)):
            return False
        try:
            return os.path.isfile(self._contained(path))
        except PermissionError:
            return False

    def uri_for(self, path: str) -> str:
        return Path(self._join(path)).as_uri()

    def list_prefix(self, prefix: str) -> list[str]:
        prefix = _normalise_prefix(prefix)
        top = os.path.join(self._top, prefix) if prefix else self._top
        if not os.path.isdir(top) or not self._inside(os.path.realpath(top)):
            return []
        return sorted(self._paths(top, prefix, None, {}))

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._contained(path))

    def delete_many(self, paths: list[str]) -> None:
        for path in paths:
            self.delete(path)

    def _join(self, path: str) -> str:
        _check_relative(path)
        return os.path.join(self._top, path)

    def _inside(self, real: str) -> bool:
        return real == self._real_root or real.startswith(self._real_prefix)

    def _contained(self, path: str) -> str:
        """Resolve now (not at listing time), so a link swapped since cannot lead out."""
        real = os.path.realpath(self._join(path))
        if not self._inside(real):
            raise PermissionError(f"refusing {path!r}: it resolves to {real}, outside {self.uri}")
        return real

    def _resolved(self, path: str) -> tuple[str, os.stat_result]:
        """Where `path` leads now and its stat, if that is a regular file inside the root. Only a name that is
        gone raises FileNotFoundError: one still there that leads nowhere readable (a FIFO, a directory, a
        link that dangles or loops, swapped in since the listing) is NotARegularFile, a link out of the root
        PermissionError, so the shard gives it a row instead of leaving it out."""
        real = self._contained(path)
        try:
            return real, self._regular(path, real)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise NotARegularFile(path, "symlink loop") from None
            if isinstance(err, FileNotFoundError) and os.path.lexists(self._join(path)):
                raise NotARegularFile(path, "broken symlink") from None
            raise

    @staticmethod
    def _regular(path: str, real: str) -> os.stat_result:
        """`real`'s stat if it is a regular file, else NotARegularFile naming `path` and what it is."""
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(path, _kind(st.st_mode))
        return st

    def _skip_reason(self, entry: os.DirEntry[str]) -> str | None:
        """Why an entry that is not a plain regular file is left out: None to keep it after all (a link
        to a regular file inside the root), "" when it is gone (neither kept nor counted). Only reached
        off the fast path: costs a stat or two, and a realpath for a link."""
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except FileNotFoundError:  # removed while we walk
            return ""
        if stat.S_ISREG(mode):  # became a regular file since the directory was read
            return None
        if not stat.S_ISLNK(mode):
            return _skip_reason(mode)
        real = os.path.realpath(entry.path)  # does not raise on a loop: stat below does
        if not self._inside(real):
            return "symlink_outside"
        try:
            mode = os.stat(real).st_mode
        except OSError as err:
            return "symlink_loop" if err.errno == errno.ELOOP else "broken_symlink"
        return None if stat.S_ISREG(mode) else _skip_reason(mode)

    def _paths(self, top: str, rel_top: str, suffixes: tuple[str, ...] | None, skipped: dict[str, int]) -> list[str]:
        """Relative paths of regular files, depth first; hidden names skipped, directory links not
        followed, file links kept only when they lead to a regular file inside the root. Entries with
        a wanted name left out for another reason are counted in `skipped`, by reason."""
        found: list[str] = []
        stack = [(top, rel_top)]
        while stack:
            directory, rel = stack.pop()
            try:
                entries = os.scandir(directory)
            except FileNotFoundError:  # removed while we walk
                continue
            with entries:
                for entry in entries:
                    name = entry.name
                    if name[0] == ".":
                        continue
                    if entry.is_file(follow_symlinks=False):  # the fast path (d_type): no stat, nothing else
                        if suffixes is None or name.lower().endswith(suffixes):
                            found.append(rel + name)
                    elif entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, f"{rel}{name}/"))
                    elif suffixes is None or name.lower().endswith(suffixes):  # rare: classify, then count
                        if (reason := self._skip_reason(entry)) is None:
                            found.append(rel + name)
                        elif reason:
                            skipped[reason] = skipped.get(reason, 0) + 1
        return found


_DOTS = (".", "..")


DELETE_BATCH = 1000  # keys one DeleteObjects request may name
_EXPECT_HANDLER = "normals-pipeline-expect-only-large"
EXPECT_FROM_BYTES = 2 * 2**20  # smaller bodies go without `Expect: 100-continue` (the AWS SDK for Go's default)
# Connections an S3 client keeps: a run has up to 64 images in flight (each a map's and a journal's PUT), the plan
# 32 reads, and shards' records, manifests and previews beside them. botocore keeps 10; every request past them
# opens a connection of its own and closes it after (on S3 a TLS handshake each time).
S3_CONNECTIONS = 100


def s3_config(**options: Any) -> Any:
    """botocore's `Config` for the pipeline's S3 clients, with `options` (retries, signing) added."""
    from botocore.config import Config

    return Config(max_pool_connections=S3_CONNECTIONS, **options)


def _expect_only_large(params: dict[str, Any], **kwargs: Any) -> None:
    """botocore asks S3 to `100-continue` before every PUT body, a round trip more per write; worth it only
    where S3 could refuse a large body before it is sent. A map, a journal file and a manifest go at once."""
    from botocore.utils import determine_content_length  # only S3 clients call this

    size = determine_content_length(params.get("body"))
    if size is not None and size < EXPECT_FROM_BYTES:
        params["headers"].pop("Expect", None)


class S3Storage:
    """An S3 prefix; `client` is any boto3 S3 client (endpoint, credentials are its business)."""

    def __init__(self, bucket: str, prefix: str, client: Any, *, page_size: int = 1000) -> None:
        if not bucket:
            raise ValueError("S3 bucket name is empty")
        self.bucket = bucket
        self.prefix = _normalise_prefix(prefix)
        self.client = client
        self.page_size = page_size
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        # After botocore's own handler, which adds the header; once per client, however many prefixes share it.
        if (events := getattr(getattr(client, "meta", None), "events", None)) is not None:  # not a stand-in
            events.register_last("before-call.s3", _expect_only_large, unique_id=_EXPECT_HANDLER)

    @property
    def _client_error(self) -> type[ClientError]:
        """botocore's `ClientError`, from the client (so a local run never imports boto3); an `except` clause
        reads it only when something was raised."""
        return self.client.exceptions.ClientError

    def listing(self, suffixes: tuple[str, ...] | None = None) -> Listing:
        """Listing gives size and ETag for free on S3. Keys no path names as it is (an empty, '.' or '..'
        part below the prefix, see `path_problem`) are left out and counted in `skipped` (those with a
        wanted name), so no listed path can fail the manifest's schema."""
        entries: list[FileEntry] = []
        skipped: dict[str, int] = {}
        for entry in self._walk(self.prefix):
            if suffixes is not None and not entry.path.lower().endswith(suffixes):
                continue
            if reason := path_problem(entry.path):
                skipped[reason] = skipped.get(reason, 0) + 1
            else:
                entries.append(entry)
        return Listing([e.path for e in entries], [e.size for e in entries], [e.version for e in entries], skipped)

    def stat(self, path: str) -> FileEntry:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(path))
        except self._client_error as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                raise FileNotFoundError(f"no such object: {self.uri_for(path)}") from err
            raise
        return FileEntry(path, head["ContentLength"], head["ETag"].strip('"'))

    def stat_many(self, paths: list[str]) -> list[FileEntry | OSError]:
        """`stat` of each path, or the error it raises, in order (a listing gives S3 sizes: rarely called)."""
        found: list[FileEntry | OSError] = []
        for path in paths:
            try:
                found.append(self.stat(path))
            except OSError as error:
                found.append(error)
        return found

    def read_bytes(self, path: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(path))
        except self._client_error as err:
            if _error_code(err) == "NoSuchKey":
                raise FileNotFoundError(f"no such object: {self.uri_for(path)}") from err
            raise
        return response["Body"].read()

    def write_bytes(self, path: str, data: bytes, content_type: str | None = None) -> None:
        """One PUT: S3 never exposes a partially written object."""
        self._put(path, data, content_type)

    def write_stream(self, path: str, write: Callable[[BinaryIO], None], content_type: str | None = None) -> None:
        """One PUT streamed from a temp file on this host that `write` fills (a file body is read as it is sent)."""
        with tempfile.TemporaryFile() as file:
            write(file)
            file.seek(0)
            self._put(path, file, content_type)

    def create_if_absent(self, path: str, data: bytes, content_type: str | None = None) -> bool:
        """One conditional PUT (`If-None-Match: *`): S3 stores it only if the key is absent, so of writers
        racing one wins. False if the key was there, or another conditional write to it was under way (409)."""
        try:
            self._put(path, data, content_type, IfNoneMatch="*")
        except self._client_error as err:
            if _error_code(err) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def exists(self, path: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(path))
        except self._client_error as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise
        return True

    def uri_for(self, path: str) -> str:
        return f"s3://{self.bucket}/{self._key(path)}"

    def list_prefix(self, prefix: str) -> list[str]:
        return [e.path for e in self._walk(self.prefix + _normalise_prefix(prefix)) if not path_problem(e.path)]

    def delete(self, path: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(path))

    def _put(self, path: str, body: bytes | BinaryIO, content_type: str | None, **conditions: str) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=body, **conditions, **extra)

    def delete_many(self, paths: list[str]) -> None:
        """One DeleteObjects request per 1 000 keys (S3's most), not a request per key; any key S3 did not
        delete is an OSError naming it (a missing key is deleted, as S3 counts it). A store that refuses
        DeleteObjects itself (some S3-compatible ones do not have it) gets a DELETE per key, as `delete`."""
        for start in range(0, len(paths), DELETE_BATCH):
            chosen = paths[start : start + DELETE_BATCH]
            batch = [{"Key": self._key(path)} for path in chosen]
            try:
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except self._client_error:  # a refusal of each key's DELETE, if any, is what is raised then
                for path in chosen:
                    self.delete(path)
                continue
            if errors := answer.get("Errors"):
                first = errors[0]
                raise OSError(
                    f"S3 did not delete {len(errors)} of {len(batch)} objects in s3://{self.bucket}; the first, "
                    f"{first.get('Key')}: {first.get('Code')} ({first.get('Message')})"
                )

    def _key(self, path: str) -> str:
        _check_relative(path)
        return self.prefix + path

    def _walk(self, key_prefix: str) -> Iterator[FileEntry]:
        skip = len(self.prefix)
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=key_prefix, PaginationConfig={"PageSize": self.page_size}
        )
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    rel = obj["Key"][skip:]
                    if not rel or rel.endswith("/") or any(s[:1] == "." and s not in _DOTS for s in rel.split("/")):
                        continue  # a folder marker, or hidden: neither listed nor counted (as in a local folder)
                    yield FileEntry(rel, obj["Size"], obj["ETag"].strip('"'))
        except self._client_error as err:
            if _error_code(err) == "NoSuchBucket":
                raise DatasetNotFound(f"dataset not found: bucket of {self.uri} does not exist") from err
            raise


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def readable_location(uri: str) -> str:
    """A `file://` URI as the local path it names (what a user pastes into a shell: `partition=01`, not
    `partition%3D01`); any other URI as it is."""
    if not uri.startswith("file://"):
        return uri
    return os.fsdecode(urllib.parse.unquote_to_bytes(urllib.parse.urlsplit(uri).path))


def at_once(storage: Storage, remote: int, local: int = 1) -> int:
    """How many of a stage's requests to `storage` to make at once: `remote` where each is mostly a wait (S3),
    `local` where each is work for this process (a folder: more at once only contend for the CPU and hold more)."""
    return local if isinstance(storage, LocalStorage) else remote


def open_storage(uri: str, s3_client: Any = None) -> Storage:
    """Open a plain path, a file:// URI or s3://bucket/prefix."""
    if "://" not in uri:
        return LocalStorage(uri)
    parsed = urllib.parse.urlsplit(uri)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI with a remote host is not supported: {uri}")
        return LocalStorage(os.fsdecode(urllib.parse.unquote_to_bytes(parsed.path)))
    if scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"S3 URI has no bucket: {uri}")
        if s3_client is None:
            import boto3

            s3_client = boto3.client("s3", config=s3_config())
        return S3Storage(parsed.netloc, parsed.path.lstrip("/"), s3_client)
    raise ValueError(f"unsupported storage URI scheme {parsed.scheme!r} in {uri!r}: use a local path, file:// or s3://")
