"""The enrichment loop: inventory rows in, normal maps stored and manifest rows out.

For each image: read → prepare → (already have a map for these bytes? reuse it) → claim → send → store.
Normal maps are named by the content hash, so identical bytes are charged once, whatever their path;
the claim makes that hold across processes and hosts: a process that meets another's claim on the same
content waits for it and reuses the map. A bad image becomes a row with an error code; only what makes
further sending pointless (key refused, credits gone, API unreachable, maps cannot be stored) stops the
loop, and every row done before that is kept.

`enrich_shards` runs a range of shards start to finish as one stream, under the shards' claims, so a
shard has one writer at a time whichever process, run or host works on it.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from . import manifest, ownership
from ._errors import (
    ApiUnreachable,
    ClipdropError,
    ImageRejected,
    InvalidResponse,
    ManifestNotWritten,
    MapNotStored,
    NoAnswer,
    RunStopped,
    StateUnavailable,
    TransientError,
)
from ._memory import return_freed_buffers
from ._state import Claimed, ClaimStore, Mark
from .client import ApiResult, ClipdropClient, Tally
from .guards import ClaimGuard, slot_interval_s
from .inventory import read_inventory, with_versions
from .prepare import Oversize, PreparedImage, prepare
from .storage import LocalStorage, Storage, at_once

NORMALS_DIR = "normals"
LIST_PAGE = 1000  # keys a listing request returns (S3's page)
# Codes whose rows are final: the same bytes would fail the same way, so a re-run does not resend them.
FINAL_ERROR_CODES = frozenset(
    {
        "bad_request",
        "empty_file",
        "unreadable_image",
        "truncated_image",
        "unsupported_format",
        "too_many_pixels",
        "file_too_large",
    }
)
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
MAX_IN_FLIGHT = 64  # images in flight at most when the window follows the rate
HEADROOM = 1.5  # Little's law gives what the rate needs on average; latency varies
MAX_BYTES_IN_FLIGHT = 256 * 2**20  # image bytes held by the images in flight, when the window follows the rate
KEPT_BYTES = 64 * 2**20  # image bytes the plan keeps for the run that follows it (see `PlanReads`)
PROGRESS_EVERY_S = 1.0  # where the run stands is reported at least this often, even while every answer is late
COMMITTERS = 4  # shards whose manifests are written at once on S3 (one at a time in a folder)
RECORD_READERS = 8  # shard records (manifest + journal) a run reads at once on S3 (one at a time in a folder)
STOP_GRACE_S = 5.0  # on an interrupt, answers on their way get this long before their exchanges are ended


class _Halted(Exception):
    """The run stopped before this image was sent."""


class _SameOutcome(ClipdropError):
    """A duplicate of a content whose request ended earlier in this run without a usable answer that may
    have cost (a timeout, a dropped connection, a broken body): its row says the same, with no request and
    no cost of its own, since resending it would be the retry the run refuses."""

    def __init__(self, ended: ClipdropError) -> None:
        super().__init__(f"not sent: the same content's request ended so in this run ({ended.message})")
        self.status = ended.status
        self.error_code = ended.error_code


@dataclass(frozen=True)
class Item:
    """One image of the inventory."""

    path: str
    size: int
    version: str


@dataclass(frozen=True)
class Progress:
    """Where a run stands, emitted as its images finish: what a live view or a log line shows. `done` and
    `total` count the images this run processes (those without a final row yet); `requests` every attempt
    sent, as it goes out (those waiting for their answer too); `credits` what this run was charged;
    `remaining` the key's balance as last reported."""

    done: int = 0
    total: int = 0
    enriched: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    credits: Decimal = Decimal(0)
    remaining: Decimal | None = None
    elapsed_s: float = 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def left_s(self) -> float | None:
        """Time left at the pace so far; None until an image is done."""
        return (self.total - self.done) * self.elapsed_s / self.done if self.done else None

    def line(self) -> str:
        """One line for a log (Dagster's event log, an Airflow task's): where the run stands."""
        left = f", about {self.left_s:.0f} s left" if self.left_s is not None else ""
        pace = f" ({60 * self.done / self.elapsed_s:.0f} images/min)" if self.elapsed_s > 0 else ""
        return (
            f"{self.done}/{self.total} images processed{pace}, {self.enriched} enriched, {self.error_count} errors; "
            f"{self.requests} requests, {self.credits.normalize():f} credits spent, "
            f"{self.elapsed_s:.0f} s elapsed{left}"
        )

    def __add__(self, later: Progress) -> Progress:
        """This run followed by a later one (`--shards-per-run`): counts add up, the balance is the later's."""
        errors = Counter(self.errors) + Counter(later.errors)
        return Progress(
            self.done + later.done,
            self.total + later.total,
            self.enriched + later.enriched,
            dict(errors),
            self.requests + later.requests,
            self.credits + later.credits,
            later.remaining if later.remaining is not None else self.remaining,
            self.elapsed_s + later.elapsed_s,
        )


class Throttle:
    """Lets a progress snapshot through every `seconds`, or when another `fraction` of the images is done,
    never two within `min_gap_s`: enough to show life in a log without flooding it."""

    def __init__(self, seconds: float, fraction: float, min_gap_s: float = 1.0) -> None:
        self.seconds, self.fraction, self.min_gap_s = seconds, fraction, min_gap_s
        self._last_at: float | None = None
        self._last_step = 0

    def due(self, progress: Progress, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        step = int(progress.done / progress.total / self.fraction) if progress.total else 0
        since = None if self._last_at is None else now - self._last_at
        if since is not None and (since < self.min_gap_s or (since < self.seconds and step <= self._last_step)):
            return False
        self._last_at, self._last_step = now, step
        return True


@dataclass
class ShardResult:
    """What one pass over a shard did; `manifest` is the shard's full, merged manifest. `requests` and
    `retries` are this shard's own, though its images shared a client with the run's other shards."""

    manifest: pd.DataFrame
    new_rows: int
    requests: int
    credits_consumed: Decimal
    remaining_credits: Decimal | None
    elapsed_s: float
    errors: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    stopped: Exception | None = None
    warnings: list[str] = field(default_factory=list)  # state set aside to read the shard
    manifest_uri: str | None = None

    @property
    def enriched(self) -> int:
        return int(self.manifest["error_code"].isna().sum())


@dataclass
class ShardWork:
    """One shard of a run: its current items, what was known of it, and where its finished rows go."""

    key: str
    items: list[Item]
    previous: pd.DataFrame
    journal: Callable[[dict, float], None] | None = None  # a finished row and what this run paid for it
    costs_lost: bool = False  # part of its record was unreadable (see `Enricher.run`)
    warnings: list[str] = field(default_factory=list)


def items_by_shard(dataset: Storage, output: Storage, keys: list[str], shards: int) -> dict[str, list[Item]]:
    """The current items of each of a run's shards (partition keys), from one read of the output's inventory."""
    inventory = read_inventory(output, shards=shards)
    return {key: current_items(dataset, inventory.filter(pc.equal(inventory["shard"], int(key)))) for key in keys}


def current_items(dataset: Storage, inventory: pa.Table) -> list[Item]:
    """The inventory's files with their size and version, stat'ed here where the listing did not give
    them (see `with_versions`); a file removed since the listing is left out."""
    table = with_versions(dataset, inventory)
    return [Item(*row) for row in zip(*(table[column].to_pylist() for column in ("path", "size", "version")))]


@dataclass(frozen=True)
class Checked:
    """A file read, hashed and checked locally: the image to send (`prepared`), or the `refusal` that
    becomes its error row with no request. `digest` is None when the file could not be read."""

    digest: str | None
    prepared: PreparedImage | None = None
    refusal: ImageRejected | None = None


def read_and_check(dataset: Storage, item: Item, oversize: Oversize) -> Checked:
    """The loop's first half, before any claim or request: shared with the plan, so what the plan counts
    as refused or to send is what the run then does."""
    try:
        data = dataset.read_bytes(item.path)
    except (OSError, ValueError) as error:
        refusal = ImageRejected(f"cannot read the file ({_cause(error)})", error_code="unreadable_file")
        return Checked(None, refusal=refusal)
    digest = hashlib.sha256(data).hexdigest()
    try:
        return Checked(digest, prepare(data, oversize=oversize))
    except ImageRejected as error:
        return Checked(digest, refusal=error)


class PlanReads:
    """Files the plan read, hashed and checked, kept for the run that follows it in the same process, which
    then neither reads nor hashes them again: on S3 one GET per image instead of two. Keyed by the path and
    version the inventory gave both, so the run sends exactly the bytes the plan hashed and counted. Only a
    remote dataset's (a local read again is a page-cache hit, and memory is the scarcer), only files that
    could be read (the run tries those again), up to `max_bytes` of image data in the order the plan meets
    them (the run's), and each is taken once: what the run does not take goes with this object."""

    def __init__(self, max_bytes: int = KEPT_BYTES) -> None:
        self.room = max_bytes
        self._kept: dict[tuple[str, Item, Oversize], Checked] = {}
        self._lock = threading.Lock()

    def keep(self, dataset: Storage, item: Item, oversize: Oversize, checked: Checked) -> None:
        if checked.digest is None or isinstance(dataset, LocalStorage):
            return
        if checked.refusal is not None:  # its traceback holds the frames that read the file, bytes and all
            checked.refusal.with_traceback(None)
        size = len(checked.prepared.data) if checked.prepared is not None else 0
        with self._lock:
            if size <= self.room:
                self.room -= size
                self._kept[(dataset.uri, item, oversize)] = checked

    def take(self, dataset: Storage, item: Item, oversize: Oversize) -> Checked | None:
        with self._lock:
            return self._kept.pop((dataset.uri, item, oversize), None)


def normal_map_path(content_hash: str) -> str:
    return f"{NORMALS_DIR}/{content_hash[:2]}/{content_hash}.jpg"


class StoredMaps:
    """Whether a normal map is stored, as a run asks before claiming its content (and the plan before counting
    it to send): from one listing of `normals/` taken at the start, if that costs fewer requests than one look
    per image to send (`looks`; its pages are guessed from the maps the shards record, `recorded`), else a
    look (S3: a HEAD) each. A map stored by another process since the listing is found after the claim, which
    looks again if another process can have stored one since (see `Enricher._stored_since_look`)."""

    def __init__(self, output: Storage, looks: int = 0, recorded: int = 0) -> None:
        self.output = output
        listed = looks > recorded // LIST_PAGE
        self._listed = frozenset(output.list_prefix(NORMALS_DIR)) if listed else None

    def __contains__(self, path: str) -> bool:
        return path in self._listed if self._listed is not None else self.output.exists(path)


def claim_namespace(output: Storage) -> str:
    """Claims are per output: the same content sent for another output needs a map of its own."""
    return "out-" + hashlib.sha256(output.uri.encode()).hexdigest()[:16]


def pending_items(items: Iterable[Item], previous: pd.DataFrame) -> list[Item]:
    """Items without a final row for their current version: only these are (re)processed."""
    final = previous["error_code"].isna() | previous["error_code"].isin(FINAL_ERROR_CODES)
    done = dict(zip(previous.loc[final, "path"], previous.loc[final, "source_version"]))
    return [item for item in items if done.get(item.path) != item.version]


def window_size(rpm: int, latency_s: float, concurrency: int | None) -> int:
    """`InFlightWindow`'s rule: `2 × concurrency` when fixed (a few queued behind the workers); otherwise by
    Little's law rate × latency, with headroom, plus two waiting at the rate guard, between 2 and
    `MAX_IN_FLIGHT`."""
    if concurrency:
        return 2 * concurrency
    return max(2, min(MAX_IN_FLIGHT, math.ceil(rpm / 60 * latency_s * HEADROOM) + 2))


def images_per_second(rpm: int, latency_s: float, concurrency: int | None) -> float:
    """What a run keeps up at that latency: the key's schedule, or less when the images being sent (the
    window, at most one per worker) cannot keep up with it (Little's law again: in flight / latency)."""
    sending = min(window_size(rpm, latency_s, concurrency), concurrency or MAX_IN_FLIGHT)
    return min(1 / slot_interval_s(rpm), sending / latency_s)


class InFlightWindow:
    """How many images may be in flight (`window_size`): fixed when `concurrency` is given, otherwise
    following the key's rate and the latency the client observes (so it adapts), and never more image
    bytes than `max_bytes`."""

    def __init__(self, client: ClipdropClient, concurrency: int | None, max_bytes: int = MAX_BYTES_IN_FLIGHT):
        self.client = client
        self.fixed = concurrency
        self.max_bytes = max_bytes
        self.threads = concurrency or MAX_IN_FLIGHT

    def size(self) -> int:
        return window_size(self.client.rate_guard.rpm, self.client.latency_s, self.fixed)

    def has_room(self, in_flight: int, bytes_in_flight: int, size: int) -> bool:
        if in_flight >= self.size():
            return False
        return self.fixed is not None or in_flight == 0 or bytes_in_flight + size <= self.max_bytes


class Enricher:
    """Runs the loop over shards with a pool of workers sharing one client; `concurrency` None: the
    number in flight follows the key's rate and the observed latency (see `InFlightWindow`)."""

    def __init__(
        self,
        dataset: Storage,
        output: Storage,
        client: ClipdropClient,
        concurrency: int | None = 4,
        journal: Callable[[dict, float], None] | None = None,
        oversize: Oversize = "downscale",
        claims: ClaimGuard | None = None,
        spool: Storage | None = None,
        reads: PlanReads | None = None,
    ) -> None:
        self.dataset = dataset
        self.output = output
        self.client = client
        self.window = InFlightWindow(client, max(1, concurrency) if concurrency else None)
        self.journal = journal  # called with each finished row and its cost, from the worker that made it
        self.oversize = oversize
        self.claims = claims or ClaimGuard(None, claim_namespace(output))
        self.spool = spool or manifest.spool_for(output)  # paid maps the output refused wait here
        self.reads = reads  # what the plan before this run read, hashed and checked already
        self._maps = StoredMaps(output)  # `run_shards` lists them when that is cheaper
        self._mark: Mark | None = None  # the claims' mark, taken before `_maps` looked
        self._stored: set[str] = set()  # maps this run stored
        self._stop = threading.Event()
        self._stopped: Exception | None = None
        self._hash_locks: dict[str, threading.Lock] = {}
        self._ended: dict[str, ClipdropError] = {}  # contents whose request may have cost, with no usable answer
        self._spent_before: dict[str, float] = {}
        self._charged_now: dict[str, float] = {}  # what this run paid per path, before earlier costs are added
        self._locks_guard = threading.Lock()

    def run(
        self,
        items: list[Item],
        previous: pd.DataFrame,
        progress: Callable[[Progress], None] | None = None,
        costs_lost: bool = False,
    ) -> ShardResult:
        """One shard. `costs_lost`: part of the shard's record was unreadable, so a path with a stored map
        and no row has a cost nobody knows any more: its row says null (unknown), not 0."""
        work = ShardWork("", items, previous, self.journal, costs_lost)
        return self.run_shards([work], progress=progress)[0]

    def run_shards(
        self,
        works: list[ShardWork],
        on_done: Callable[[ShardWork, ShardResult], None] | None = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> list[ShardResult]:
        """Several shards as one stream of work: one pool, so no shard boundary drains the pipeline.
        Each shard's result goes to `on_done` as soon as its last image is finished (or, once the run has
        stopped, as soon as its in-flight images are), in whatever order shards finish, on a thread of their
        own (on S3 a few, `COMMITTERS`: each is a few round trips, and the last shards are not written one after
        another once sending ends): the pool is kept fed while shards' manifests are written.
        `progress` hears where the run stands at the start and after every batch of finished images."""
        started = time.monotonic()
        todo = [(index, item) for index, work in enumerate(works) for item in pending_items(work.items, work.previous)]
        self._mark = self._take_mark()
        self._maps = StoredMaps(self.output, len(todo), sum(len(work.previous) for work in works))
        # A redone row keeps what its earlier attempts cost, so the manifest adds up to the bill.
        for work in works:
            self._spent_before.update(zip(work.previous["path"], work.previous["credits_consumed"]))
        left = Counter(index for index, _ in todo)
        rows: list[list[dict]] = [[] for _ in works]
        tallies = [Tally() for _ in works]
        results: list[ShardResult | None] = [None] * len(works)
        status = Progress(total=len(todo))
        sent_before = self.client.tally.requests  # the client is the run's: what it sent since is this run's

        def conclude(index: int) -> None:
            work = works[index]
            result = self._result(work.items, work.previous, rows[index], tallies[index], time.monotonic() - started)
            result.warnings = work.warnings
            results[index] = result
            if on_done is not None:
                on_done(work, result)

        committer = ThreadPoolExecutor(max_workers=at_once(self.output, COMMITTERS), thread_name_prefix="commit")
        commits: list[Future[None]] = []

        def finish(index: int) -> None:
            commits.append(committer.submit(conclude, index))

        def report() -> None:
            if progress:
                requests, elapsed = self.client.tally.requests - sent_before, time.monotonic() - started
                progress(replace(status, requests=requests, remaining=self._remaining(), elapsed_s=elapsed))

        for index in range(len(works)):
            if not left[index]:
                finish(index)
        report()
        queue = deque(todo)
        waiting: dict[Future[tuple[dict | None, Tally]], tuple[int, int]] = {}
        held = 0  # bytes of the images in flight
        with committer, ThreadPoolExecutor(max_workers=self.window.threads, thread_name_prefix="enrich") as pool:
            try:
                while queue or waiting:  # a few futures at a time, not one per image: memory stays flat
                    while queue and self.window.has_room(len(waiting), held, queue[0][1].size):
                        index, item = queue.popleft()
                        waiting[pool.submit(self._process_and_journal, works[index], item)] = (index, item.size)
                        held += item.size
                    finished, _ = wait(waiting, timeout=PROGRESS_EVERY_S, return_when=FIRST_COMPLETED)
                    for future in finished:
                        index, size = waiting.pop(future)
                        held -= size
                        row, tally = future.result()
                        status = self._count(status, row)
                        _add(tallies[index], tally)
                        if row is not None:
                            rows[index].append(row)
                        left[index] -= 1
                        if not left[index]:
                            finish(index)
                    report()
            except BaseException:  # an interrupt (SIGTERM, Ctrl-C): send nothing more, journal what is in flight
                self._interrupt(pool, waiting)
                for future in waiting:
                    if future.done() and not future.cancelled() and future.exception() is None:
                        status = self._count(status, future.result()[0])
                report()
                raise
        for commit in commits:
            commit.result()  # `on_done` says what failed to be written; what gets here is a bug
        return [result for result in results if result is not None]

    def _interrupt(self, pool: ThreadPoolExecutor, in_flight: Iterable[Future]) -> None:
        """Send nothing more; the answers on their way get `STOP_GRACE_S`, then the exchanges still in flight (a
        trickle, a hang) are ended, their rows say `interrupted`, and the workers are done within moments."""
        self._stop.set()
        self.client.stop_sending()
        try:
            wait(in_flight, timeout=STOP_GRACE_S)
        finally:  # a second interrupt cuts the grace short
            self.client.abort()
            pool.shutdown(wait=True, cancel_futures=True)

    def _count(self, status: Progress, row: dict | None) -> Progress:
        """`status` after one more finished image (None: the run stopped before it was sent); `requests` are
        counted as they go out (see `run_shards`)."""
        errors = dict(status.errors)
        code = row["error_code"] if row is not None else None
        if code:
            errors[code] = errors.get(code, 0) + 1
        return replace(
            status,
            done=status.done + (row is not None),  # an image the stop kept from being sent is not done
            enriched=status.enriched + (row is not None and not code),
            errors=errors,
            credits=status.credits + (Decimal(str(self._charged_now[row["path"]])) if row is not None else 0),
        )

    def _result(
        self, items: list[Item], previous: pd.DataFrame, rows: list[dict], tally: Tally, elapsed: float
    ) -> ShardResult:
        new = manifest.to_frame(rows)
        current = {item.path for item in items}
        kept = previous[previous["path"].isin(current) & ~previous["path"].isin(new["path"])]
        merged = pd.concat([kept, new], ignore_index=True) if len(kept) else new
        merged = merged.sort_values("path", ignore_index=True)
        return ShardResult(
            manifest=merged,
            new_rows=len(rows),
            requests=tally.requests,
            credits_consumed=sum((Decimal(str(self._charged_now[row["path"]])) for row in rows), Decimal(0)),
            remaining_credits=self._remaining(),
            elapsed_s=elapsed,
            errors=Counter(row["error_code"] for row in rows if row["error_code"]),
            retries=Counter(tally.retries),
            stopped=self._stopped,
        )

    def _remaining(self) -> Decimal | None:
        """The key's balance as last reported; unknown when the shared state cannot say (the run is then
        stopping on `StateUnavailable` already)."""
        try:
            return self.client.credit_guard.remaining
        except Exception:  # noqa: BLE001 - a figure to show, never a reason to lose the rows
            return None

    def _process_and_journal(self, work: ShardWork, item: Item) -> tuple[dict | None, Tally]:
        """The image's row (journaled) and what it sent."""
        with self.client.counting() as tally:
            row = self._process(item, work.costs_lost)
        if row is not None:
            charged = row["credits_consumed"]
            self._charged_now[item.path] = 0.0 if math.isnan(charged) else charged
            row["credits_consumed"] = charged + self._spent_before.get(item.path, 0.0)  # unknown stays unknown
            if work.journal is not None:
                work.journal(row, charged)
        return row, tally

    def _process(self, item: Item, costs_lost: bool = False) -> dict | None:
        """One image to one row; None when the run stopped before it was sent."""
        if self._stop.is_set():
            return None
        kept = self.reads.take(self.dataset, item, self.oversize) if self.reads is not None else None
        checked = kept or read_and_check(self.dataset, item, self.oversize)
        digest, prepared = checked.digest, checked.prepared
        if prepared is None:
            return _row(item, digest, error=checked.refusal)
        try:
            uri, result = self._normal_map(digest, prepared.data, prepared.content_type)
        except _Halted:  # the run stopped before this image was sent: no row, the next run sends it
            return None
        except MapNotStored as error:  # paid for: the row is the receipt, then stop
            self._halt(error)
            return _row(item, digest, prepared, error=error)
        except StateUnavailable as error:  # what arrived is kept (the map stored already), then stop
            self._halt(error)
            return self._answer_row(item, digest, prepared, error.answer)
        except (RunStopped, ApiUnreachable) as error:
            self._halt(error)
            return None
        except ClipdropError as error:
            return _row(item, digest, prepared, error=error)
        except Exception as error:  # storage or a bug: stop cleanly so finished rows are still written
            self._halt(error)
            return None
        row = _row(item, digest, prepared, uri=uri, result=result)
        if result is None and costs_lost and item.path not in self._spent_before:
            row["credits_consumed"] = math.nan  # rebuilt from a stored map: what it cost is unknown
        return row

    def _normal_map(self, digest: str, data: bytes, content_type: str) -> tuple[str, ApiResult | None]:
        """The map's URI, calling the API only if no map for these bytes is stored, nor waiting in this host's
        spool, yet. Threads of this process wait on a lock, other processes on the content's claim; either
        way the waiter then finds the map and reuses it. If the holder's request ended without a usable
        answer that may have cost, this run's waiters get the same outcome without a request; if it failed
        before anything could cost (a 5xx, the run stopping), a waiter sends it itself."""
        path = normal_map_path(digest)
        uri = self.output.uri_for(path)
        if path in self._maps:
            return uri, None
        with self._lock_for(digest):
            if digest in self._ended:
                raise _SameOutcome(self._ended[digest])
            if not (taken := self._claim(digest, lambda: self._stop.is_set() or self.output.exists(path))):
                if self._stop.is_set() and not self.output.exists(path):
                    raise _Halted
                return uri, None
            try:
                if self._stored_since_look(path, taken):
                    return uri, None
                if self.spool.exists(path):  # paid by an earlier run whose output refused it: no request
                    self._store(path, uri, self.spool.read_bytes(path))
                    self.spool.delete(path)
                    return uri, None
                if self._stop.is_set():
                    raise _Halted
                result = self._send(digest, path, uri, data, content_type)
            finally:
                self._release(digest)
        return uri, result

    def _send(self, digest: str, path: str, uri: str, data: bytes, content_type: str) -> ApiResult:
        """One request and its map stored, before anything else can fail."""
        try:
            result = self.client.surface_normals(data, f"image.{_EXTENSIONS[content_type]}", content_type)
        except (NoAnswer, InvalidResponse) as error:  # may have cost: not resent in this run, duplicates included
            self._ended[digest] = error
            raise
        except StateUnavailable as error:  # the state failed after the answer arrived: keep the answer
            if isinstance(error.answer, ApiResult):
                self._store(path, uri, error.answer.content, error.answer.credits_consumed)
            elif isinstance(error.answer, (NoAnswer, InvalidResponse)):
                self._ended[digest] = error.answer
            raise
        self._store(path, uri, result.content, result.credits_consumed)
        return result

    def _store(self, path: str, uri: str, content: bytes, credits: Decimal | None = None) -> None:
        """Write a paid map (`credits`: what it cost, None when paid earlier); if the output refuses it, keep
        it in this host's spool, where the next run finds it before sending."""
        try:
            self.output.write_bytes(path, content, content_type="image/jpeg")
        except Exception as error:  # disk full, permission, S3 refusal: the answer is paid for all the same
            try:
                self.spool.write_bytes(path, content, content_type="image/jpeg")
            except Exception as spool_error:  # noqa: BLE001 - said in the message, the cost still recorded
                kept = f"this host's spool refused it too ({_cause(spool_error)}): the next run buys it again"
            else:
                kept = f"paid maps wait in {self.spool.uri_for(NORMALS_DIR)}, stored by the next run with no request"
            raise MapNotStored(
                f"could not store the normal map at {uri} ({_cause(error)}); its cost is recorded (map_not_stored) "
                f"and {kept}: free space or fix permissions, then re-run",
                credits_consumed=credits,
            ) from None
        self._stored.add(path)

    def _stored_since_look(self, path: str, taken: Claimed) -> bool:
        """Whether the map was stored between the first look and the claim: by this run (a duplicate), or by
        another process, which only one that took or gave up a claim of this output since this run's mark can
        have done; only then is the output asked (S3: a HEAD per image to send)."""
        if path in self._stored:
            return True
        return not (self._mark is not None and self._mark.unchanged_at(taken)) and self.output.exists(path)

    def _take_mark(self) -> Mark | None:
        """None when the claims' store fails: every claim then looks again, and the claims say what is wrong."""
        try:
            return self.claims.mark()
        except Exception:  # noqa: BLE001 - the next claim raises it as the run's stop
            return None

    def _claim(self, digest: str, done: Callable[[], bool]) -> Claimed | Literal[False]:
        try:
            return self.claims.acquire(digest, done)
        except Exception as error:  # the claims' store (Redis, SQLite) failing: nothing was sent
            raise StateUnavailable(error) from error

    def _release(self, digest: str) -> None:
        """A claim the store cannot release lapses by itself within its TTL; the run stops on the outage,
        keeping what this image brought."""
        try:
            self.claims.release(digest)
        except Exception as error:  # noqa: BLE001 - said as the run's stop
            self._halt(StateUnavailable(error))

    def _answer_row(
        self, item: Item, digest: str, prepared: PreparedImage, answer: ApiResult | ClipdropError | None
    ) -> dict | None:
        """The row of what an exchange brought before the state failed: a stored map, an error that costs or
        ends the image (a timeout, a broken body, a refusal); None if nothing happened the next run cannot redo."""
        if isinstance(answer, ApiResult):
            return _row(item, digest, prepared, uri=self.output.uri_for(normal_map_path(digest)), result=answer)
        if isinstance(answer, ClipdropError) and not isinstance(answer, (TransientError, RunStopped)):
            return _row(item, digest, prepared, error=answer)
        return None

    def _lock_for(self, digest: str) -> threading.Lock:
        """Duplicates in flight at once wait for the first, then reuse its map."""
        with self._locks_guard:
            return self._hash_locks.setdefault(digest, threading.Lock())

    def _halt(self, error: Exception) -> None:
        if not self._stop.is_set():
            self._stopped = error
            self._stop.set()


def _add(total: Tally, more: Tally) -> None:
    total.requests += more.requests
    total.retries.update(more.retries)


def _cause(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def enrich_shards(
    dataset: Storage,
    output: Storage,
    client: ClipdropClient,
    shards: list[tuple[str, list[Item]]],
    *,
    concurrency: int | None = None,
    oversize: Oversize = "downscale",
    claims: ClaimStore | None = None,
    progress: Callable[[Progress], None] | None = None,
    notify: Callable[[str], None] = lambda message: None,
    on_shard: Callable[[str, ShardResult], None] = lambda key, result: None,
    reads: PlanReads | None = None,
) -> dict[str, ShardResult]:
    """Shards `(key, items)` start to finish as one stream: read each record (setting aside what is unreadable),
    enrich what is pending through one pool, and as each shard finishes write its manifest, clear its journal
    and call `on_shard` (for one shard at a time, from a writing thread). The shards' claims make this run their
    only writer: another run of one of them (a re-launch, an overlapping schedule, another host) waits for it,
    then finds the work done. Claims are taken in key order, so two ranged runs cannot wait on each other in a
    circle. Should a claim be lost all the same (Redis restarted or evicting, a holder paused past the TTL), the
    manifest is committed with every journaled row folded in (`manifest.commit_shard`): it still adds up.
    `claims`: the store every process on the output shares (default: this process only); `reads`: what the plan
    before this run read and checked (see `PlanReads`)."""
    return_freed_buffers()  # images stream through many threads: keep the peak from staying
    guard = ClaimGuard(claims, claim_namespace(output))
    lease = ownership.take(output, guard.store, notify)  # refuses a run of another state: it would charge twice
    try:
        opened = _open_shards(guard, output, sorted(shards), notify)
        works = [work for work, _, _ in opened]
        records = {work.key: (journal, state) for work, journal, state in opened}
        enricher = Enricher(dataset, output, client, concurrency, oversize=oversize, claims=guard, reads=reads)
        lease.on_lost(enricher._halt)
        reporting = threading.Lock()  # shards are written at once; `on_shard` hears of one at a time

        def done(work: ShardWork, result: ShardResult) -> None:
            journal, state = records[work.key]
            current = {item.path for item in work.items}

            def in_dataset(rows: pd.DataFrame) -> pd.DataFrame:
                return rows[rows["path"].isin(current)].sort_values("path", ignore_index=True)

            try:
                result.manifest, result.manifest_uri, warnings = manifest.commit_shard(
                    output, journal, work.key, state, result.manifest, in_dataset
                )
                result.warnings = [*result.warnings, *warnings]
            except Exception as error:  # its rows stay journaled: stop, the output is failing
                unwritten = ManifestNotWritten(
                    f"could not write {output.uri_for(manifest.partition_path(work.key))} ({_cause(error)}); "
                    "its rows are kept in the journal and the next run folds them in"
                )
                # The output refused a map first: that stop says the same and where the paid maps wait.
                if not isinstance(result.stopped, MapNotStored):
                    result.stopped = unwritten
                enricher._halt(unwritten)
            try:
                guard.release(f"shard-{work.key}")
            except Exception as error:  # the claims' store failing: the claim lapses within its TTL
                enricher._halt(StateUnavailable(error))
            with reporting:
                on_shard(work.key, result)

        results = enricher.run_shards(works, on_done=done, progress=progress)
    finally:
        with suppress(Exception):  # what is still held lapses within the claims' TTL; the rows are written
            guard.close()
        lease.close()
    return {work.key: result for work, result in zip(works, results)}


def _open_shards(
    guard: ClaimGuard, output: Storage, shards: list[tuple[str, list[Item]]], notify: Callable[[str], None]
) -> list[tuple[ShardWork, manifest.Journal, manifest.ShardState]]:
    """Claim the shards in key order (two ranged runs never wait on each other in a circle), then read their
    records at once: on S3 each is a few requests, which one after another held back the first image."""
    for key, _ in shards:
        try:
            guard.acquire(
                f"shard-{key}", waiting=lambda key=key: notify(f"shard {key} is being enriched by another run: waiting")
            )
        except Exception as error:  # the claims' store failing before anything was sent
            raise StateUnavailable(error) from error
    with ThreadPoolExecutor(max_workers=at_once(output, RECORD_READERS), thread_name_prefix="open") as pool:
        return list(pool.map(lambda shard: _open_shard(output, *shard), shards))


def _open_shard(
    output: Storage, key: str, items: list[Item]
) -> tuple[ShardWork, manifest.Journal, manifest.ShardState]:
    journal = manifest.Journal(output, key)
    state = manifest.load_shard(output, journal, key)
    return ShardWork(key, items, state.previous, journal.write, bool(state.warnings), state.warnings), journal, state


def enrich_shard(
    dataset: Storage, output: Storage, client: ClipdropClient, partition_key: str, items: list[Item], **options
) -> ShardResult:
    """One shard start to finish: `enrich_shards` with a single shard."""
    return enrich_shards(dataset, output, client, [(partition_key, items)], **options)[partition_key]


def _row(
    item: Item,
    digest: str | None = None,
    prepared: PreparedImage | None = None,
    *,
    uri: str | None = None,
    result: ApiResult | None = None,
    error: ClipdropError | None = None,
) -> dict:
    charged = result.credits_consumed if result else getattr(error, "credits_consumed", None)
    remaining = result.remaining_credits if result else None
    return {
        "path": item.path,
        "content_hash": digest,
        "size": item.size,
        "source_version": item.version,
        "width": prepared.width if prepared else None,
        "height": prepared.height if prepared else None,
        "preparation": (",".join(prepared.steps) or None) if prepared else None,
        "normal_map_uri": uri,
        "credits_consumed": float(charged or 0),
        "remaining_credits": float(remaining) if remaining is not None else None,
        "http_status": result.status if result else (error.status if error else None),
        "error_code": error.error_code if error else None,
        "error_message": error.message if error else None,
        "processed_at": datetime.now(UTC),
    }
