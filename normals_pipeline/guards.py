"""Guards in front of every request: one for the key's rate (with the rate the key has shown it takes, and a
breaker for outages), one for its credits, and claims so that one content is sent by one process at a time.

All keep their state outside the process (see `_state`): by default SQLite files, so every process on
the host shares one rate, one cooldown, one learned rate, one breaker, one view of the balance and one set of
claims; with a Redis URL, every host does.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pyrate_limiter import Duration, InMemoryBucket, Limiter, Rate
from pyrate_limiter.abstracts import RateItem

from ._errors import ApiDown, CreditLimitReached, OutOfCredits, RunStopped
from ._state import (
    BALANCE_TTL_S,
    BREAKER_POLL_S,
    Claimed,
    ClaimStore,
    KeyOps,
    KeyState,
    Mark,
    MemoryClaims,
    MemoryState,
    RedisClaims,
    RedisState,
    Reservation,
    SQLiteClaims,
    SQLiteState,
    default_state_dir,
    process_tag,
)

CREDITS_PER_CALL = Decimal(1)
MINUTE_MS = int(Duration.MINUTE)
# The limiter counts a minute as a little longer than the server does: a request that reaches the server
# later than its turn (a slow connect) must not let the next minute's first one land inside its window.
WINDOW_MARGIN_MS = 250
# The schedule's slots are a little further apart than that minute over N: N slots span 60.3 s, so a
# request that woke up late (under 50 ms) does not make the window count hold up the one N slots later.
SLOT_SLACK_MS = 50
# Lateness the schedule makes up: a caller up to this late for its slot does not push back the later
# ones; an idle key saves up no more than this (at most 1 s worth of extra slots in any window).
CATCH_UP_S = 1.0
# Slots already past are sent at least this fraction of an interval apart: making up is never a burst.
CATCH_UP_SPACING = 0.5
PROBE_WAIT_S = 0.05
LEASE_TTL_S = 300.0  # longer than any request with its retries' single attempt; a killed run's leases lapse
# A turn nobody ended (its process was killed) counts as answered after this: longer than one attempt of a
# request (10 s to connect, the 60 s read timeout); an answer that still comes later is logged when it does.
TURN_TTL_S = 120.0
MAX_TIMEOUT_S = 110.0  # the longest deadline a request may have: its turn must outlive it (and a credit lease)
# The breaker: this many 5xx in a row on the key (every process's) hold every sender; the pause is the retry
# policy's backoff (these are the defaults'), then one probe; an outage longer than the policy's timeout stops.
BREAKER_AFTER = 5
BREAKER_OPEN_S = 1.0
BREAKER_MAX_OPEN_S = 30.0
OUTAGE_GIVE_UP_S = 300.0
BREAKER_LOOK_S = 1.0  # a sender held by the breaker looks again at least this often (a late answer may close it)
CLAIM_TTL_S = 30.0  # renewed every third of it while held, so a killed holder's claims lapse within 30 s
CLAIM_POLL_S = 0.2


# pyrate-limiter holding a request back this long (the schedule normally leaves it nothing to hold) means a
# wait, after which a pause or the breaker that began meanwhile is looked for again.
BUCKET_HELD_S = 0.01

# What came of a turn: an answer (any status but 5xx; a 429 also lowers the rate), a 5xx, or no answer at all.
Outcome = Literal["answered", "rate_limited", "server_error", "no_answer"]
# What a request has of the key's state between looks: nothing yet, its slot on the schedule, or its turn.
Taken = Literal["nothing", "slot", "turn"]
Charge = tuple[Decimal | None, Decimal | None]  # what a request cost, and the balance its answer reported


@dataclass(frozen=True)
class Step:
    """What one look at the key's state found: the request may go, or what it waits for and how long."""

    wait: Literal["go", "breaker", "cooldown", "slot", "turn", "credit", "refused"]
    seconds: float = 0.0
    reservation: Reservation | None = None


def credit_step(reservation: Reservation) -> Step:
    """A credit lease's decision as a step: granted, wait (another request is finding out the balance), refused."""
    wait = {"grant": "go", "wait": "credit", "refuse": "refused"}[reservation.decision]
    return Step(wait, PROBE_WAIT_S, reservation)  # type: ignore[arg-type]


def key_fingerprint(api_key: str) -> str:
    """A name for a key that is safe to log and to use in file names: never the key itself."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


def paced_rates(rpm: int) -> list[Rate]:
    """At most `rpm` per (a little more than) a minute, counted on this process's actual sends: a last bound
    kept by pyrate-limiter. The spreading is the schedule's (`slot_interval_s`) and the key's limit across
    processes the turns' (`_state.turn_wait`), so normally this never holds a request back."""
    return [Rate(rpm, MINUTE_MS + WINDOW_MARGIN_MS)]


class _SendsBucket(InMemoryBucket):
    """pyrate-limiter's bucket, each attempt stamped with the clock when it is put: the blocking wait advances
    an item's timestamp by the time it meant to sleep, so a late wake-up would record a send earlier than it
    happened. The Limiter holds the bucket's lock around `put`."""

    def put(self, item: RateItem) -> bool:
        item.timestamp = self.now()
        return super().put(item)


def slot_interval_s(rpm: int) -> float:
    """Time between two slots of the key's schedule: a little more than 60/rpm s (see `SLOT_SLACK_MS`)."""
    return (MINUTE_MS + WINDOW_MARGIN_MS + SLOT_SLACK_MS) / rpm / 1000


class RateGuard:
    """At most `rpm` requests in any 60 s for everyone sharing `state`, spread evenly; a shared pause after a
    429; a rate the key has shown it takes, when that is less; and a breaker while the API answers only 5xx.

    Each request takes the next slot of an absolute schedule kept in `state` (one per `slot_interval_s`,
    see `_state.schedule_slot`) and sleeps until it: a caller that wakes up late delays its own request
    only, never the slots after it. Then two hard limits, whatever the lateness and catch-up were: a turn
    counts from when it is taken until a minute after its answer (`_state.turn_wait`: the server counts a
    request when it arrives, which a busy host can delay by more than a second), and pyrate-limiter's
    bucket counts this process's actual sends, at most `rpm` per minute (plus margin): a last bound.

    `rpm` is an upper bound, not a fact: a 429 on a turn the schedule gave lowers the key's rate for everyone
    sharing `state` (`_state.lowered`), which then steps back up slowly (`_state.raised`); the schedule and
    the turns keep to the lower rate meanwhile. `BREAKER_AFTER` 5xx in a row open the key's breaker: every
    sender waits, then one probe goes (`_state.breaker_turn`); an answer closes it.

    `acquire` returns the turn; the caller hands it back to `finished` with what came of it.
    """

    def __init__(self, rpm: int, state: KeyState | None = None, name: str = "clipdrop") -> None:
        if rpm < 1:
            raise ValueError(f"requests per minute must be at least 1, got {rpm}")
        self.rpm = rpm
        self.name = name
        self.state = state or MemoryState()
        self.interval_s = slot_interval_s(rpm)
        # This process's sends, in memory: a shared bucket (a file lock or a Redis lock and a commit per request)
        # was the largest cost of an unthrottled run, and bounds nothing the shared turns do not bound already.
        self._limiter = Limiter(_SendsBucket(paced_rates(rpm)), buffer_ms=5)
        self._failed = threading.local()  # this thread's last request failed (a 5xx, no answer): see `acquire`

    @property
    def effective_rpm(self) -> int:
        """The rate kept to now: `rpm`, or the lower one the key has shown it takes."""
        return min(self.rpm, self.state.learned_rate() or self.rpm)

    def acquire(
        self,
        stop: threading.Event | None = None,
        give_up_s: float = OUTAGE_GIVE_UP_S,
        credit: CreditGuard | None = None,
    ) -> str | None:
        """Block until a request may be sent: the breaker closed (or this the probe), no pause, its slot on the
        key's schedule, then room in both windows; returns the turn. Each look at the key's state is one
        transaction where the store has them (see `_look`). With `credit`, the turn also holds the request's
        credit lease, taken in the same transaction: `finished` frees both. `stop` set during any wait ends it:
        None, nothing held. Raises `ApiDown` after waiting at an open breaker for `give_up_s`, and what `credit`
        raises when sending must stop."""
        turn = uuid.uuid4().hex  # the same token through voided turns: it may hold the breaker's probe
        taken: Taken = "nothing"
        held_since: float | None = None  # when the breaker began to hold this request
        # A retry after a failure lets a request that has not tried yet be the breaker's next probe: else the one
        # whose probe just failed, looking first, could probe again and again until its attempts ran out.
        yields, self._failed.last = getattr(self._failed, "last", False), False
        while True:
            try:
                step = self._look(turn, taken, credit)
            except BaseException:
                # A look that failed half way (a store without transactions, Redis or memory, keeps what it did
                # before the failure: the turn, when the budget then refused) holds nothing after it.
                with suppress(Exception):  # the state failing: what it holds lapses; the first error is the one
                    self._void(turn)
                if credit is not None:
                    credit.settled(turn, None)  # counted for the budget by a look that then failed
                raise
            if step.wait == "go":
                if self._bucket(turn, stop):
                    return turn
                self._void(turn, credit)
                taken = "nothing"
                continue
            held_since = (held_since or time.monotonic()) if step.wait == "breaker" else None
            if held_since is not None and time.monotonic() - held_since > give_up_s:
                raise ApiDown(
                    f"the API answered only server errors (5xx) for over {give_up_s:.0f} s: every request on the "
                    "key waited while one probe at a time found it still failing"
                )
            taken = {"slot": "slot", "turn": "slot", "credit": "turn"}.get(step.wait, "nothing")
            seconds = min(step.seconds, BREAKER_LOOK_S) if step.wait == "breaker" else step.seconds
            if step.wait == "breaker" and yields:
                seconds, yields = seconds + BREAKER_POLL_S, False
            if _sleep(seconds, stop):
                return self._void(turn)

    def _look(self, turn: str, taken: Taken, credit: CreditGuard | None) -> Step:
        """One look at the key's state, as one transaction: the breaker, a pause, the next slot (unless
        `taken` already), the turn, then the credit lease; the first that makes the request wait says how
        long. A slot or a turn taken stays taken for the next look."""

        def work(ops: KeyOps) -> Step:
            if taken != "turn":
                if (wait := ops.breaker_turn(turn, TURN_TTL_S)) > 0:
                    return Step("breaker", wait)
                if (wait := ops.cooldown_left()) > 0:
                    return Step("cooldown", wait)
                spacing = self.interval_s * CATCH_UP_SPACING
                if taken == "nothing" and (wait := ops.next_slot(self.interval_s, CATCH_UP_S, spacing, self.rpm)) > 0:
                    return Step("slot", wait)
                if (wait := ops.take_turn(turn, self.rpm, MINUTE_MS / 1000, TURN_TTL_S)) > 0:
                    return Step("turn", wait)
            if credit is None:
                return Step("go")
            step = credit.lease(ops, turn)
            if step.wait == "refused":
                ops.end_turn(turn, used=False)
            return step

        step = self.state.atomically(work)
        if credit is not None:
            credit.raise_if_refused(step)
        return step

    def _bucket(self, turn: str, stop: threading.Event | None) -> bool:
        """pyrate-limiter's count of actual sends. Should it have held the request back, a pause or the breaker
        that began meanwhile voids the turn (False), as at any wait."""
        started = time.monotonic()
        self._limiter.try_acquire(self.name)
        if time.monotonic() - started < BUCKET_HELD_S:
            return True
        return self.state.cooldown_left() <= 0 and self.state.breaker_turn(turn, TURN_TTL_S) <= 0

    def finished(
        self,
        turn: str,
        outcome: Outcome = "answered",
        open_s: float = BREAKER_OPEN_S,
        max_open_s: float = BREAKER_MAX_OPEN_S,
        credit: CreditGuard | None = None,
        charge: Charge = (None, None),
    ) -> None:
        """The request of `turn` was answered or failed: from now it counts one more minute. A 429 lowers the
        key's rate; a 5xx counts towards the breaker (`open_s` its first pause, doubled by each failed probe up
        to `max_open_s`), any other answer closes it. With `credit` (the turn held its lease), the lease is freed
        in the same transaction, and `charge` (what it cost, the balance reported) recorded."""
        if outcome == "rate_limited":
            self.state.lower_rate(turn, self.rpm, MINUTE_MS / 1000)
        elif outcome in ("server_error", "no_answer"):
            self._failed.last = True
            self.state.server_failed(turn, outcome == "server_error", BREAKER_AFTER, open_s, max_open_s)
        consumed, remaining = charge

        def work(ops: KeyOps) -> None:
            ops.end_turn(turn, answered=outcome in ("answered", "rate_limited"))
            if credit is not None:
                ops.settle(turn, remaining)

        self.state.atomically(work)
        if credit is not None:
            credit.settled(turn, consumed)

    def announce(self, rpm: int) -> None:
        """The API's headers state the key's limit: keep to it (never above `rpm`), in every process."""
        self.state.announce_rate(rpm, self.rpm)

    def _void(self, turn: str, credit: CreditGuard | None = None) -> None:
        """Give up the turn (if one was taken), the breaker's probe (if held) and the credit lease (if `credit`
        granted one): nothing was sent."""
        if credit is None:
            self.state.end_turn(turn, used=False)
            return
        self.state.atomically(lambda ops: (ops.end_turn(turn, used=False), ops.settle(turn, None)))
        credit.settled(turn, None)

    def cooldown(self, seconds: float) -> None:
        """Hold every caller on the key for `seconds` (a 429 means the key is saturated for all)."""
        self.state.cool_down(seconds)


def _sleep(seconds: float, stop: threading.Event | None) -> bool:
    """Sleep for `seconds`, or until `stop` is set; whether it was."""
    if stop is None:
        time.sleep(seconds)
        return False
    return stop.wait(seconds)


_states: dict[tuple[str, str | None, Path | None], KeyState] = {}
_rate_guards: dict[tuple[int, int], RateGuard] = {}
_registry_lock = threading.Lock()


def key_state(api_key: str, redis_url: str | None = None, folder: Path | None = None) -> KeyState:
    """The process-wide handle on a key's shared state: Redis if a URL is given, else a SQLite file."""
    fingerprint = key_fingerprint(api_key)
    folder = None if redis_url else (folder or default_state_dir())
    ident = (fingerprint, redis_url, folder)
    with _registry_lock:
        if ident not in _states:
            _states[ident] = RedisState(redis_url, fingerprint) if redis_url else SQLiteState(folder, fingerprint)
        return _states[ident]


def forget_balance(api_key: str, redis_url: str | None = None) -> None:
    """Drop the key's stored balance (after a top-up): the next answer's balance is believed at once."""
    key_state(api_key, redis_url).forget_balance()


def claim_store(redis_url: str | None = None, folder: Path | None = None) -> ClaimStore:
    """Where claims live: Redis if a URL is given (every host), else a SQLite file (this host)."""
    return RedisClaims(redis_url) if redis_url else SQLiteClaims(folder or default_state_dir())


def rate_guard_for(api_key: str, rpm: int, redis_url: str | None = None) -> RateGuard:
    """The process-wide rate guard of one key at one rate, over the key's shared state."""
    state = key_state(api_key, redis_url)
    with _registry_lock:
        ident = (id(state), rpm)
        if ident not in _rate_guards:
            _rate_guards[ident] = RateGuard(rpm, state, name=f"clipdrop-{key_fingerprint(api_key)}")
        return _rate_guards[ident]


class CreditGuard:
    """Stops sending before the key's balance would fall under `floor` or this run would spend over
    `budget`. Requests in flight count as spent (leases in the shared state for the floor, this run's
    leases for the budget), so concurrent workers and concurrent runs cannot jointly cross a limit.
    Once stopped (401, 403, 402, or a limit reached), every later `reserve` raises the same error.
    """

    def __init__(
        self, floor: Decimal = Decimal(0), budget: Decimal | None = None, state: KeyState | None = None
    ) -> None:
        self.floor = floor
        self.budget = budget
        self.state = state or MemoryState()
        self.spent = Decimal(0)
        self._leases: set[str] = set()  # this run's requests in flight, for the budget
        self._stopped: RunStopped | None = None
        self._lock = threading.Lock()

    def reserve(self) -> str:
        """Claim one call's credits and return the lease, or raise the reason sending must stop. (A rate guard
        given this guard takes the lease with the turn instead, in one transaction: `lease`.)"""
        lease = uuid.uuid4().hex
        while True:
            step = self.state.atomically(lambda ops: self.lease(ops, lease))
            if step.wait == "go":
                return lease
            self.raise_if_refused(step)
            time.sleep(PROBE_WAIT_S)  # another request is finding out the balance

    def lease(self, ops: KeyOps, lease: str) -> Step:
        """Inside a transaction on the key's state: the run's budget, then the key's floor. Counted in flight
        for the budget by its name, so a transaction run again after a rollback counts it once."""
        self._admit(lease)
        reservation = ops.reserve(lease, self.floor, CREDITS_PER_CALL, LEASE_TTL_S)
        if reservation.decision != "grant":
            self.settled(lease, None)
        return credit_step(reservation)

    def raise_if_refused(self, step: Step) -> None:
        """A lease the floor refused stops this and every later request."""
        if step.wait == "refused" and step.reservation is not None:
            with self._lock:
                self._stopped = self._stopped or CreditLimitReached(self._floor_message(step.reservation))
                raise self._stopped

    def _admit(self, lease: str) -> None:
        with self._lock:
            # Admitted already, before any stop: a transaction run again (a group commit reruns each of its works
            # alone when one fails, as the request refused by the budget does) keeps it, or a request the budget
            # allowed was dropped unsent, the run stopping short of its budget.
            if lease in self._leases:
                return
            if self._stopped is not None:
                raise self._stopped
            in_flight = len(self._leases)
            if self.budget is not None and self.spent + (in_flight + 1) * CREDITS_PER_CALL > self.budget:
                requests = "a request" if in_flight == 1 else "requests"
                held = f", {in_flight} held by {requests} in flight" if in_flight else ""
                self._stopped = CreditLimitReached(
                    f"run budget of {self.budget.normalize():f} credits reached ({self.spent.normalize():f} spent"
                    f"{held}); raise the budget to enrich the rest"
                )
                raise self._stopped
            self._leases.add(lease)

    def _floor_message(self, reservation: Reservation) -> str:
        """What is known: the balance, how old, what is in flight, the floor, and when a top-up shows."""
        balance, in_flight = reservation.balance, reservation.in_flight
        age = reservation.age_s or 0.0
        held = f", {in_flight} held by requests in flight" if in_flight else ""
        known = f"the key's balance was {balance} when last reported {age:.0f} s ago{held}"
        reread = max(0.0, BALANCE_TTL_S - age)
        after = f"a top-up is believed in {reread:.0f} s, or at once with `normals-pipeline run --refresh-balance`"
        if self.floor:
            return f"credit floor of {self.floor} reached: {known}; buy credits or lower the floor ({after})"
        return f"no credits left to spend: {known}; buy credits ({after})"

    def settle(self, lease: str, consumed: Decimal | None, remaining: Decimal | None) -> None:
        """Record what a finished call cost (None: not charged, or not reported) and free its lease."""
        self.state.settle(lease, remaining)
        self.settled(lease, consumed)

    def settled(self, lease: str, consumed: Decimal | None) -> None:
        """This run's side of a freed lease (freed in the shared state already): no longer in flight, `consumed`
        spent."""
        with self._lock:
            if lease in self._leases:
                self._leases.discard(lease)
                self.spent += consumed or Decimal(0)

    @property
    def remaining(self) -> Decimal | None:
        """The key's balance as last reported to anyone sharing the state (out-of-order answers merged)."""
        return self.state.balance()

    def stop(self, error: RunStopped) -> None:
        """The API refused the key or said the balance is gone: nothing more is sent."""
        with self._lock:
            self._stopped = error
        if isinstance(error, OutOfCredits):
            self.state.settle("", Decimal(0))  # no lease to free; tells every run sharing the key


class ClaimGuard:
    """Claims named under one namespace (an output), held by this run and renewed while held.

    `acquire(name, done)` waits while another process holds `name`, returning False as soon as `done()`
    says the holder's work is there to reuse, the claim (`Claimed`, true) once it is ours. Claims of a killed
    process lapse within `CLAIM_TTL_S`, since nobody renews them; a process on the killed one's host takes them at
    once (SQLite or Redis: the owner names its process). `mark()`, taken before looking at what is stored, tells
    with `Mark.unchanged_at(claimed)` whether anyone else can have stored anything since.
    """

    def __init__(self, store: ClaimStore | None, namespace: str, ttl_s: float = CLAIM_TTL_S) -> None:
        self.store = store or MemoryClaims()
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.owner = uuid.uuid4().hex + process_tag()  # a store on this host can tell when this process ended
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(
        self, name: str, done: Callable[[], bool] = lambda: False, waiting: Callable[[], None] | None = None
    ) -> Claimed | Literal[False]:
        """`waiting` is called once, if another process holds the claim, so a caller can say why it waits."""
        full = f"{self.namespace}:{name}"
        while not (taken := self.store.claim(full, self.owner, self.ttl_s)):
            if done():
                return False
            if waiting is not None:
                waiting()
                waiting = None
            time.sleep(CLAIM_POLL_S)
        with self._lock:
            self._held.add(full)
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew, name="claims", daemon=True)
                self._renewer.start()
        return taken

    def mark(self) -> Mark:
        return self.store.mark(self.namespace, self.owner)

    def release(self, name: str) -> None:
        full = f"{self.namespace}:{name}"
        with self._lock:
            self._held.discard(full)
        self.store.release(full, self.owner)

    def close(self) -> None:
        """Release everything still held and stop renewing."""
        self._closed.set()
        with self._lock:
            held, self._held = list(self._held), set()
        for full in held:
            self.store.release(full, self.owner)

    def _renew(self) -> None:
        while not self._closed.wait(self.ttl_s / 3):
            with self._lock:
                held = list(self._held)
            try:
                self.store.renew(held, self.owner, self.ttl_s)
            except Exception:  # a store hiccup: the next beat tries again, well within the TTL
                continue
