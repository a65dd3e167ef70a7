"""The shared guard state: one rate, one cooldown and one balance per key, across processes and hosts."""

import multiprocessing
import time
from decimal import Decimal
from pathlib import Path

import pytest
from _service_fixtures import unique_key
from hypothesis import given
from hypothesis import strategies as st

from normals_pipeline._errors import CreditLimitReached
from normals_pipeline._state import BALANCE_TTL_S, MemoryState, RedisState, SQLiteState, takes_report
from normals_pipeline.guards import CreditGuard, RateGuard, key_fingerprint

RPM = 600  # one request per 100 ms: fast enough for a test, slow enough to see the spacing


@pytest.fixture(params=["memory", "sqlite", "redis"])
def state(request, tmp_path):
    if request.param == "memory":
        return MemoryState()
    if request.param == "sqlite":
        return SQLiteState(tmp_path, key_fingerprint(unique_key()))
    return RedisState(request.getfixturevalue("redis_url"), key_fingerprint(unique_key()))


@given(
    stored=st.none() | st.decimals(0, 1000, places=1),
    reported=st.decimals(0, 1000, places=1),
    age=st.floats(0, 2 * BALANCE_TTL_S),
)
def test_a_fresh_balance_only_goes_down(stored, reported, age):
    # A late answer from before other charges must not raise the balance the floor is checked against.
    expected = stored is None or age >= BALANCE_TTL_S or reported <= stored
    assert takes_report(stored, age, reported) == expected


def test_a_late_higher_answer_does_not_raise_the_shared_balance(state):
    guard = CreditGuard(state=state)
    early, late = guard.reserve(), guard.reserve()
    guard.settle(late, Decimal(1), Decimal(8))  # the server charged `early` first, but its answer comes last
    guard.settle(early, Decimal(1), Decimal(9))
    assert state.balance() == 8 == guard.remaining


def test_a_stale_balance_gives_way():
    assert takes_report(Decimal(5), BALANCE_TTL_S, Decimal(6))


def test_floor_counts_leases_of_everyone_sharing_the_state(state):
    one, two = CreditGuard(floor=Decimal(2), state=state), CreditGuard(floor=Decimal(2), state=state)
    one.settle(one.reserve(), Decimal(1), Decimal(4))  # balance 4
    one.reserve()  # 4 - 1 in flight
    two.reserve()  # 4 - 2 in flight = 2: at the floor
    with pytest.raises(CreditLimitReached, match="floor of 2"):
        two.reserve()
    assert state.balance() == 4


def test_a_402_reaches_every_run_on_the_key(state):
    first, second = CreditGuard(state=state), CreditGuard(state=state)
    first.settle(first.reserve(), Decimal(1), Decimal(3))
    first.settle(first.reserve(), None, Decimal(0))  # what the client reports on a 402
    with pytest.raises(CreditLimitReached, match="no credits left"):
        second.reserve()


def test_leases_of_a_killed_run_lapse(state):
    guard = CreditGuard(state=state)
    guard.settle(guard.reserve(), Decimal(1), Decimal(1))
    state.reserve("crashed-run", Decimal(0), Decimal(1), ttl_s=0.2)  # never settled
    with pytest.raises(CreditLimitReached):
        CreditGuard(state=state).reserve()
    time.sleep(0.3)
    CreditGuard(state=state).reserve()


def test_cooldown_is_shared(state):
    assert state.cooldown_left() == 0
    state.cool_down(0.5)
    state.cool_down(0.1)  # a shorter pause never shortens a longer one
    assert 0.3 < state.cooldown_left() <= 0.5
    started = time.monotonic()
    RateGuard(60_000, state).acquire()
    assert time.monotonic() - started >= 0.3


def _acquire_times(kind: str, where: str, key: str, count: int, queue) -> None:
    state = (
        SQLiteState(Path(where), key_fingerprint(key)) if kind == "sqlite" else RedisState(where, key_fingerprint(key))
    )
    guard = RateGuard(RPM, state)
    for _ in range(count):
        guard.acquire()
        queue.put(time.time())


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_processes_sharing_a_key_share_one_rate(kind, tmp_path, request):
    where = str(tmp_path) if kind == "sqlite" else request.getfixturevalue("redis_url")
    key, processes, each = unique_key(), 3, 6
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_acquire_times, args=(kind, where, key, each, queue)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    stamps = sorted(queue.get(timeout=60) for _ in range(processes * each))
    for worker in workers:
        worker.join(timeout=30)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    # 18 slots at one per 100 ms: one process each would send three at once.
    assert min(gaps) >= 0.08, gaps


def test_with_a_floor_and_no_known_balance_one_request_finds_it_out(state):
    guard = CreditGuard(floor=Decimal(1), state=state)
    lease = guard.reserve()
    assert state.reserve("other", Decimal(1), Decimal(1), 10).decision == "wait"
    assert state.reserve("no-floor", Decimal(0), Decimal(1), 10).decision == "grant"
    guard.settle(lease, Decimal(1), Decimal(5))
    assert state.reserve("other", Decimal(1), Decimal(1), 10).decision == "grant"
