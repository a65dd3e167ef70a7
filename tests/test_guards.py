import threading
import time
from decimal import Decimal

import pytest

from normals_pipeline._errors import CreditLimitReached, OutOfCredits
from normals_pipeline.guards import CreditGuard, RateGuard, key_fingerprint, rate_guard_for


def test_fingerprint_never_contains_the_key():
    fingerprint = key_fingerprint("sk-secret-123")
    assert "secret" not in fingerprint and len(fingerprint) == 12


def test_rate_guard_spaces_requests_evenly():
    guard = RateGuard(rpm=600)  # one request per 100 ms
    stamps = []
    for _ in range(5):
        guard.acquire()
        stamps.append(time.monotonic())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert min(gaps) >= 0.09


def test_rate_guard_cooldown_holds_every_caller():
    guard = RateGuard(rpm=60_000)
    guard.cooldown(0.3)
    started = time.monotonic()
    threads = [threading.Thread(target=guard.acquire) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started >= 0.29


def test_rate_guard_refuses_nonsense():
    with pytest.raises(ValueError, match="at least 1"):
        RateGuard(rpm=0)


def test_one_guard_per_key_and_rate():
    assert rate_guard_for("k1", 60) is rate_guard_for("k1", 60)
    assert rate_guard_for("k1", 60) is not rate_guard_for("k2", 60)


def test_budget_counts_requests_in_flight():
    guard = CreditGuard(budget=Decimal(2))
    guard.reserve()
    guard.reserve()
    with pytest.raises(CreditLimitReached, match="budget of 2"):
        guard.reserve()


def test_budget_frees_uncharged_reservations():
    guard = CreditGuard(budget=Decimal(1))
    guard.settle(guard.reserve(), None, None)  # failed, not charged
    guard.settle(guard.reserve(), Decimal(1), Decimal(10))
    with pytest.raises(CreditLimitReached):
        guard.reserve()
    assert guard.spent == 1


def test_floor_stops_before_crossing():
    guard = CreditGuard(floor=Decimal(5))
    guard.settle(guard.reserve(), Decimal(1), Decimal(6))
    guard.reserve()  # 6 - 1 = 5: allowed
    with pytest.raises(CreditLimitReached, match="floor of 5"):
        guard.reserve()  # would reach 4 with the one in flight


def test_out_of_credits_sticks():
    guard = CreditGuard()
    guard.stop(OutOfCredits("no credits", status=402))
    with pytest.raises(OutOfCredits):
        guard.reserve()
    assert guard.remaining == 0


def test_fractional_prices_are_exact():
    guard = CreditGuard()
    for _ in range(10):
        guard.settle(guard.reserve(), Decimal("0.1"), None)
    assert guard.spent == Decimal("1.0")
