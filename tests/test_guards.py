import threading
import time
from decimal import Decimal

import pytest

from normals_pipeline import guards
from normals_pipeline._errors import CreditLimitReached, OutOfCredits
from normals_pipeline._state import MemoryState
from normals_pipeline.guards import (
    CreditGuard,
    RateGuard,
    forget_balance,
    key_fingerprint,
    key_state,
    rate_guard_for,
)


def test_fingerprint_never_contains_the_key():
    fingerprint = key_fingerprint("sk-secret-123")
    assert "secret" not in fingerprint and len(fingerprint) == 12


def test_rate_guard_spaces_requests_evenly(monkeypatch):
    # An idle key starts with up to CATCH_UP_S of slots saved up (0.2 s here): they go half an interval
    # apart, never at once; then one request per interval.
    monkeypatch.setattr(guards, "CATCH_UP_S", 0.2)
    guard = RateGuard(rpm=600)  # one request per ~100 ms
    stamps = []
    for _ in range(8):
        guard.acquire()
        stamps.append(time.monotonic())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert min(gaps) >= 0.045, gaps
    assert all(gap >= 0.09 for gap in gaps[-3:]), gaps
    assert 0.09 * 7 - 0.2 <= stamps[-1] - stamps[0] <= 0.11 * 7, gaps  # never more than 0.2 s ahead


def test_slots_inside_a_pause_are_void_and_the_requests_after_it_stay_spaced():
    guard = RateGuard(rpm=600)
    guard.acquire()
    sent = []
    threads = [threading.Thread(target=lambda: (guard.acquire(), sent.append(time.monotonic()))) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.02)  # both hold a slot in the next 100 ms ...
    paused = time.monotonic()
    guard.cooldown(0.3)  # ... when a 429 pauses the key
    for thread in threads:
        thread.join()
    # Neither goes inside the pause, and they do not go together when it ends (one interval apart).
    assert min(sent) - paused >= 0.29 and abs(sent[1] - sent[0]) >= 0.08, (paused, sent)


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


def test_the_credit_message_says_what_is_known_and_when_a_top_up_shows():
    guard = CreditGuard(state=MemoryState())
    guard.settle(guard.reserve(), Decimal(1), Decimal(1))  # balance 1
    guard.reserve()  # that last credit is now held by a request in flight
    with pytest.raises(CreditLimitReached) as refused:
        guard.reserve()
    message = str(refused.value)
    assert "balance was 1 when last reported 0 s ago, 1 held by requests in flight" in message
    assert "a top-up is believed in 300 s, or at once with `normals-pipeline run --refresh-balance`" in message


def test_forgetting_the_balance_lets_a_top_up_show_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMALS_STATE_DIR", str(tmp_path))
    state = key_state("k-refresh")
    guard = CreditGuard(state=state)
    guard.stop(OutOfCredits("gone"))  # a 402: balance 0 for everyone on the key
    assert state.balance() == 0
    forget_balance("k-refresh")
    assert state.balance() is None
    fresh = CreditGuard(state=state)
    fresh.settle(fresh.reserve(), Decimal(1), Decimal(50))
    assert fresh.remaining == 50
