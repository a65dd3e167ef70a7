"""Which shared state owns an output, so that runs keeping their claims in different places never enrich one
output at the same time.

One charge per content holds among the processes that share a claim store (`_state`): one SQLite file on a
host (`NORMALS_STATE_DIR`) or one Redis. Two hosts with a folder each and no Redis cannot see each other's
claims, and each would send every content. So a run records on the output which store its claims live in, as
a lease: `<output>/owner/lease-<generation>.json` holds the store's id (`ClaimStore.identity`), where it is
(for messages) and when the lease lapses. At its start a run

- joins a live lease of its own store (another process that shares its claims) and renews it;
- is refused, with one line, by a live lease of another store (`OutputInUse`);
- takes a lapsed, unreadable or missing lease by creating the next generation with the storage's atomic
  create-if-absent (a hard link locally, a conditional PUT on S3): of runs racing for it one wins, the
  others look again and find it live. Taking a lapsed lease of another store is said in a warning.

While the run goes, its lease is renewed every third of `LEASE_TTL_S`. A run that ends leaves its lease to
lapse (another process of its store may still be using it), so another store waits at most that long. If a
renewal finds a newer generation (this run's renewals failed for a whole TTL and another store took over),
the run stops (`OutputTaken`). Lapse times come from the writers' clocks: hosts that write one output need
clocks within a few seconds of each other, as NTP keeps them.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from typing import Literal

from ._errors import RunStopped
from ._state import ClaimStore, StateIdentity
from .guards import CLAIM_TTL_S
from .storage import Storage

OWNER_DIR = "owner"
LEASE_TTL_S = CLAIM_TTL_S  # as long as a content's claim: a killed run's hold lapses when its claims do
_LEASE_NAME = re.compile(rf"{OWNER_DIR}/lease-(\d+)\.json")
_SHARE = "NORMALS_REDIS_URL on every host, or one NORMALS_STATE_DIR"


class OutputInUse(Exception):
    """A run of another state holds the output: starting would charge each content twice."""


class OutputTaken(RunStopped):
    """A run of another state took the output over after this run's lease lapsed: stop sending."""

    error_code = "output_taken"


def take(output: Storage, store: ClaimStore, notify: Callable[[str], None] = lambda message: None) -> Lease:
    """This run's lease on `output` for the claim store it uses; `OutputInUse` if another store's run holds it.
    `notify` hears that a lapsed lease of another store was taken over."""
    me = store.identity()
    while True:
        generation, record = _newest(output)
        now = time.time()
        verdict = _verdict(record, me, now)
        if verdict == "refuse":
            raise OutputInUse(_in_use(output, record, now))
        if verdict == "join":
            output.write_bytes(_path(generation), _record(me, now), "application/json")
            return Lease(output, store, generation)
        if output.create_if_absent(_path(generation + 1), _record(me, now), "application/json"):
            if generation:
                if record is None or record["state"] != me.id:
                    notify(_taken_over(output, generation, record, now))
                for old in _generations(output):
                    if old <= generation:
                        output.delete(_path(old))
            return Lease(output, store, generation + 1)
        # another run created that generation first: look again


class Lease:
    """A run's hold on an output, renewed on a thread of its own until `close`."""

    def __init__(self, output: Storage, store: ClaimStore, generation: int) -> None:
        self.output, self.store, self.generation = output, store, generation
        self._lock = threading.Lock()
        self._lost: OutputTaken | None = None
        self._halt: Callable[[Exception], None] | None = None
        self._closed = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="owner-lease", daemon=True)
        self._renewer.start()

    def on_lost(self, halt: Callable[[Exception], None]) -> None:
        """Call `halt` with `OutputTaken` if another store takes the output over (at once if it already has)."""
        with self._lock:
            self._halt, lost = halt, self._lost
        if lost is not None:
            halt(lost)

    def close(self) -> None:
        """Stop renewing; the lease lapses by itself (see the module's docstring)."""
        self._closed.set()
        self._renewer.join()

    def _renew(self) -> None:
        while not self._closed.wait(LEASE_TTL_S / 3):
            try:
                generation, record = _newest(self.output)
                me = self.store.identity()
                if generation > self.generation:
                    if record is None or record["state"] != me.id:
                        self._lose(record)
                        return
                    self.generation = generation  # a process of this state took it after a lapse: still ours
                self.output.write_bytes(_path(self.generation), _record(me, time.time()), "application/json")
            except Exception:  # a storage or state hiccup: the next beat tries again, well within the TTL
                continue

    def _lose(self, record: dict | None) -> None:
        where = f" ({record['where']})" if record else ""
        lost = OutputTaken(
            f"{self.output.uri} was taken over by a run of another state{where} after this run's hold on it "
            f"lapsed (not renewed for {LEASE_TTL_S:.0f} s): stopped so that no content is charged twice; "
            f"runs on one output must share one state ({_SHARE})"
        )
        with self._lock:
            self._lost, halt = lost, self._halt
        if halt is not None:
            halt(lost)


def _verdict(record: dict | None, me: StateIdentity, now: float) -> Literal["join", "refuse", "take"]:
    """A live lease of another id at this store's own place is a store that was reset since (Redis restarted
    empty): the claims it guarded are gone with it, so it holds nothing back and is taken over."""
    if record is None or record["expires_at"] <= now or record["where"] == me.where and record["state"] != me.id:
        return "take"
    return "join" if record["state"] == me.id else "refuse"


def _path(generation: int) -> str:
    return f"{OWNER_DIR}/lease-{generation:08d}.json"


def _record(me: StateIdentity, now: float) -> bytes:
    return json.dumps({"state": me.id, "where": me.where, "renewed_at": now, "expires_at": now + LEASE_TTL_S}).encode()


def _generations(output: Storage) -> list[int]:
    return sorted(int(found[1]) for path in output.list_prefix(OWNER_DIR) if (found := _LEASE_NAME.fullmatch(path)))


def _newest(output: Storage) -> tuple[int, dict | None]:
    """The newest generation (0: none yet) and its record (None: none, or unreadable)."""
    while generations := _generations(output):
        try:
            data = output.read_bytes(_path(generations[-1]))
        except FileNotFoundError:  # taken over and cleared away while we looked: look again
            continue
        return generations[-1], _parse(data)
    return 0, None


def _parse(data: bytes) -> dict | None:
    """A lease's record with its fields typed; None if it is not one (edited, or written by something else)."""
    try:
        record = json.loads(data)
        return {
            "state": str(record["state"]),
            "where": str(record["where"]),
            "renewed_at": float(record["renewed_at"]),
            "expires_at": float(record["expires_at"]),
        }
    except (ValueError, KeyError, TypeError):
        return None


def _in_use(output: Storage, record: dict, now: float) -> str:
    return (
        f"{output.uri} is being enriched by a run that keeps its claims elsewhere ({record['where']}, renewed "
        f"{now - record['renewed_at']:.0f} s ago): runs on one output must share one state, or each content is "
        f"charged twice: share it ({_SHARE}), or re-run once that run has ended (its hold lapses {LEASE_TTL_S:.0f} s "
        "after)"
    )


def _taken_over(output: Storage, generation: int, record: dict | None, now: float) -> str:
    if record is None:
        return f"{output.uri_for(_path(generation))} was unreadable: replaced by this run's lease"
    return (
        f"{output.uri} was last enriched by a run that keeps its claims elsewhere ({record['where']}, "
        f"{now - record['renewed_at']:.0f} s ago); its hold has lapsed (or that state was reset) and this run "
        "takes the output over. "
        f"Runs at once on one output must share one state ({_SHARE})"
    )
