"""Guards in front of every request: one for the key's rate, one for its credits.

Both are shared by every call that uses a key within this process (`rate_guard_for` keeps one per key
and rate), so sequential and concurrent runs in one process never add up to more than the key allows.
"""

from __future__ import annotations

import hashlib
import threading
import time
from decimal import Decimal

from pyrate_limiter import Duration, InMemoryBucket, Limiter, Rate

from ._errors import CreditLimitReached, OutOfCredits, RunStopped

CREDITS_PER_CALL = Decimal(1)


def key_fingerprint(api_key: str) -> str:
    """A name for a key that is safe to log and to use in file names: never the key itself."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


def paced_rates(rpm: int) -> list[Rate]:
    """The minute allowance, preceded by one request per 60/rpm s where that is a distinct, coarser rate."""
    minute = int(Duration.MINUTE)
    rates = [Rate(rpm, minute)]
    if 1 < rpm <= minute:
        rates.insert(0, Rate(1, minute // rpm))
    return rates


class RateGuard:
    """At most `rpm` requests in any 60 s, spaced evenly, plus a cooldown all callers honour after a 429.

    Two rates: the minute allowance itself, and one request per 60/rpm s so the allowance is spread
    over the minute instead of sent in a burst that a fixed-window server would count twice.
    """

    def __init__(self, rpm: int, name: str = "clipdrop") -> None:
        if rpm < 1:
            raise ValueError(f"requests per minute must be at least 1, got {rpm}")
        self.rpm = rpm
        self.name = name
        self._limiter = Limiter(InMemoryBucket(paced_rates(rpm)))
        self._resume_at = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Block until a request may be sent."""
        self._wait_out_cooldown()
        self._limiter.try_acquire(self.name)

    def cooldown(self, seconds: float) -> None:
        """Hold every caller of this guard for `seconds` (a 429 means the key is saturated for all)."""
        with self._lock:
            self._resume_at = max(self._resume_at, time.monotonic() + seconds)

    def _wait_out_cooldown(self) -> None:
        while (delay := self._resume_at - time.monotonic()) > 0:
            time.sleep(delay)


_rate_guards: dict[tuple[str, int], RateGuard] = {}
_rate_guards_lock = threading.Lock()


def rate_guard_for(api_key: str, rpm: int) -> RateGuard:
    """The process-wide guard of one key at one rate."""
    ident = (key_fingerprint(api_key), rpm)
    with _rate_guards_lock:
        if ident not in _rate_guards:
            _rate_guards[ident] = RateGuard(rpm, name=f"clipdrop-{ident[0]}")
        return _rate_guards[ident]


class CreditGuard:
    """Stops sending before the balance would fall under `floor` or this run would spend over `budget`.

    Requests in flight count as spent, so concurrent workers cannot jointly cross a limit.
    Once stopped (401, 403, 402, or a limit reached), every later `reserve` raises the same error.
    """

    def __init__(self, floor: Decimal = Decimal(0), budget: Decimal | None = None) -> None:
        self.floor = floor
        self.budget = budget
        self.spent = Decimal(0)
        self.remaining: Decimal | None = None
        self._in_flight = 0
        self._stopped: RunStopped | None = None
        self._lock = threading.Lock()

    def reserve(self) -> None:
        """Claim one call's credits or raise the reason sending must stop."""
        with self._lock:
            if self._stopped is not None:
                raise self._stopped
            committed = (self._in_flight + 1) * CREDITS_PER_CALL
            if self.budget is not None and self.spent + committed > self.budget:
                self._stopped = CreditLimitReached(
                    f"run budget of {self.budget} credits reached ({self.spent} spent); "
                    "raise the budget to enrich the rest"
                )
            elif self.remaining is not None and self.remaining - committed < self.floor:
                self._stopped = CreditLimitReached(
                    f"credit floor of {self.floor} reached ({self.remaining} remaining); "
                    "buy credits or lower the floor to enrich the rest"
                    if self.floor
                    else f"no credits left ({self.remaining} remaining); buy credits to enrich the rest"
                )
            if self._stopped is not None:
                raise self._stopped
            self._in_flight += 1

    def settle(self, consumed: Decimal | None, remaining: Decimal | None) -> None:
        """Record what a finished call cost (None: not charged or not reported)."""
        with self._lock:
            self._in_flight -= 1
            self.spent += consumed or Decimal(0)
            if remaining is not None:  # answers arrive out of order: the lowest is the latest balance
                self.remaining = remaining if self.remaining is None else min(self.remaining, remaining)

    def stop(self, error: RunStopped) -> None:
        """The API refused the key or said the balance is gone: nothing more is sent."""
        with self._lock:
            self._stopped = error
            if isinstance(error, OutOfCredits):
                self.remaining = Decimal(0)
