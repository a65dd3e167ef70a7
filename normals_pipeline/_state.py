"""Where a key's shared state lives, so every process that uses the key obeys one set of limits.

Three interchangeable stores, each holding per key: the pacing schedule (the next slot's time, see
`schedule_slot`), a cooldown after a 429, the last balance the API
reported, leases for requests in flight (a lease expires on its own, so a killed process cannot
hold credits forever), the key's turns (requests in flight and when the last minute's were answered, and
when each was sent), the rate the key has shown it takes when that is under the configured one (`Learned`,
from 429s), and the breaker that holds every sender while the API answers only 5xx (`Breaker`):

- `MemoryState`: one process (tests, scripts);
- `SQLiteState`: every process on one host, with no configuration (a file per key, named by a hash);
- `RedisState`: every host; times come from the Redis server so clocks on different hosts do not matter.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

import stamina
from filelock import FileLock

from .storage import LocalStorage

T = TypeVar("T")
BALANCE_TTL_S = 300.0  # a balance older than this is only a guess: a top-up may have happened


@dataclass(frozen=True)
class Reservation:
    decision: Literal["grant", "refuse", "wait"]
    balance: Decimal | None  # the shared balance when the decision was made
    in_flight: int = 0  # requests holding a lease then, in every process
    age_s: float | None = None  # how old the balance was


class KeyOps(Protocol):
    """The operations a request's start and end combine (see `KeyState.atomically`)."""

    def take_turn(self, token: str, limit: int, window_s: float, ttl_s: float) -> float: ...
    def end_turn(self, token: str, used: bool = True, answered: bool = False) -> None: ...
    def next_slot(self, interval_s: float, tolerance_s: float, spacing_s: float = 0.0, rpm: int = 0) -> float: ...
    def breaker_turn(self, token: str, probe_ttl_s: float) -> float: ...
    def cooldown_left(self) -> float: ...
    def reserve(self, lease: str, floor: Decimal, cost: Decimal, ttl_s: float) -> Reservation: ...
    def settle(self, lease: str, remaining: Decimal | None) -> None: ...


class KeyState(KeyOps, Protocol):
    # `work` over the state's operations, as one transaction where the store has them (SQLite), else one by one.
    def atomically(self, work: Callable[[KeyOps], T]) -> T: ...
    def lower_rate(self, token: str, limit: int, window_s: float) -> int: ...
    def announce_rate(self, rpm: int, limit: int) -> None: ...
    def learned_rate(self) -> int | None: ...
    def server_failed(self, token: str, counts: bool, after: int, open_s: float, max_open_s: float) -> None: ...
    def cool_down(self, seconds: float) -> None: ...
    def balance(self) -> Decimal | None: ...
    def known_balance(self) -> tuple[Decimal, float] | None: ...
    def forget_balance(self) -> None: ...


def takes_report(stored: Decimal | None, age_s: float, reported: Decimal) -> bool:
    """Whether a reported balance replaces the stored one. Answers arrive out of order (and the order
    the server charged in is not known here), so while the stored value is fresh only a lower report is
    taken; a rise is believed once the stored value has aged out, so a top-up shows within the TTL and,
    until then, the guards err on the side of spending less."""
    return stored is None or age_s >= BALANCE_TTL_S or reported <= stored


def decide(
    balance: Decimal | None, age_s: float, in_flight: int, floor: Decimal, cost: Decimal
) -> Literal["grant", "refuse", "wait"]:
    """Grant unless the balance, less what is in flight, would fall under the floor. With a floor and no
    fresh balance, one request at a time goes out until an answer tells the balance."""
    if balance is None or age_s >= BALANCE_TTL_S:
        return "wait" if floor > 0 and in_flight > 0 else "grant"
    return "refuse" if balance - (in_flight + 1) * cost < floor else "grant"


TURN_POLL_S = 0.05  # how often a caller looks again when every turn of the window is still in flight


def turn_wait(
    in_flight: int, answered: int, nth_answer: Callable[[int], float], now: float, limit: int, window_s: float
) -> float:
    """0 if a request may take a turn now, else how long to wait (s). `answered`: how many were answered in
    the last `window_s`; `nth_answer(i)`: the time of the i-th oldest of them.

    A request counts from its turn until `window_s` after its answer: the server counted it when it arrived,
    somewhere in between, so however late it arrived (a busy host, a slow network) the server never sees more
    than `limit` in any window. Counting from the turn alone cannot promise that."""
    excess = in_flight + answered - limit
    if excess < 0:
        return 0.0
    if answered > excess:  # the answers up to this one must age out to free a turn
        return max(nth_answer(excess) + window_s - now, 0.001)
    return TURN_POLL_S


def schedule_slot(
    tat: float, last: float, now: float, interval_s: float, tolerance_s: float, spacing_s: float
) -> tuple[float, float]:
    """One turn on the key's absolute schedule (GCRA): returns (when to send, the next slot's time).

    The slot is the theoretical arrival time `tat` and the next one is `interval_s` after it, however
    late this one is used: a late caller does not push back the slots after it. A caller later than
    `tolerance_s` gets `now - tolerance_s` instead, so an idle key saves up at most `tolerance_s` of
    slots. A slot already past is sent now, but at least `spacing_s` after the previous send (`last`),
    so making up lost time is a faster pace for a moment, never a burst. A cooldown moves `tat` to
    its end (see the stores' `cool_down`)."""
    slot = max(tat, now - tolerance_s)
    return max(slot, now, last + spacing_s), slot + interval_s


# The key's learned rate. The configured rate is an upper bound, not a fact: a 429 on a turn the schedule gave
# means the key takes less (a wrong setting, or another program on the key).
FIRST_HOLD_S = 300.0  # a lowered rate is held this long before its first step up: a step too far costs a 429
MAX_HOLD_S = 3600.0  # the hold doubles after each step that met a 429, up to this
LEARNED_TTL_S = 6 * 3600.0  # a learned rate with no 429 for this long is forgotten (the plan may have changed)
BUSY_SHARE = 0.9  # a minute with at least this share of the rate sent is a test of it; an idle one is not
STEP_SHARE = 20  # a step up is a twentieth of the configured rate (at least 1)


@dataclass(frozen=True)
class Learned:
    """The key's rate when a 429 showed the configured one is too high; shared like the schedule."""

    rpm: int
    since: float  # when it was last lowered (or announced): a 429 on a turn taken before is answered already
    raise_at: float  # no step up before this; then one per busy minute without a 429
    hold_s: float  # how long this lowering is held before the first step up
    probing: bool = False  # stepped up since the last 429: a 429 now says the step was one too many


def live(learned: Learned | None, now: float) -> Learned | None:
    """The learned rate, unless it has lapsed (no 429 for `LEARNED_TTL_S`)."""
    return learned if learned is not None and now < learned.since + LEARNED_TTL_S else None


def effective_rate(learned: Learned | None, limit: int, now: float) -> int:
    """The rate to keep to: the configured `limit`, or what the key has shown it takes if that is less."""
    learned = live(learned, now)
    return limit if learned is None else min(limit, learned.rpm)


def lowered(learned: Learned | None, limit: int, sent_at: float, observed: int, now: float) -> Learned:
    """The key's rate after a 429 on a turn taken at `sent_at`, when `observed` requests were sent on the key in
    the window before it (every process's, from the shared log of sends).

    A turn taken before the last lowering is ignored: that lowering answered it (the requests in flight when
    the first 429 came back meet the same full window). Otherwise the server had its limit's worth in its window
    when this one arrived, so the least lowering the 429 supports is to what was sent then (whatever share
    other programs took of the rest). `observed` leaves out the requests still in flight: taken before this one
    but sent late (a busy host), they may have arrived after it. A 429 at a learned rate that was not a step up
    means that rate itself was refused (a fixed window, or another program sending more): then at least a tenth
    less. Never under half in one step: a stray 429 is not a new limit. A step up that met a 429 doubles the
    hold before the next."""
    learned = live(learned, now)
    if learned is not None and sent_at < learned.since:
        return learned
    current = limit if learned is None else min(limit, learned.rpm)
    cut = 1 if learned is None or learned.probing else max(1, current // 10)
    rpm = max((current + 1) // 2, min(observed, current - cut))
    if learned is None:
        hold = FIRST_HOLD_S
    else:
        hold = min(MAX_HOLD_S, learned.hold_s * 2) if learned.probing else learned.hold_s
    return Learned(max(1, rpm), now, now + hold, hold)


def raised(learned: Learned | None, limit: int, busy: Callable[[], int], now: float, window_s: float) -> Learned | None:
    """The learned rate a step higher (a twentieth of `limit`), once its hold is over and the last window was
    busy (`busy()`: the requests sent in it) with no 429 since the last step; forgotten at `limit`."""
    learned = live(learned, now)
    if learned is None or now < learned.raise_at or busy() < BUSY_SHARE * min(limit, learned.rpm):
        return learned
    rpm = min(limit, learned.rpm) + max(1, limit // STEP_SHARE)
    return None if rpm >= limit else replace(learned, rpm=rpm, raise_at=now + window_s, probing=True)


def announced(rpm: int, limit: int, now: float) -> Learned | None:
    """The rate the API's headers state: believed at once, and not probed above for the longest hold."""
    return None if rpm >= limit else Learned(max(1, rpm), now, now + MAX_HOLD_S, MAX_HOLD_S)


def stretch(learned: Learned | None, rpm: int, now: float) -> float:
    """How much farther apart the schedule's slots are at the learned rate than at `rpm` (1: not at all)."""
    return rpm / effective_rate(learned, rpm, now) if rpm else 1.0


BREAKER_POLL_S = 0.2  # how often a sender held by the breaker looks whether the probe has answered


@dataclass(frozen=True)
class Breaker:
    """Consecutive 5xx on the key, and once there were enough, the pause that holds every sender."""

    failures: int = 0
    open_until: float = 0.0  # 0: closed
    open_for: float = 0.0  # the current pause: doubled by each probe that fails
    probe: str = ""  # the turn sent to find out whether the API is back, once the pause is over
    probe_until: float = 0.0  # a probe whose sender died is given up then


def breaker_failed(
    breaker: Breaker, token: str, counts: bool, now: float, after: int, open_s: float, max_open_s: float
) -> Breaker:
    """The breaker after the request of `token` failed: a 5xx (`counts`) or no answer at all. The `after`-th
    5xx in a row opens it for `open_s`; a failed probe reopens it for twice as long (at most `max_open_s`);
    requests in flight when it opened change nothing."""
    if breaker.open_until:
        if breaker.probe != token:
            return breaker
        pause = min(max_open_s, breaker.open_for * 2)
        return Breaker(breaker.failures + 1, now + pause, pause)
    if not counts:
        return breaker
    if breaker.failures + 1 >= after:
        return Breaker(breaker.failures + 1, now + open_s, open_s)
    return replace(breaker, failures=breaker.failures + 1)


def breaker_turn(breaker: Breaker, token: str, now: float, probe_ttl_s: float) -> tuple[float, Breaker]:
    """(0, …) if `token` may send: the breaker is closed, or its pause is over and `token` is the one probe;
    else (how long to wait, …)."""
    if not breaker.open_until:
        return 0.0, breaker
    if now < breaker.open_until:
        return breaker.open_until - now, breaker
    if breaker.probe in ("", token) or now >= breaker.probe_until:
        return 0.0, replace(breaker, probe=token, probe_until=now + probe_ttl_s)
    return BREAKER_POLL_S, breaker


class MemoryState:
    """State for one process only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cooldown_until = 0.0
        self._tat = 0.0  # the next slot on the pacing schedule
        self._last_send = 0.0
        self._balance: tuple[Decimal, float] | None = None
        self._leases: dict[str, float] = {}
        self._turns: dict[str, float] = {}  # token -> when the turn lapses if never ended
        self._answered: dict[str, float] = {}  # token -> when it was answered
        self._sent: dict[str, float] = {}  # token -> when its turn was taken, for a window and a turn's life
        self._learned: Learned | None = None
        self._breaker = Breaker()

    def atomically(self, work: Callable[[KeyOps], T]) -> T:
        return work(self)  # one by one, each atomic: what another thread does in between is what it always did

    def take_turn(self, token: str, limit: int, window_s: float, ttl_s: float) -> float:
        with self._lock:
            now = time.time()
            self._answered.update({t: lapse for t, lapse in self._turns.items() if lapse <= now})
            self._turns = {t: lapse for t, lapse in self._turns.items() if lapse > now}
            self._answered = {t: at for t, at in self._answered.items() if at > now - window_s}
            self._sent = {t: at for t, at in self._sent.items() if at > now - window_s - ttl_s}
            sent = self._sent.values()
            self._learned = raised(self._learned, limit, lambda: sum(at > now - window_s for at in sent), now, window_s)
            rate = effective_rate(self._learned, limit, now)
            answered = self._answered.values()
            wait = turn_wait(len(self._turns), len(answered), lambda i: sorted(answered)[i], now, rate, window_s)
            if wait == 0:
                self._turns[token] = now + ttl_s
                self._sent[token] = now
            return wait

    def end_turn(self, token: str, used: bool = True, answered: bool = False) -> None:
        with self._lock:
            self._turns.pop(token, None)
            if used:
                self._answered[token] = time.time()
            else:
                self._sent.pop(token, None)
                if self._breaker.probe == token:  # a probe never sent: the next sender probes
                    self._breaker = replace(self._breaker, probe="")
            if answered:
                self._breaker = Breaker()

    def next_slot(self, interval_s: float, tolerance_s: float, spacing_s: float = 0.0, rpm: int = 0) -> float:
        """Take the next slot on the schedule; returns how long to wait for it (seconds, >= 0). `rpm`: the
        configured rate `interval_s` is for; under a learned lower rate, the slots are farther apart."""
        with self._lock:
            now = time.time()
            scale = stretch(self._learned, rpm, now)
            send, self._tat = schedule_slot(
                self._tat, self._last_send, now, interval_s * scale, tolerance_s, spacing_s * scale
            )
            self._last_send = send
            return send - now

    def lower_rate(self, token: str, limit: int, window_s: float) -> int:
        """A 429 on `token`'s turn: lower the key's rate (see `lowered`); returns the rate now."""
        with self._lock:
            now = time.time()
            sent_at = self._sent.get(token, now)
            answered = (at for t, at in self._sent.items() if t != token and t not in self._turns)
            observed = sum(sent_at - window_s <= at <= sent_at for at in answered)
            self._learned = lowered(self._learned, limit, sent_at, observed, now)
            return effective_rate(self._learned, limit, now)

    def announce_rate(self, rpm: int, limit: int) -> None:
        with self._lock:
            self._learned = announced(rpm, limit, time.time())

    def learned_rate(self) -> int | None:
        learned = live(self._learned, time.time())
        return learned.rpm if learned else None

    def breaker_turn(self, token: str, probe_ttl_s: float) -> float:
        with self._lock:
            wait, self._breaker = breaker_turn(self._breaker, token, time.time(), probe_ttl_s)
            return wait

    def server_failed(self, token: str, counts: bool, after: int, open_s: float, max_open_s: float) -> None:
        with self._lock:
            self._breaker = breaker_failed(self._breaker, token, counts, time.time(), after, open_s, max_open_s)

    def cooldown_left(self) -> float:
        return max(0.0, self._cooldown_until - time.time())

    def cool_down(self, seconds: float) -> None:
        with self._lock:
            self._cooldown_until = max(self._cooldown_until, time.time() + seconds)
            self._tat = max(self._tat, self._cooldown_until)  # no slot in the pause, none saved up by it

    def _live_leases(self, now: float) -> int:
        self._leases = {lease: expiry for lease, expiry in self._leases.items() if expiry > now}
        return len(self._leases)

    def reserve(self, lease: str, floor: Decimal, cost: Decimal, ttl_s: float) -> Reservation:
        with self._lock:
            now = time.time()
            balance, at = self._balance or (None, now)
            in_flight = self._live_leases(now)
            decision = decide(balance, now - at, in_flight, floor, cost)
            if decision == "grant":
                self._leases[lease] = now + ttl_s
            return Reservation(decision, balance, in_flight, now - at if balance is not None else None)

    def settle(self, lease: str, remaining: Decimal | None) -> None:
        with self._lock:
            now = time.time()
            self._leases.pop(lease, None)
            stored, at = self._balance or (None, now)
            if remaining is not None and takes_report(stored, now - at, remaining):
                self._balance = (remaining, now)

    def balance(self) -> Decimal | None:
        return self._balance[0] if self._balance else None

    def known_balance(self) -> tuple[Decimal, float] | None:
        """The last reported balance and its age in seconds, without a reservation (the plan reads it)."""
        with self._lock:
            known = self._balance
        return (known[0], time.time() - known[1]) if known else None

    def forget_balance(self) -> None:
        with self._lock:
            self._balance = None


# synchronous=NORMAL (as the claims'): a commit survives any process's crash, not a power cut, which ends every run
# on the host too. A power cut may lose the last commits' turns, leases and balance: live state that matters only
# to a run started again within the minute those turns count for (a 429 then lowers the rate, as any does). FULL
# cost an fsync per commit, two per request.
_SQLITE_SCHEMA = """
PRAGMA synchronous=NORMAL;
CREATE TABLE IF NOT EXISTS cooldown (id INTEGER PRIMARY KEY CHECK (id = 1), until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS balance (id INTEGER PRIMARY KEY CHECK (id = 1), value TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pace (id INTEGER PRIMARY KEY CHECK (id = 1), tat REAL NOT NULL, last REAL NOT NULL);
CREATE TABLE IF NOT EXISTS turns (id TEXT PRIMARY KEY, lapses REAL NOT NULL);
CREATE TABLE IF NOT EXISTS answered (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS answered_at ON answered (at);
CREATE TABLE IF NOT EXISTS sent (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sent_at ON sent (at);
CREATE TABLE IF NOT EXISTS learned (id INTEGER PRIMARY KEY CHECK (id = 1), rpm INTEGER NOT NULL, since REAL NOT NULL,
    raise_at REAL NOT NULL, hold_s REAL NOT NULL, probing INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS breaker (id INTEGER PRIMARY KEY CHECK (id = 1), failures INTEGER NOT NULL,
    open_until REAL NOT NULL, open_for REAL NOT NULL, probe TEXT NOT NULL, probe_until REAL NOT NULL);
"""


_CLAIMS_SCHEMA = """
PRAGMA synchronous=NORMAL;
CREATE TABLE IF NOT EXISTS claims (name TEXT PRIMARY KEY, owner TEXT, expires REAL);
CREATE TABLE IF NOT EXISTS rebuilt (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS changes (namespace TEXT PRIMARY KEY, epoch TEXT, seq INTEGER, owner TEXT, streak INTEGER);
"""
# A claims file rebuilt after it could not be read grants nothing for one claim lifetime: a claim the lost file
# held (a request in flight in another process) lapses by then, or its map is stored and reused.
_CLAIMS_REBUILT = "INSERT OR REPLACE INTO rebuilt VALUES (1, (julianday('now') - 2440587.5) * 86400.0);"


def _is_locked(error: Exception) -> bool:
    return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)


_CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
QUARANTINE_DIR = "quarantine"  # beside the state files: a corrupt one is moved here, never deleted
_set_aside: list[str] = []  # warnings not yet shown, for `take_set_aside_warnings`
_set_aside_lock = threading.Lock()


def take_set_aside_warnings() -> list[str]:
    """The warnings of state files this process set aside since the last call, one line each: whoever
    talks to the user (the CLI, an asset's log) shows them, once."""
    with _set_aside_lock:
        taken = _set_aside[:]
        _set_aside.clear()
    return taken


def open_sqlite(path: Path, setup: str, *, lost: str = "", rebuild: str = "") -> sqlite3.Connection:
    """A connection to a state file shared by processes, in WAL mode with `setup` (a script) run.

    A file SQLite cannot read (overwritten, cut short) would fail every run: it is moved to `quarantine/`
    beside it, with its WAL, and a new one made, with `rebuild` (a script) run on it; a warning naming both
    and saying what was `lost` is kept for `take_set_aside_warnings`. Processes meeting it at once take a
    lock and look again first, so a file one of them has just rebuilt is not set aside too.
    """
    try:
        return _open_checked(path, setup)
    except sqlite3.DatabaseError as error:
        if getattr(error, "sqlite_errorcode", None) not in _CORRUPT:
            raise
    with FileLock(f"{path}.lock"):
        try:
            return _open_checked(path, setup)
        except sqlite3.DatabaseError as error:
            if getattr(error, "sqlite_errorcode", None) not in _CORRUPT:
                raise
            warning = _set_aside_file(path, error, lost)
        db = _open_checked(path, setup)
        db.executescript(rebuild)
    with _set_aside_lock:
        _set_aside.append(warning)
    return db


def _open_checked(path: Path, setup: str) -> sqlite3.Connection:
    """Open, set up and check the file (SQLite finds most damage only when a page is read).

    Switching a new file to WAL takes an exclusive lock that SQLite's busy timeout does not wait for, so
    processes that start together on a fresh folder (a backfill's first runs) can meet "database is locked":
    the set-up is retried for a while instead of failing the run.
    """
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        for attempt in stamina.retry_context(on=_is_locked, attempts=None, timeout=30, wait_initial=0.01, wait_max=0.5):
            with attempt:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(setup)
        problems = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            error = sqlite3.DatabaseError("; ".join(problems))
            error.sqlite_errorcode = sqlite3.SQLITE_CORRUPT  # type: ignore[attr-defined]
            raise error
    except BaseException:
        db.close()
        raise
    return db


def _set_aside_file(path: Path, error: Exception, lost: str) -> str:
    """Move `path` and its WAL files to `quarantine/<name>.<time>` (as a corrupt manifest is); the warning."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    folder = path.parent / QUARANTINE_DIR
    folder.mkdir(exist_ok=True)
    target = folder / f"{path.name}.{stamp}"
    for suffix in ("-wal", "-shm", ""):  # the main file last: a new one must not meet the old WAL
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}{suffix}", f"{folder / path.name}{suffix}.{stamp}")
    return (
        f"state file {path.as_uri()} could not be read ({type(error).__name__}: {str(error)[:120]}); "
        f"moved to {target.as_uri()} and rebuilt empty{': ' + lost if lost else ''}"
    )


def default_state_dir() -> Path:
    """`NORMALS_STATE_DIR`, else the user's cache folder: the same for every process of the user."""
    if configured := os.environ.get("NORMALS_STATE_DIR"):
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "normals-pipeline"


def _read_learned(db: sqlite3.Connection) -> Learned | None:
    row = db.execute("SELECT rpm, since, raise_at, hold_s, probing FROM learned").fetchone()
    return Learned(row[0], row[1], row[2], row[3], bool(row[4])) if row else None


def _write_learned(db: sqlite3.Connection, learned: Learned | None) -> None:
    db.execute("DELETE FROM learned")
    if learned is not None:
        db.execute(
            "INSERT INTO learned VALUES (1, ?, ?, ?, ?, ?)",
            (learned.rpm, learned.since, learned.raise_at, learned.hold_s, int(learned.probing)),
        )


def _read_breaker(db: sqlite3.Connection) -> Breaker:
    row = db.execute("SELECT failures, open_until, open_for, probe, probe_until FROM breaker").fetchone()
    return Breaker(*row) if row else Breaker()


def _write_breaker(db: sqlite3.Connection, breaker: Breaker) -> None:
    db.execute(
        "INSERT OR REPLACE INTO breaker VALUES (1, ?, ?, ?, ?, ?)",
        (breaker.failures, breaker.open_until, breaker.open_for, breaker.probe, breaker.probe_until),
    )


@dataclass
class _Job:
    """One caller's transaction waiting in a `GroupCommit`, and what came of it once committed."""

    work: Callable[[sqlite3.Connection, float], Any]
    value: Any = None
    error: BaseException | None = None
    finished: bool = False
    wake: threading.Event = field(default_factory=threading.Event)  # finished, or its turn to commit

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class StateFileReplaced(Exception):
    """The state file this process writes is no longer the one at its path: another process found it damaged,
    set it aside and made a new one (`open_sqlite`). What this process writes would reach no one else (two
    runs claiming one content in two files), so its transactions stop; the next run opens the new file."""


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class GroupCommit:
    """Write transactions of many threads on one connection, committed together: a caller that finds no commit
    under way runs every transaction waiting (its own included) in one SQLite transaction, then hands each its
    result. With 64 workers, each request's start and end would otherwise queue for the connection one by one,
    holding it across every switch of the interpreter's lock; now one commit and one turn at the file serve a
    batch. Each caller's work still runs whole and alone (serialised, as separate transactions would be), and
    no caller hears its result before the commit that makes it durable. Only the callers of a batch are woken,
    and the first one waiting after it commits next. `lock` guards the connection for reads. `path`: the file
    `db` opened; every transaction first checks it is still the one there (`StateFileReplaced`)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock, path: Path) -> None:
        self._db = db
        self.lock = lock
        self._path = path
        self._identity = _identity(path)
        self._guard = threading.Lock()
        self._pending: list[_Job] = []
        self._committing = False

    def run(self, work: Callable[[sqlite3.Connection, float], T]) -> T:
        """`work(db, now)` as (part of) one write transaction: other processes wait for it (BEGIN IMMEDIATE)."""
        job = _Job(work)
        with self._guard:
            self._pending.append(job)
            leads = not self._committing
            self._committing = True
        if not leads:
            job.wake.wait()  # committed by another caller, or handed the next commit
        if not job.finished:
            with self._guard:
                batch, self._pending = self._pending, []  # ours among them
            self._commit(batch)
            for done in batch:
                done.wake.set()
            with self._guard:
                if self._pending:
                    self._pending[0].wake.set()  # the first waiting commits next
                else:
                    self._committing = False
        return job.result()

    def _commit(self, batch: list[_Job]) -> None:
        """The batch as one transaction; should any work fail, each is run again in a transaction of its own,
        so one caller's failure is only its own."""
        try:
            with self.lock:
                self._in_transaction(batch)
        except BaseException as error:  # noqa: BLE001 - handed to the callers below
            if len(batch) == 1:
                batch[0].error = error
            else:
                for job in batch:
                    self._commit([job])
        finally:
            for job in batch:
                job.finished = True

    def _in_transaction(self, batch: list[_Job]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if _identity(self._path) != self._identity:
                raise StateFileReplaced(
                    f"{self._path} was set aside and made anew by another process since this one opened it: "
                    "this run's claims and turns would reach no other run"
                )
            values = [job.work(self._db, time.time()) for job in batch]
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        for job, value in zip(batch, values):
            job.value = value


class _Txn:
    """The key's state as one SQLite write transaction sees it (`db` at `now`): the stores' operations, so
    that several can run as one transaction (`SQLiteState.atomically`) or each as its own."""

    def __init__(self, db: sqlite3.Connection, now: float) -> None:
        self.db, self.now = db, now

    def take_turn(self, token: str, limit: int, window_s: float, ttl_s: float) -> float:
        db, now = self.db, self.now
        db.execute("INSERT OR REPLACE INTO answered SELECT id, lapses FROM turns WHERE lapses <= ?", (now,))
        db.execute("DELETE FROM turns WHERE lapses <= ?", (now,))
        db.execute("DELETE FROM answered WHERE at <= ?", (now - window_s,))
        db.execute("DELETE FROM sent WHERE at <= ?", (now - window_s - ttl_s,))

        def busy() -> int:
            return db.execute("SELECT count(*) FROM sent WHERE at > ?", (now - window_s,)).fetchone()[0]

        learned = _read_learned(db)
        if (now_learned := raised(learned, limit, busy, now, window_s)) != learned:
            _write_learned(db, now_learned)
        rate = effective_rate(now_learned, limit, now)
        in_flight = db.execute("SELECT count(*) FROM turns").fetchone()[0]
        answered = db.execute("SELECT count(*) FROM answered").fetchone()[0]

        def oldest(index: int) -> float:
            return db.execute("SELECT at FROM answered ORDER BY at LIMIT 1 OFFSET ?", (index,)).fetchone()[0]

        wait = turn_wait(in_flight, answered, oldest, now, rate, window_s)
        if wait == 0:
            db.execute("INSERT INTO turns VALUES (?, ?)", (token, now + ttl_s))
            db.execute("INSERT OR REPLACE INTO sent VALUES (?, ?)", (token, now))
        return wait

    def end_turn(self, token: str, used: bool = True, answered: bool = False) -> None:
        db = self.db
        db.execute("DELETE FROM turns WHERE id = ?", (token,))
        if used:
            db.execute("INSERT OR REPLACE INTO answered VALUES (?, ?)", (token, self.now))
        else:
            db.execute("DELETE FROM sent WHERE id = ?", (token,))
            db.execute("UPDATE breaker SET probe = '' WHERE probe = ?", (token,))  # never sent: another probes
        if answered:
            db.execute("DELETE FROM breaker")

    def next_slot(self, interval_s: float, tolerance_s: float, spacing_s: float = 0.0, rpm: int = 0) -> float:
        scale = stretch(_read_learned(self.db), rpm, self.now)
        tat, last = self.db.execute("SELECT tat, last FROM pace").fetchone() or (0.0, 0.0)
        send, tat = schedule_slot(tat, last, self.now, interval_s * scale, tolerance_s, spacing_s * scale)
        self.db.execute("INSERT OR REPLACE INTO pace VALUES (1, ?, ?)", (tat, send))
        return send - self.now

    def breaker_turn(self, token: str, probe_ttl_s: float) -> float:
        before = _read_breaker(self.db)
        wait, breaker = breaker_turn(before, token, self.now, probe_ttl_s)
        if breaker != before:
            _write_breaker(self.db, breaker)
        return wait

    def cooldown_left(self) -> float:
        row = self.db.execute("SELECT until FROM cooldown").fetchone()
        return max(0.0, row[0] - self.now) if row else 0.0

    def _balance_state(self) -> tuple[Decimal | None, float, int]:
        self.db.execute("DELETE FROM leases WHERE expires <= ?", (self.now,))
        in_flight = self.db.execute("SELECT count(*) FROM leases").fetchone()[0]
        row = self.db.execute("SELECT value, at FROM balance").fetchone()
        return (Decimal(row[0]), self.now - row[1], in_flight) if row else (None, 0.0, in_flight)

    def reserve(self, lease: str, floor: Decimal, cost: Decimal, ttl_s: float) -> Reservation:
        balance, age, in_flight = self._balance_state()
        decision = decide(balance, age, in_flight, floor, cost)
        if decision == "grant":
            self.db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?)", (lease, self.now + ttl_s))
        return Reservation(decision, balance, in_flight, age if balance is not None else None)

    def settle(self, lease: str, remaining: Decimal | None) -> None:
        self.db.execute("DELETE FROM leases WHERE id = ?", (lease,))
        if remaining is None:
            return
        stored, age, _ = self._balance_state()
        if takes_report(stored, age, remaining):
            self.db.execute(
                "INSERT INTO balance VALUES (1, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET value = excluded.value, at = excluded.at",
                (str(remaining), self.now),
            )


class SQLiteState:
    """State in SQLite files under `folder`, named by the key's fingerprint; SQLite's own locking makes
    each read-modify-write atomic across processes."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        lost = "the key's balance is unknown until an answer reports it; its cooldown and leases start empty"
        path = folder / f"{fingerprint}.state.sqlite"
        self._db = open_sqlite(path, _SQLITE_SCHEMA, lost=lost)
        self._lock = threading.Lock()
        self._commits = GroupCommit(self._db, self._lock, path)
        # Reads (the balance a live view shows, the breaker's and the pause's look) on a connection of their own:
        # WAL readers never wait for a writer, so they do not queue behind a batch being committed.
        self._reader = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._read_lock = threading.Lock()

    def _read(self, query: str) -> tuple | None:
        with self._read_lock:
            return self._reader.execute(query).fetchone()

    def atomically(self, work: Callable[[KeyOps], T]) -> T:
        """`work` over the key's state as one transaction: one commit for several operations (a request's
        start or end), and no other process's operation in between."""
        return self._transaction(lambda db, now: work(_Txn(db, now)))

    def take_turn(self, token: str, limit: int, window_s: float, ttl_s: float) -> float:
        return self.atomically(lambda ops: ops.take_turn(token, limit, window_s, ttl_s))

    def end_turn(self, token: str, used: bool = True, answered: bool = False) -> None:
        self.atomically(lambda ops: ops.end_turn(token, used, answered))

    def next_slot(self, interval_s: float, tolerance_s: float, spacing_s: float = 0.0, rpm: int = 0) -> float:
        """Take the next slot on the schedule; returns how long to wait for it (seconds, >= 0). `rpm`: the
        configured rate `interval_s` is for; under a learned lower rate, the slots are farther apart."""
        return self.atomically(lambda ops: ops.next_slot(interval_s, tolerance_s, spacing_s, rpm))

    def lower_rate(self, token: str, limit: int, window_s: float) -> int:
        """A 429 on `token`'s turn: lower the key's rate (see `lowered`); returns the rate now."""

        def work(db: sqlite3.Connection, now: float) -> int:
            row = db.execute("SELECT at FROM sent WHERE id = ?", (token,)).fetchone()
            sent_at = row[0] if row else now
            observed = db.execute(
                "SELECT count(*) FROM sent WHERE at >= ? AND at <= ? AND id != ? AND id NOT IN (SELECT id FROM turns)",
                (sent_at - window_s, sent_at, token),
            ).fetchone()[0]
            learned = lowered(_read_learned(db), limit, sent_at, observed, now)
            _write_learned(db, learned)
            return effective_rate(learned, limit, now)

        return self._transaction(work)

    def announce_rate(self, rpm: int, limit: int) -> None:
        self._transaction(lambda db, now: _write_learned(db, announced(rpm, limit, now)))

    def learned_rate(self) -> int | None:
        with self._read_lock:
            learned = live(_read_learned(self._reader), time.time())
        return learned.rpm if learned else None

    def breaker_turn(self, token: str, probe_ttl_s: float) -> float:
        if not self._read("SELECT 1 FROM breaker WHERE open_until > 0"):  # closed nearly always: nothing to write
            return 0.0
        return self.atomically(lambda ops: ops.breaker_turn(token, probe_ttl_s))

    def server_failed(self, token: str, counts: bool, after: int, open_s: float, max_open_s: float) -> None:
        def work(db: sqlite3.Connection, now: float) -> None:
            _write_breaker(db, breaker_failed(_read_breaker(db), token, counts, now, after, open_s, max_open_s))

        self._transaction(work)

    def _transaction(self, work: Callable[[sqlite3.Connection, float], T]) -> T:
        """Run `work(db, now)` as one write transaction, committed with those of other threads waiting then."""
        return self._commits.run(work)

    def cooldown_left(self) -> float:
        row = self._read("SELECT until FROM cooldown")
        return max(0.0, row[0] - time.time()) if row else 0.0

    def cool_down(self, seconds: float) -> None:
        def work(db: sqlite3.Connection, now: float) -> None:
            db.execute(
                "INSERT INTO cooldown VALUES (1, ?) ON CONFLICT(id) DO UPDATE SET until = max(until, excluded.until)",
                (now + seconds,),
            )
            # No slot in the pause, and none saved up by it.
            db.execute(
                "INSERT INTO pace VALUES (1, ?, 0) ON CONFLICT(id) DO UPDATE SET tat = max(tat, excluded.tat)",
                (now + seconds,),
            )

        self._transaction(work)

    def reserve(self, lease: str, floor: Decimal, cost: Decimal, ttl_s: float) -> Reservation:
        return self.atomically(lambda ops: ops.reserve(lease, floor, cost, ttl_s))

    def settle(self, lease: str, remaining: Decimal | None) -> None:
        self.atomically(lambda ops: ops.settle(lease, remaining))

    def balance(self) -> Decimal | None:
        known = self.known_balance()
        return known[0] if known else None

    def known_balance(self) -> tuple[Decimal, float] | None:
        """The last reported balance and its age in seconds: a read, no transaction."""
        row = self._read("SELECT value, at FROM balance")
        return (Decimal(row[0]), time.time() - row[1]) if row else None

    def forget_balance(self) -> None:
        self._transaction(lambda db, now: db.execute("DELETE FROM balance"))


_REDIS_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"

# KEYS: leases, balance. ARGV: lease, ttl_ms, floor, cost, balance_ttl_ms. The same rule as `decide`:
# returns {1 grant | 0 refuse | 2 wait, balance|false, in flight, balance age in ms (-1: none)}.
_REDIS_RESERVE = (
    _REDIS_NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local in_flight = redis.call('ZCARD', KEYS[1])
local bal = redis.call('HMGET', KEYS[2], 'value', 'at')
local age = bal[1] and (now - tonumber(bal[2])) or -1
if bal[1] and age < tonumber(ARGV[5]) then
  if tonumber(bal[1]) - (in_flight + 1) * tonumber(ARGV[4]) < tonumber(ARGV[3]) then
    return {0, bal[1], in_flight, age}
  end
elseif tonumber(ARGV[3]) > 0 and in_flight > 0 then
  return {2, bal[1] or false, in_flight, age}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return {1, bal[1] or false, in_flight, age}
"""
)

# KEYS: leases, balance. ARGV: lease, remaining ('' if none), balance_ttl_ms. The rule of `takes_report`.
_REDIS_SETTLE = (
    _REDIS_NOW
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] == '' then return 0 end
local bal = redis.call('HMGET', KEYS[2], 'value', 'at')
if (not bal[1]) or now - tonumber(bal[2]) >= tonumber(ARGV[3]) or tonumber(ARGV[2]) <= tonumber(bal[1]) then
  redis.call('HSET', KEYS[2], 'value', ARGV[2], 'at', now)
end
return 1
"""
)

# KEYS: cooldown, pace. ARGV: seconds (0 = only read). Returns the milliseconds left. A new pause (not a
# read) also moves the schedule's next slot (`tat`, in microseconds) to its end, as `MemoryState.cool_down`.
_REDIS_COOLDOWN = (
    _REDIS_NOW
    + """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local wanted = now + math.floor(tonumber(ARGV[1]) * 1000)
if wanted > current then
  redis.call('SET', KEYS[1], wanted, 'PX', wanted - now + 1000)
  current = wanted
  if tonumber(ARGV[1]) > 0 and tonumber(redis.call('HGET', KEYS[2], 'tat') or '0') < wanted * 1000 then
    redis.call('HSET', KEYS[2], 'tat', string.format('%.0f', wanted * 1000))
    redis.call('PEXPIRE', KEYS[2], wanted - now + 60000)
  end
end
return math.max(0, current - now)
"""
)

# KEYS: pace, learned. ARGV: interval, tolerance, spacing (microseconds), configured rpm. `schedule_slot` on the
# Redis server's clock, in microseconds, with the slots farther apart under a learned lower rate (`stretch`);
# returns the microseconds to wait. The schedule lapses a minute after its last slot.
_REDIS_NEXT_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, spacing, rpm = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
local learned = tonumber(redis.call('HGET', KEYS[2], 'rpm') or '0')
if rpm > 0 and learned > 0 and learned < rpm then
  interval, spacing = interval * rpm / learned, spacing * rpm / learned
end
local pace = redis.call('HMGET', KEYS[1], 'tat', 'last')
local slot = math.max(tonumber(pace[1] or '0'), now - tonumber(ARGV[2]))
local send = math.max(slot, now, tonumber(pace[2] or '0') + spacing)
local tat = slot + interval
redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', tat), 'last', string.format('%.0f', send))
redis.call('PEXPIRE', KEYS[1], math.floor(math.max(0, tat - now, send - now) / 1000) + 60000)
return string.format('%.0f', send - now)
"""


# KEYS: turns, answered, sent (sorted sets: lapse time, answer time, turn time; ms on the Redis server's clock),
# learned. ARGV: token, limit, window, ttl (ms), poll (ms), busy share, step share. `raised` (the learned rate
# lapses by itself: its key expires), then `turn_wait` at the effective rate: returns 0 (taken) or ms to wait.
_REDIS_TAKE_TURN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, window, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES')
for i = 1, #lapsed, 2 do redis.call('ZADD', KEYS[2], lapsed[i + 1], lapsed[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window - ttl)
local learned = redis.call('HMGET', KEYS[4], 'rpm', 'raise_at')
if learned[1] then
  local rpm = math.min(limit, tonumber(learned[1]))
  if now / 1000 >= tonumber(learned[2])
      and redis.call('ZCOUNT', KEYS[3], '(' .. (now - window), '+inf') >= tonumber(ARGV[6]) * rpm then
    rpm = rpm + math.max(1, math.floor(limit / tonumber(ARGV[7])))
    if rpm >= limit then
      redis.call('DEL', KEYS[4])
    else
      redis.call('HSET', KEYS[4], 'rpm', rpm, 'raise_at', string.format('%.3f', (now + window) / 1000), 'probing', 1)
    end
  end
  limit = math.min(limit, rpm)
end
local in_flight, answered = redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])
if in_flight + answered < limit then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl + window)
  redis.call('ZADD', KEYS[3], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[3], ttl + window)
  return 0
end
local excess = in_flight + answered - limit
if answered > excess then
  local freeing = redis.call('ZRANGE', KEYS[2], excess, excess, 'WITHSCORES')
  return math.max(tonumber(freeing[2]) + window - now, 1)
end
return tonumber(ARGV[5])
"""

# KEYS: turns, answered, sent, breaker. ARGV: token, used (1/0), window (ms), answered (1/0). A used turn is logged
# as answered now; a void one leaves the log of sends, and the probe if it held it; an answer closes the breaker.
_REDIS_END_TURN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
else
  redis.call('ZREM', KEYS[3], ARGV[1])
  if redis.call('HGET', KEYS[4], 'probe') == ARGV[1] then redis.call('HSET', KEYS[4], 'probe', '') end
end
if ARGV[4] == '1' then redis.call('DEL', KEYS[4]) end
"""

# KEYS: breaker. ARGV: token, probe ttl (s), poll (s). `breaker_turn` on the Redis server's clock (seconds):
# returns the seconds to wait, as text ('0': go).
_REDIS_BREAKER_TURN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'open_until', 'probe', 'probe_until')
local open_until = tonumber(b[1] or '0')
if open_until == 0 then return '0' end
if now < open_until then return string.format('%.6f', open_until - now) end
if (b[2] or '') == '' or b[2] == ARGV[1] or now >= tonumber(b[3] or '0') then
  redis.call('HSET', KEYS[1], 'probe', ARGV[1], 'probe_until', string.format('%.6f', now + tonumber(ARGV[2])))
  return '0'
end
return ARGV[3]
"""


# KEYS: sent, turns. ARGV: token, window (ms). For `lowered`: when the token's turn was taken (ms; now if unknown),
# and how many other turns were taken in the window up to it and are no longer in flight.
_REDIS_OBSERVED = """
local sent_at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if sent_at then
  sent_at = tonumber(sent_at)
else
  local t = redis.call('TIME')
  sent_at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local observed = 0
for _, other in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], sent_at - tonumber(ARGV[2]), sent_at)) do
  if other ~= ARGV[1] and not redis.call('ZSCORE', KEYS[2], other) then observed = observed + 1 end
end
return {string.format('%.0f', sent_at), observed}
"""


def _seconds(redis_time: tuple[int, int]) -> float:
    """Redis `TIME` as seconds."""
    return int(redis_time[0]) + int(redis_time[1]) / 1e6


class RedisState:
    """State in Redis under `normals:<fingerprint>:*`, for processes on several hosts."""

    def __init__(self, url: str, fingerprint: str) -> None:
        import redis

        self._redis: Any = redis.Redis.from_url(url)
        prefix = f"normals:{fingerprint}"
        names = ("pace", "cooldown", "leases", "balance", "turns", "answered", "sent", "learned", "breaker")
        self._keys = {name: f"{prefix}:{name}" for name in names}
        self._reserve = self._redis.register_script(_REDIS_RESERVE)
        self._settle = self._redis.register_script(_REDIS_SETTLE)
        self._cooldown = self._redis.register_script(_REDIS_COOLDOWN)
        self._next_slot = self._redis.register_script(_REDIS_NEXT_SLOT)
        self._take_turn = self._redis.register_script(_REDIS_TAKE_TURN)
        self._end_turn = self._redis.register_script(_REDIS_END_TURN)
        self._breaker_turn = self._redis.register_script(_REDIS_BREAKER_TURN)
        self._observed = self._redis.register_script(_REDIS_OBSERVED)
        self._window_ms = 60_000  # the last take_turn's window: how long end_turn keeps an answer

    def atomically(self, work: Callable[[KeyOps], T]) -> T:
        return work(self)  # one script per operation, each atomic on the server, as separate calls always were

    def _turn_keys(self) -> list[str]:
        return [self._keys[name] for name in ("turns", "answered", "sent")]

    def take_turn(self, token: str, limit: int, window_s: float, ttl_s: float) -> float:
        self._window_ms = round(window_s * 1000)
        args = [token, limit, self._window_ms, round(ttl_s * 1000), round(TURN_POLL_S * 1000), BUSY_SHARE, STEP_SHARE]
        return int(self._take_turn(keys=[*self._turn_keys(), self._keys["learned"]], args=args)) / 1000

    def end_turn(self, token: str, used: bool = True, answered: bool = False) -> None:
        args = [token, int(used), self._window_ms, int(answered)]
        self._end_turn(keys=[*self._turn_keys(), self._keys["breaker"]], args=args)

    def next_slot(self, interval_s: float, tolerance_s: float, spacing_s: float = 0.0, rpm: int = 0) -> float:
        """Take the next slot on the schedule (Redis server's clock); returns how long to wait for it (s)."""
        args = [round(interval_s * 1e6), round(tolerance_s * 1e6), round(spacing_s * 1e6), rpm]
        return int(self._next_slot(keys=[self._keys["pace"], self._keys["learned"]], args=args)) / 1e6

    def lower_rate(self, token: str, limit: int, window_s: float) -> int:
        """A 429 on `token`'s turn: lower the key's rate (see `lowered`); returns the rate now."""
        sent = self._keys["sent"]

        def work(pipe: Any) -> int:
            now = _seconds(pipe.time())
            sent_ms, observed = self._observed(keys=[sent, self._keys["turns"]], args=[token, round(window_s * 1000)])
            learned = lowered(self._read_learned(pipe), limit, int(sent_ms) / 1000, int(observed), now)
            pipe.multi()
            self._write_learned(pipe, learned, now)
            return effective_rate(learned, limit, now)

        return self._redis.transaction(work, self._keys["learned"], value_from_callable=True)

    def announce_rate(self, rpm: int, limit: int) -> None:
        def work(pipe: Any) -> None:
            now = _seconds(pipe.time())
            pipe.multi()
            self._write_learned(pipe, announced(rpm, limit, now), now)

        self._redis.transaction(work, self._keys["learned"])

    def learned_rate(self) -> int | None:
        rpm = self._redis.hget(self._keys["learned"], "rpm")
        return int(rpm) if rpm else None

    def _read_learned(self, pipe: Any) -> Learned | None:
        values = pipe.hmget(self._keys["learned"], "rpm", "since", "raise_at", "hold_s", "probing")
        if values[0] is None:
            return None
        rpm, since, raise_at, hold_s, probing = values
        return Learned(int(rpm), float(since), float(raise_at), float(hold_s), probing == b"1")

    def _write_learned(self, pipe: Any, learned: Learned | None, now: float) -> None:
        """Inside MULTI. The key expires when the learned rate lapses (`LEARNED_TTL_S` after its last 429)."""
        key = self._keys["learned"]
        pipe.delete(key)
        if learned is not None:
            fields = {"rpm": learned.rpm, "since": learned.since, "raise_at": learned.raise_at}
            pipe.hset(key, mapping={**fields, "hold_s": learned.hold_s, "probing": int(learned.probing)})
            pipe.pexpire(key, max(1, round((learned.since + LEARNED_TTL_S - now) * 1000)))

    def breaker_turn(self, token: str, probe_ttl_s: float) -> float:
        return float(self._breaker_turn(keys=[self._keys["breaker"]], args=[token, probe_ttl_s, BREAKER_POLL_S]))

    def server_failed(self, token: str, counts: bool, after: int, open_s: float, max_open_s: float) -> None:
        key = self._keys["breaker"]

        def work(pipe: Any) -> None:
            now = _seconds(pipe.time())
            stored = {name.decode(): value.decode() for name, value in pipe.hgetall(key).items()}
            current = Breaker(
                int(stored.get("failures", 0)),
                float(stored.get("open_until", 0)),
                float(stored.get("open_for", 0)),
                stored.get("probe", ""),
                float(stored.get("probe_until", 0)),
            )
            breaker = breaker_failed(current, token, counts, now, after, open_s, max_open_s)
            pipe.multi()
            pipe.hset(key, mapping={name: str(value) for name, value in asdict(breaker).items()})
            pipe.expire(key, 24 * 3600)  # a breaker nobody closes (every run gone) is forgotten in a day

        self._redis.transaction(work, key)

    def cooldown_left(self) -> float:
        return int(self._cooldown(keys=[self._keys["cooldown"], self._keys["pace"]], args=[0])) / 1000

    def cool_down(self, seconds: float) -> None:
        self._cooldown(keys=[self._keys["cooldown"], self._keys["pace"]], args=[seconds])

    def _ledger(self) -> list[str]:
        return [self._keys["leases"], self._keys["balance"]]

    def reserve(self, lease: str, floor: Decimal, cost: Decimal, ttl_s: float) -> Reservation:
        args = [lease, int(ttl_s * 1000), str(floor), str(cost), int(BALANCE_TTL_S * 1000)]
        code, balance, in_flight, age_ms = self._reserve(keys=self._ledger(), args=args)
        decision = {1: "grant", 0: "refuse", 2: "wait"}[int(code)]
        return Reservation(
            decision,  # type: ignore[arg-type]
            Decimal(balance.decode()) if balance else None,
            int(in_flight),
            int(age_ms) / 1000 if int(age_ms) >= 0 else None,
        )

    def settle(self, lease: str, remaining: Decimal | None) -> None:
        args = [lease, "" if remaining is None else str(remaining), int(BALANCE_TTL_S * 1000)]
        self._settle(keys=self._ledger(), args=args)

    def balance(self) -> Decimal | None:
        value = self._redis.hget(self._keys["balance"], "value")
        return Decimal(value.decode()) if value else None

    def known_balance(self) -> tuple[Decimal, float] | None:
        """The last reported balance and its age in seconds, aged on the Redis server's clock (which stamped
        it), in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hmget(self._keys["balance"], "value", "at")
        pipe.time()
        (value, at), (seconds, micros) = pipe.execute()
        if not value:
            return None
        return Decimal(value.decode()), (int(seconds) * 1000 + int(micros) // 1000 - float(at)) / 1000

    def forget_balance(self) -> None:
        self._redis.delete(self._keys["balance"])


class StateIdentity(NamedTuple):
    """Which claim store this is: processes with the same `id` see each other's claims (see `ownership`)."""

    id: str  # random, made once by the store's first user
    where: str  # for messages: the host and folder, or the Redis server; never a credential


class Claimed(NamedTuple):
    """A claim taken: from change `streak` of its namespace on (a claim taken or given up; this one the last),
    every change was its owner's. `epoch` names the namespace's record of changes (a new one: a new epoch)."""

    epoch: str
    streak: int


class Mark(NamedTuple):
    """Where a namespace's changes stood when an owner marked it (`ClaimStore.mark`); `clean`: no other live owner
    held a claim under it then."""

    epoch: str
    seq: int
    clean: bool

    def unchanged_at(self, taken: Claimed) -> bool:
        """No other owner took or gave up a claim under the namespace from this mark to `taken`, and none held
        one at the mark: nothing of the namespace's can have been stored since the mark, but by the owner itself.
        A process stores a map only while it holds the content's claim, and an ended holder stores nothing more."""
        return self.clean and taken.epoch == self.epoch and taken.streak <= self.seq


class ClaimStore(Protocol):
    """Named claims (`namespace:name`) with an owner and an expiry, seen by every process that shares the
    store: one sender per content, one writer per shard. A claim of a killed process lapses once its holder stops
    renewing. Each namespace counts its changes (a claim taken, a claim given up) and remembers since when they
    have all been one owner's, so an owner can tell that nobody else claimed anything since its `mark`."""

    def claim(self, name: str, owner: str, ttl_s: float) -> Claimed | None: ...
    def mark(self, namespace: str, owner: str) -> Mark: ...
    def renew(self, names: list[str], owner: str, ttl_s: float) -> None: ...
    def release(self, name: str, owner: str) -> None: ...
    def held(self, name: str) -> bool: ...  # a live claim by anyone: a read, for the plan
    def identity(self) -> StateIdentity: ...


_PROCESS_TOKEN = uuid.uuid4().hex[:12]  # with the pid: a forked child is another process, with other claims


def _read_proc(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks after boot) of a process, from /proc; None when there is none."""
    stat = _read_proc(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name, in parentheses, may hold spaces
    return fields[0], fields[19]


@functools.cache
def _boot_and_namespace() -> str | None:
    """This host's boot and pid namespace: processes are told apart by pid only within both (read once: a fork
    stays in both)."""
    boot, namespace = _read_proc("/proc/sys/kernel/random/boot_id"), None
    with contextlib.suppress(OSError):
        namespace = os.readlink("/proc/self/ns/pid")
    return f"{boot}/{namespace}" if boot and namespace else None


def process_tag() -> str:
    """This process as a claim owner's suffix (`owner@tag`), so a store can tell when a holder has ended: its
    host's boot, pid namespace, user, pid and start time. Empty where /proc cannot say (the holder is then
    never judged ended: its claims lapse as before)."""
    where = _boot_and_namespace()
    started = _process_start(os.getpid())
    return f"@{where}/{os.getuid()}/{os.getpid()}/{started[1]}" if where and started else ""


def holder_ended(owner: str) -> bool:
    """Whether the process that took a claim as `owner` has ended (killed: it cannot renew, nor send anything
    more), so its claims may be taken now instead of when they lapse. Only a process of this boot, pid namespace
    and user is judged (another's /proc may be hidden, another host's pids are not ours); a pid since reused by
    another process has another start time; an ended one still unreaped is a zombie with no other thread."""
    _, at, tag = owner.rpartition("@")
    parts = tag.split("/")
    if not at or len(parts) != 5 or not parts[3].isdigit():
        return False
    if _boot_and_namespace() != f"{parts[0]}/{parts[1]}" or parts[2] != str(os.getuid()):
        return False
    pid, start = int(parts[3]), parts[4]
    found = _process_start(pid)
    if found is None or found[1] != start:
        return True
    threads = []
    with contextlib.suppress(OSError):
        threads = os.listdir(f"/proc/{pid}/task")
    return found[0] in ("Z", "X") and len(threads) <= 1


def _namespace(name: str) -> str:
    return name.partition(":")[0]


def _live_other(holder: str, owner: str) -> bool:
    """Whether a claim held as `holder` may still lead to a stored map that `owner` has not seen."""
    return holder != owner and not holder_ended(holder)


class MemoryClaims:
    """Claims for one process only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: dict[str, tuple[str, float]] = {}
        self._changes: dict[str, tuple[str, int, str, int]] = {}  # namespace: epoch, seq, owner, streak
        self._epoch = uuid.uuid4().hex

    def claim(self, name: str, owner: str, ttl_s: float) -> Claimed | None:
        with self._lock:
            now = time.time()
            holder, expires = self._claims.get(name, (owner, 0.0))
            if holder != owner and expires > now:
                return None
            self._claims[name] = (owner, now + ttl_s)
            epoch, _, streak = self._change(_namespace(name), owner)
            return Claimed(epoch, streak)

    def mark(self, namespace: str, owner: str) -> Mark:
        with self._lock:
            epoch, seq, _ = self._change(namespace, owner)
            now, prefix = time.time(), f"{namespace}:"
            held = [holder for name, (holder, until) in self._claims.items() if until > now and name.startswith(prefix)]
            return Mark(epoch, seq, not any(_live_other(holder, owner) for holder in held))

    def _change(self, namespace: str, owner: str) -> tuple[str, int, int]:
        epoch, seq, last, streak = self._changes.get(namespace, (self._epoch, 0, "", 0))
        seq, streak = seq + 1, streak if last == owner else seq + 1
        self._changes[namespace] = (epoch, seq, owner, streak)
        return epoch, seq, streak

    def renew(self, names: list[str], owner: str, ttl_s: float) -> None:
        with self._lock:
            for name in names:
                if self._claims.get(name, ("", 0.0))[0] == owner:
                    self._claims[name] = (owner, time.time() + ttl_s)

    def release(self, name: str, owner: str) -> None:
        with self._lock:
            if self._claims.get(name, ("", 0.0))[0] == owner:
                del self._claims[name]
            self._change(_namespace(name), owner)  # held or not: see `SQLiteClaims.release`

    def held(self, name: str) -> bool:
        with self._lock:
            return self._claims.get(name, ("", 0.0))[1] > time.time()

    def identity(self) -> StateIdentity:
        """This process: its claims are its own. (Two stores in one process are not told apart; a caller that
        runs two at once on one output should share one.)"""
        pid = os.getpid()
        return StateIdentity(f"memory-{_PROCESS_TOKEN}-{pid}", f"the memory of process {pid} on {socket.gethostname()}")


_ID_FILE = "state-id"


def _folder_id(folder: Path) -> str:
    """The folder's id, made once with `create_if_absent` (a whole file linked into place), so processes
    starting together agree on one and none reads it half written. An unreadable one is made anew (another
    store: the safe direction)."""
    files = LocalStorage(folder)
    while (found := _read_id(files)) is None:
        if not files.create_if_absent(_ID_FILE, uuid.uuid4().hex.encode()) and _read_id(files) is None:
            files.write_bytes(_ID_FILE, uuid.uuid4().hex.encode())  # there, and unreadable
    return found


def _read_id(files: LocalStorage) -> str | None:
    try:
        found = files.read_bytes(_ID_FILE).decode(errors="replace").strip()
    except FileNotFoundError:
        return None
    return found if len(found) == 32 else None


class SQLiteClaims:
    """Claims in one SQLite file on this host (`claims.sqlite` in the state folder)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._folder = folder.absolute()
        # synchronous=NORMAL: a claim outlives a crashed process, not a power cut
        lost = "claims wait one claim lifetime, until any the old file held have lapsed"
        path = folder / "claims.sqlite"
        self._db = open_sqlite(path, _CLAIMS_SCHEMA, lost=lost, rebuild=_CLAIMS_REBUILT)
        self._lock = threading.Lock()
        self._commits = GroupCommit(self._db, self._lock, path)  # the workers' claims and releases, a batch per commit

    def claim(self, name: str, owner: str, ttl_s: float) -> Claimed | None:
        """Free, lapsed or ours: taken. Held by a process of this host that has ended (`holder_ended`): taken
        too, without waiting for it to lapse, so the run after a killed one starts at once."""

        def work(db: sqlite3.Connection, now: float) -> Claimed | None:
            cursor = db.execute(
                "INSERT INTO claims SELECT ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM rebuilt WHERE at > ?)"
                " ON CONFLICT(name) DO UPDATE"
                " SET owner = excluded.owner, expires = excluded.expires WHERE owner = excluded.owner OR expires <= ?",
                (name, owner, now + ttl_s, now - ttl_s, now),
            )
            if cursor.rowcount != 1:
                holder = db.execute("SELECT owner FROM claims WHERE name = ?", (name,)).fetchone()
                if holder is None or not holder_ended(holder[0]):  # none: a rebuilt file grants nothing yet
                    return None
                update = "UPDATE claims SET owner = ?, expires = ? WHERE name = ? AND owner = ?"
                if db.execute(update, (owner, now + ttl_s, name, holder[0])).rowcount != 1:
                    return None
            epoch, _, streak = _sqlite_change(db, _namespace(name), owner)
            return Claimed(epoch, streak)

        return self._commits.run(work)

    def mark(self, namespace: str, owner: str) -> Mark:
        def work(db: sqlite3.Connection, now: float) -> Mark:
            epoch, seq, _ = _sqlite_change(db, namespace, owner)
            held = db.execute(  # the names under `namespace:`, by the primary key's order (';' follows ':')
                "SELECT owner FROM claims WHERE name >= ? AND name < ? AND expires > ?",
                (f"{namespace}:", f"{namespace};", now),
            )
            return Mark(epoch, seq, not any(_live_other(holder, owner) for (holder,) in held.fetchall()))

        return self._commits.run(work)

    def renew(self, names: list[str], owner: str, ttl_s: float) -> None:
        query = "UPDATE claims SET expires = ? WHERE name = ? AND owner = ?"
        self._commits.run(lambda db, now: db.executemany(query, [(now + ttl_s, name, owner) for name in names]))

    def release(self, name: str, owner: str) -> None:
        """A change even if the claim had lapsed: its holder, paused past the lapse, may have stored its map."""

        def work(db: sqlite3.Connection, now: float) -> None:
            db.execute("DELETE FROM claims WHERE name = ? AND owner = ?", (name, owner))
            _sqlite_change(db, _namespace(name), owner)

        self._commits.run(work)

    def held(self, name: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM claims WHERE name = ? AND expires > ?", (name, time.time()))
            return row.fetchone() is not None

    def identity(self) -> StateIdentity:
        """Kept in a file of its own (`state-id`), not in the claims': a claims file set aside and rebuilt is
        the same store to the output's lease (the rebuilt file's wait covers the claims it lost), so a run on
        a repaired state is not refused by the lease of its own last run."""
        return StateIdentity(_folder_id(self._folder), f"{socket.gethostname()}:{self._folder}")


def _sqlite_change(db: sqlite3.Connection, namespace: str, owner: str) -> tuple[str, int, int]:
    """One change to `namespace` by `owner`: (epoch, its number, where the owner's unbroken run of changes began).
    The SET's expressions read the row as it was."""
    row = db.execute(
        "INSERT INTO changes VALUES (?, ?, 1, ?, 1) ON CONFLICT(namespace) DO UPDATE SET seq = seq + 1,"
        " streak = CASE WHEN owner = excluded.owner THEN streak ELSE seq + 1 END, owner = excluded.owner"
        " RETURNING epoch, seq, streak",
        (namespace, uuid.uuid4().hex, owner),
    ).fetchall()[0]
    return row[0], row[1], row[2]


# change(key, owner, epoch): one change by `owner` to the namespace whose changes are the hash `key`; `epoch` names
# the hash if this change makes it. Returns {epoch, streak, seq}, as `_sqlite_change`.
_REDIS_CHANGE = """
local function change(key, owner, epoch)
  local seq = redis.call('HINCRBY', key, 'seq', 1)
  if seq == 1 then redis.call('HSET', key, 'epoch', epoch) end
  if redis.call('HGET', key, 'owner') ~= owner then redis.call('HSET', key, 'owner', owner, 'streak', seq) end
  local found = redis.call('HMGET', key, 'epoch', 'streak')
  return {found[1], tonumber(found[2]), seq}
end
"""
# KEYS: the claim, its namespace's changes. ARGV: owner, ttl_ms, epoch. Take it if free or ours (SET NX would
# refuse our own renewal).
_REDIS_CLAIM = f"""{_REDIS_CHANGE}
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return change(KEYS[2], ARGV[1], ARGV[3])
"""
# KEYS: the claim, its namespace's changes. ARGV: owner, its ended holder, ttl_ms, epoch. Taken only if that
# holder has it still.
_REDIS_TAKE_OVER = f"""{_REDIS_CHANGE}
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return change(KEYS[2], ARGV[1], ARGV[4])
"""
# KEYS: the claim, its namespace's changes. ARGV: owner, epoch. Only the owner's claim is given up; a change
# even if it had lapsed (see `SQLiteClaims.release`).
_REDIS_RELEASE = f"""{_REDIS_CHANGE}
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
change(KEYS[2], ARGV[1], ARGV[2])
return 1
"""
# KEYS: the namespace's changes. ARGV: owner, epoch.
_REDIS_MARK = f"""{_REDIS_CHANGE}
return change(KEYS[1], ARGV[1], ARGV[2])
"""
# KEYS: claims. ARGV: owner, ttl_ms. Only the owner's claims are renewed.
_REDIS_RENEW = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]) end
end
return 1
"""


_STATE_ID_KEY = "normals:state-id"


def _changes_key(namespace: str) -> str:
    return f"normals:changes:{namespace}"


def _claim_key(name: str) -> str:
    return f"normals:claim:{name}"


def _claim_keys(name: str) -> list[str]:
    """The claim's key and its namespace's changes: the scripts that take or give up a claim count the change."""
    return [_claim_key(name), _changes_key(_namespace(name))]


def _claimed(reply: list[Any]) -> Claimed:
    epoch, streak, _ = reply
    return Claimed(epoch.decode(), int(streak))


class RedisClaims:
    """Claims in Redis under `normals:claim:*`, for processes on several hosts; Redis expires them, and a holder
    of this host that has ended gives them up at once."""

    def __init__(self, url: str) -> None:
        import redis

        self._redis: Any = redis.Redis.from_url(url)
        self._claim = self._redis.register_script(_REDIS_CLAIM)
        self._take_over = self._redis.register_script(_REDIS_TAKE_OVER)
        self._release = self._redis.register_script(_REDIS_RELEASE)
        self._mark = self._redis.register_script(_REDIS_MARK)
        self._renew = self._redis.register_script(_REDIS_RENEW)

    def claim(self, name: str, owner: str, ttl_s: float) -> Claimed | None:
        """Free, lapsed or ours: taken. Held by a process of this host that has ended (`holder_ended`, as in
        `SQLiteClaims.claim`): taken too, if it holds it still; another host's holder is never judged."""
        keys, ttl_ms = _claim_keys(name), max(1, int(ttl_s * 1000))
        if taken := self._claim(keys=keys, args=[owner, ttl_ms, uuid.uuid4().hex]):
            return _claimed(taken)
        holder = self._redis.get(keys[0])
        if holder is None or not holder_ended(holder.decode(errors="replace")):  # released since: the next try
            return None
        taken = self._take_over(keys=keys, args=[owner, holder, ttl_ms, uuid.uuid4().hex])
        return _claimed(taken) if taken else None

    def mark(self, namespace: str, owner: str) -> Mark:
        """The change first, then the claims held (a scan of the database's keys, once a run): one taken after the
        change is a change of its own; one that lapsed in between was held by a process that has ended (what it
        stored is there before the run lists) or that was paused past the lapse (its release is a change)."""
        epoch, _, seq = self._mark(keys=[_changes_key(namespace)], args=[owner, uuid.uuid4().hex])
        pattern = _claim_key(re.sub(r"([*?\[\]\\])", r"\\\1", namespace)) + ":*"
        held = list(self._redis.scan_iter(match=pattern, count=1000))
        holders = [holder.decode(errors="replace") for holder in self._redis.mget(held) if holder] if held else []
        return Mark(epoch.decode(), int(seq), not any(_live_other(holder, owner) for holder in holders))

    def renew(self, names: list[str], owner: str, ttl_s: float) -> None:
        if names:
            self._renew(keys=[_claim_key(name) for name in names], args=[owner, max(1, int(ttl_s * 1000))])

    def release(self, name: str, owner: str) -> None:
        self._release(keys=_claim_keys(name), args=[owner, uuid.uuid4().hex])

    def held(self, name: str) -> bool:
        return bool(self._redis.exists(_claim_key(name)))

    def identity(self) -> StateIdentity:
        """One id per Redis database, made by whichever process asks first (SET NX): every host sharing it agrees.
        Read each time, so a flushed or restarted Redis is a new store, as its claims are gone."""
        pipe = self._redis.pipeline()
        pipe.set(_STATE_ID_KEY, uuid.uuid4().hex, nx=True)
        pipe.get(_STATE_ID_KEY)
        value = pipe.execute()[1]
        server = self._redis.connection_pool.connection_kwargs
        place = server.get("path") or f"{server.get('host')}:{server.get('port')}"
        return StateIdentity(value.decode(), f"Redis at {place}, database {server.get('db', 0)}")
