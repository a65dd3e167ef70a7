"""Claims: one holder per name among every process (and host) sharing the store; a dead holder's lapse."""

import multiprocessing
import os
import signal
import threading
import time

import pytest

from normals_pipeline._state import MemoryClaims, RedisClaims, SQLiteClaims
from normals_pipeline.guards import ClaimGuard


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "memory":
        return MemoryClaims()
    if request.param == "sqlite":
        return SQLiteClaims(tmp_path)
    return RedisClaims(request.getfixturevalue("redis_url"))


def test_a_claim_has_one_holder_until_released(store):
    name = f"t-{os.getpid()}-{time.monotonic_ns()}"
    assert store.claim(name, "a", 30)
    assert store.claim(name, "a", 30)  # the holder may take it again (a renewal)
    assert not store.claim(name, "b", 30)
    store.release(name, "b")  # not the holder: nothing happens
    assert not store.claim(name, "b", 30)
    store.release(name, "a")
    assert store.claim(name, "b", 30)


def test_an_unrenewed_claim_lapses_and_a_renewed_one_does_not(store):
    lapsing, kept = f"l-{time.monotonic_ns()}", f"k-{time.monotonic_ns()}"
    assert store.claim(lapsing, "a", 0.3) and store.claim(kept, "a", 0.3)
    time.sleep(0.2)
    store.renew([kept], "a", 0.5)
    time.sleep(0.2)
    assert store.claim(lapsing, "b", 30)
    assert not store.claim(kept, "b", 30)


def test_stores_that_share_claims_share_an_identity_and_no_others_do(tmp_path, redis_url):
    first, again, other = SQLiteClaims(tmp_path / "a"), SQLiteClaims(tmp_path / "a"), SQLiteClaims(tmp_path / "b")
    assert first.identity() == again.identity() and first.identity().id != other.identity().id
    assert first.identity().where.endswith(f":{tmp_path / 'a'}")
    # every host on one Redis: one id; where names the server, never the URL's password
    with_password = redis_url.replace("redis://", "redis://default:s3cret@")
    assert RedisClaims(redis_url).identity() == RedisClaims(with_password).identity()
    assert "s3cret" not in RedisClaims(with_password).identity().where
    assert MemoryClaims().identity() == MemoryClaims().identity()  # one process: its sequential runs agree


def test_a_waiter_returns_as_soon_as_the_holders_work_is_there():
    store = MemoryClaims()
    holder, waiter = ClaimGuard(store, "out"), ClaimGuard(store, "out")
    assert holder.acquire("abc")
    done = []
    started = time.monotonic()
    threading.Timer(0.3, lambda: done.append(True)).start()
    assert waiter.acquire("abc", lambda: bool(done)) is False  # reuse, not a second send
    assert time.monotonic() - started < 5
    holder.close()
    assert waiter.acquire("abc")


def _hold_forever(folder, ready):
    guard = ClaimGuard(SQLiteClaims(folder), "out", ttl_s=1.0)
    guard.acquire("content")
    ready.set()
    time.sleep(600)


def test_a_killed_processs_claim_lapses_while_a_live_one_is_renewed(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    victim = context.Process(target=_hold_forever, args=(tmp_path, ready))
    victim.start()
    assert ready.wait(60)
    waiter = ClaimGuard(SQLiteClaims(tmp_path), "out", ttl_s=1.0)
    time.sleep(1.5)  # past one TTL: the holder's renewals keep it
    assert not waiter.store.claim("out:content", waiter.owner, 1.0)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    started = time.monotonic()
    assert waiter.acquire("content")
    assert time.monotonic() - started < 5
    waiter.close()
