"""The plan: what the next run would send and charge, found without a request and without a write.

It is the enrichment loop's first half without the client: the same inventory, the same record of each
shard (manifest and unfolded journal rows, read only: an unreadable file is left in place and warned of),
the same `pending_items`, and the same `read_and_check` (read, hash, `prepare`) for what is pending. A
pending file is then `refused` (its error row needs no request), a `duplicate` (its content has a map
already, is being sent by another run right now, or came earlier in this plan: not charged again), or
`to_send`. Files already done are not read, so planning an enriched dataset reads only its new files.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from . import manifest
from ._memory import return_freed_buffers
from ._state import ClaimStore
from .client import INITIAL_LATENCY_S
from .enrich import (
    Item,
    PlanReads,
    StoredMaps,
    claim_namespace,
    current_items,
    images_per_second,
    normal_map_path,
    pending_items,
    read_and_check,
)
from .guards import CREDITS_PER_CALL
from .inventory import partition_key, partition_keys, take_inventory
from .prepare import Oversize
from .storage import Storage, at_once

# A shard's figures as a table shows them (the CLI's, the inventory's `plan_by_shard`): counts, then the time.
TABLE_COLUMNS = ("images", "done", "to_send", "duplicates", "refused", "credits_needed", "eta_seconds")
READERS = 8  # local files read and hashed at once (hashing releases the GIL; more threads only contend)
REMOTE_READERS = 32  # S3 objects read at once: each GET is mostly a wait (20 ms and more), not work
RECORDS_AHEAD = 4  # shard records read at once on S3 (a folder's: one at a time); each holds its manifest
READ_BYTES = 64 * 2**20  # file bytes being read at once, whatever the readers: large images go fewer at a time


@dataclass(frozen=True)
class Figures:
    """One shard's counts, or their sum. `images = done + to_send + duplicates + refused`."""

    images: int = 0
    done: int = 0
    to_send: int = 0
    duplicates: int = 0
    refused: int = 0

    def __add__(self, other: Figures) -> Figures:
        return Figures(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def credits_needed(self) -> Decimal:
        return self.to_send * CREDITS_PER_CALL


@dataclass(frozen=True)
class Plan:
    """Per-shard figures, the key's last known balance `(value, age in seconds)` if any, the pace the run
    would keep, and what had to be left aside to read the output."""

    shards: dict[str, Figures]
    balance: tuple[Decimal, float] | None
    images_per_second: float
    warnings: tuple[str, ...] = ()

    @property
    def total(self) -> Figures:
        return sum(self.shards.values(), Figures())

    def eta_seconds(self, figures: Figures) -> float:
        return round(figures.to_send / self.images_per_second, 1)

    def figures(self, figures: Figures) -> dict[str, Any]:
        """The plan's keys for one shard or the total, as plain JSON numbers (or null)."""
        balance, age = self.balance or (None, None)
        return {
            **{f.name: getattr(figures, f.name) for f in fields(figures)},
            "credits_needed": json_number(figures.credits_needed),
            "balance": json_number(balance) if balance is not None else None,
            "balance_age_seconds": round(age, 1) if age is not None else None,
            "eta_seconds": self.eta_seconds(figures),
        }

    def as_dict(self) -> dict[str, Any]:
        """The total's keys at the top level, a `shards` list of the same keys plus `shard`, and `warnings`."""
        shards = [{"shard": key, **self.figures(figures)} for key, figures in self.shards.items()]
        return {**self.figures(self.total), "shards": shards, "warnings": list(self.warnings)}

    def shortfall(self, credit_floor: Decimal, budget: Decimal | None) -> str | None:
        """Why the run would not fit (its credits over the budget, or over the balance less the floor), or None."""
        needed = self.total.credits_needed
        if budget is not None and needed > budget:
            return (
                f"the plan needs {json_number(needed)} credits, more than the run budget of {json_number(budget)}: "
                "raise the budget (a run stopped by it keeps what it did; the next one goes on)"
            )
        if self.balance is not None and needed > self.balance[0] - credit_floor:
            balance, age = self.balance
            floor = f" less the credit floor of {json_number(credit_floor)}" if credit_floor else ""
            return (
                f"the plan needs {json_number(needed)} credits, more than the key's balance of "
                f"{json_number(balance)} (reported {age:.0f} s ago){floor}: buy credits"
                + (", or lower the floor" if credit_floor else "")
            )
        return None


def json_number(value: Decimal | float) -> int | float:
    """An int when whole, so JSON and text show 1000000, never 1e+06."""
    return int(value) if value == int(value) else float(value)


def make_plan(
    dataset: Storage,
    output: Storage,
    shards: int,
    *,
    inventory: pa.Table | None = None,
    rpm: int,
    concurrency: int | None = None,
    oversize: Oversize = "downscale",
    claims: ClaimStore | None = None,
    balance: tuple[Decimal, float] | None = None,
    keep: PlanReads | None = None,
) -> Plan:
    """Plan every shard (those without images at 0). `inventory`: the listing to plan (the inventory asset
    passes the one it wrote), else the dataset is listed here; `claims`: where runs on the output share theirs
    (None: nothing is known of other runs); `balance`: the key's `KeyState.known_balance()`; `keep`: where to
    leave what was read for the run that follows in this process. The ETA assumes the client's initial
    latency guess, which errs long."""
    return_freed_buffers()  # it reads every new image: keep the peak from staying
    table = inventory if inventory is not None else take_inventory(dataset, shards)
    planner = _Planner(dataset, output, oversize, claims, shards, keep)
    planned = {key: Figures() for key in partition_keys(shards)}  # an empty shard says 0 images
    by_key = [(partition_key(shard, shards), rows) for shard, rows in _by_shard(table)]
    records = _records(output, [key for key, _ in by_key])
    with ThreadPoolExecutor(max_workers=at_once(dataset, REMOTE_READERS, READERS), thread_name_prefix="plan") as pool:
        for (key, rows), record in zip(by_key, records, strict=True):
            planned[key] = planner.shard(pool, key, rows, record)
    return Plan(planned, balance, images_per_second(rpm, INITIAL_LATENCY_S, concurrency), tuple(planner.warnings))


def _records(output: Storage, keys: list[str]) -> Iterator[manifest.ShardState]:
    """Each shard's record (read only), in order, a few read ahead at once: on S3 each is a few requests, which
    one after another held back the plan; a few, not all, so at most that many manifests are held."""

    def load(key: str) -> manifest.ShardState:
        return manifest.load_shard(output, manifest.Journal(output, key), key, set_aside=False)

    readers = at_once(output, RECORDS_AHEAD)
    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="record") as pool:
        ahead: deque[Future[manifest.ShardState]] = deque()
        for key in keys:
            ahead.append(pool.submit(load, key))
            if len(ahead) == readers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _by_shard(table: pa.Table) -> Iterator[tuple[int, pa.Table]]:
    """The inventory's rows shard by shard, in shard order and listing order within a shard (the order a
    run meets them), from one sort instead of a filter per shard."""
    ordered = table.sort_by("shard")  # a stable sort
    offset = 0
    for entry in pc.value_counts(ordered["shard"]).to_pylist():
        yield entry["values"], ordered.slice(offset, entry["counts"])
        offset += entry["counts"]


class _Planner:
    """Walks the shards in order; contents counted to send are remembered across shards, so a later copy
    of one (in any shard) is a duplicate, as the run's claims and stored maps make it."""

    def __init__(
        self,
        dataset: Storage,
        output: Storage,
        oversize: Oversize,
        claims: ClaimStore | None,
        shards: int,
        keep: PlanReads | None,
    ) -> None:
        self.dataset, self.output, self.oversize, self.claims, self.shards = dataset, output, oversize, claims, shards
        self.keep = keep
        self.maps: StoredMaps | None = None  # made at the first shard with images to look at
        self.namespace = claim_namespace(output)
        self.seen: set[str] = set()
        self.warnings: list[str] = []

    def shard(self, pool: ThreadPoolExecutor, key: str, rows: pa.Table, record: manifest.ShardState) -> Figures:
        items = current_items(self.dataset, rows)
        if self._held(f"shard-{key}"):
            self.warnings.append(f"shard {key} is being enriched by another run now: its figures drop as it finishes")
        self.warnings += record.warnings
        pending = pending_items(items, record.previous)
        if self.maps is None and pending:  # shards are alike (hashed): this one's figures stand for each
            self.maps = StoredMaps(self.output, len(pending) * self.shards, len(record.previous) * self.shards)
        maps = self.maps or StoredMaps(self.output)
        looks = _looks(pool, self.dataset, self.output, pending, self.oversize, maps, self.keep)
        return _figures(len(items), looks, self.seen, self._held)

    def _held(self, name: str) -> bool:
        """Another run holds this claim now (a shard it writes, a content it sends: the next run reuses the map)."""
        return self.claims is not None and self.claims.held(f"{self.namespace}:{name}")


def _looks(
    pool: ThreadPoolExecutor,
    dataset: Storage,
    output: Storage,
    items: list[Item],
    oversize: Oversize,
    maps: StoredMaps,
    keep: PlanReads | None,
) -> Iterator[tuple[str, bool] | None]:
    """Each pending file as the run would meet it, in order, a window at a time: None if the local checks
    refuse it, else its content hash and whether a map of that content is stored (or waits in this host's
    spool, paid for: the run stores it with no request). What was read is left in `keep`, if given."""
    spool = manifest.spool_for(output)

    def look(item: Item) -> tuple[str, bool] | None:
        checked = read_and_check(dataset, item, oversize)
        if keep is not None:
            keep.keep(dataset, item, oversize, checked)
        if checked.prepared is None or checked.digest is None:
            return None
        path = normal_map_path(checked.digest)
        return checked.digest, path in maps or spool.exists(path)

    readers = at_once(dataset, REMOTE_READERS, READERS)
    window: deque[tuple[Future[tuple[str, bool] | None], int]] = deque()
    held = 0  # file bytes of the reads in `window`
    for item in items:  # in order, as many at once as the pool has readers and `READ_BYTES` lets in (one at least)
        while window and (len(window) >= readers or held + item.size > READ_BYTES):
            future, size = window.popleft()
            held -= size
            yield future.result()
        window.append((pool.submit(look, item), item.size))
        held += item.size
    for future, _ in window:
        yield future.result()


def _figures(
    images: int, looks: Iterable[tuple[str, bool] | None], seen: set[str], in_flight: Callable[[str], bool]
) -> Figures:
    """Count in order: the first of a content not yet mapped is sent, every later one reuses its map."""
    refused = duplicates = to_send = pending = 0
    for look in looks:
        pending += 1
        if look is None:
            refused += 1
        elif look[1] or look[0] in seen or in_flight(look[0]):
            duplicates += 1
        else:
            seen.add(look[0])
            to_send += 1
    return Figures(images, images - pending, to_send, duplicates, refused)
