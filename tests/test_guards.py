import threading
import time
from decimal import Decimal

import pytest

from normals_pipeline import guards
from normals_pipeline._errors import ApiDown, CreditLimitReached, OutOfCredits
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


def test_a_lease_the_budget_allowed_survives_its_transaction_run_again_after_the_stop():
    """A group commit runs each work of a failed batch again alone (the request the budget refused fails its
    batch): a lease admitted before that stop is kept, else a request within the budget went unsent (a run
    with a budget of 3 sent 2, in one CI run of two runs at once on one state file)."""
    state = MemoryState()
    guard = CreditGuard(budget=Decimal(2), state=state)
    assert [state.atomically(lambda ops, name=name: guard.lease(ops, name)).wait for name in "ab"] == ["go", "go"]
    with pytest.raises(CreditLimitReached, match="budget of 2"):
        state.atomically(lambda ops: guard.lease(ops, "c"))
    assert state.atomically(lambda ops: guard.lease(ops, "b")).wait == "go"  # b's look, run again
    with pytest.raises(CreditLimitReached, match="budget of 2"):
        state.atomically(lambda ops: guard.lease(ops, "d"))


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


def _open_breaker(state, pause_s: float) -> None:
    for index in range(guards.BREAKER_AFTER):
        state.server_failed(f"failed-{index}", True, guards.BREAKER_AFTER, pause_s, pause_s)


def _fill_window(state) -> None:
    for turn in ("one", "two"):  # a minute's two turns, answered: the next waits a minute
        state.take_turn(turn, 2, 60, 60)
        state.end_turn(turn, answered=True)


@pytest.mark.parametrize("holding", ["breaker", "cooldown", "full window"])
def test_a_stop_ends_every_wait_for_a_turn_at_once_and_holds_nothing(holding):
    state = MemoryState()
    {"breaker": lambda: _open_breaker(state, 60), "cooldown": lambda: state.cool_down(60)}.get(
        holding, lambda: _fill_window(state)
    )()
    stop, turns = threading.Event(), []
    waiter = threading.Thread(target=lambda: turns.append(RateGuard(2, state).acquire(stop)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()
    stop.set()
    waiter.join(timeout=5)
    assert not waiter.is_alive() and turns == [None]
    assert state.take_turn("after", 3, 60, 60) == 0  # the stopped caller holds no turn


def test_one_probe_at_a_time_when_the_breaker_pause_is_over_and_its_answer_frees_everyone():
    state = MemoryState()
    guard = RateGuard(60_000, state)
    _open_breaker(state, 0.2)
    turns: list[str] = []
    threads = [threading.Thread(target=lambda: turns.append(guard.acquire())) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while not turns and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    assert len(turns) == 1  # the probe; the others wait for its answer
    guard.finished(turns[0], "answered")
    for thread in threads:
        thread.join(timeout=5)
    assert len(turns) == 3


def test_a_failed_probe_sends_nobody_else_until_the_next_pause_is_over():
    state = MemoryState()
    guard = RateGuard(60_000, state)
    _open_breaker(state, 0.1)
    probe = guard.acquire()
    guard.finished(probe, "server_error", open_s=0.1, max_open_s=0.3)  # pause 0.2 s now
    started = time.monotonic()
    guard.finished(guard.acquire(), "answered")
    assert time.monotonic() - started >= 0.19


def test_an_outage_longer_than_the_retry_policy_stops_with_api_down():
    state = MemoryState()
    _open_breaker(state, 60)
    with pytest.raises(ApiDown, match="only server errors"):
        RateGuard(60, state).acquire(give_up_s=0.2)


def test_a_429_lowers_the_key_rate_for_every_guard_on_it():
    state = MemoryState()
    guard, other = RateGuard(600, state), RateGuard(600, state)
    for _ in range(3):
        guard.finished(guard.acquire())
    guard.finished(guard.acquire(), "rate_limited")
    assert guard.effective_rpm == other.effective_rpm == 300  # 3 sent before it: no lower than half at once


def test_a_budget_stop_leaves_no_turn_held_on_a_store_without_transactions():
    """Memory and Redis run a look's steps one by one: the turn it took before the budget refused is given back,
    or it would count against the key's rate (every run's, on Redis) until it lapsed."""
    state = MemoryState()
    guard, credit = RateGuard(6000, state), CreditGuard(budget=Decimal(1), state=state)
    first = guard.acquire(credit=credit)  # the budget's one credit, in flight
    with pytest.raises(CreditLimitReached, match="run budget of 1"):
        guard.acquire(credit=credit)
    assert set(state._turns) == {first}
    guard.finished(first, credit=credit, charge=(Decimal(1), None))
    assert credit.spent == 1 and not state._turns
