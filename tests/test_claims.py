"""Claims: one holder per name among every process (and host) sharing the store; a dead holder's lapse."""

import multiprocessing
import os
import signal
import threading
import time
import uuid

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


def _namespace() -> str:
    return f"ns-{uuid.uuid4().hex}"


def test_a_mark_holds_while_only_its_owner_claims_and_releases_under_it(store):
    """What a run can trust: nothing can have been stored since its mark, so it need not look again."""
    ns, elsewhere = _namespace(), _namespace()
    mark = store.mark(ns, "a")
    assert mark.clean
    first = store.claim(f"{ns}:x", "a", 30)
    assert mark.unchanged_at(first)
    store.release(f"{ns}:x", "a")
    store.claim(f"{elsewhere}:x", "b", 30)  # another namespace (another output): no matter
    store.release(f"{elsewhere}:x", "b")
    assert mark.unchanged_at(store.claim(f"{ns}:y", "a", 30))
    store.release(f"{ns}:y", "a")


@pytest.mark.parametrize("change", ["claim", "release"])
def test_another_owners_claim_or_release_after_the_mark_breaks_it_for_good(store, change):
    """A release counts even if the claim had lapsed: its holder, paused past the lapse, may have stored since."""
    ns = _namespace()
    assert store.claim(f"{ns}:before", "b", 0.2)
    store.release(f"{ns}:before", "b")  # before the mark: its map was stored before the run looked
    if change == "release":
        assert store.claim(f"{ns}:x", "b", 0.2)
        time.sleep(0.3)  # lapsed: the mark does not see it
    mark = store.mark(ns, "a")
    assert mark.clean
    if change == "claim":
        assert store.claim(f"{ns}:x", "b", 30)
    else:
        store.release(f"{ns}:x", "b")
    assert not mark.unchanged_at(store.claim(f"{ns}:y", "a", 30))
    store.release(f"{ns}:y", "a")
    assert not mark.unchanged_at(store.claim(f"{ns}:z", "a", 30))  # a's later changes do not mend it


def test_a_mark_taken_while_another_live_owner_holds_a_claim_is_not_clean(store):
    """The holder may store its map after the run looked and give up its claim after: the run must look again."""
    from normals_pipeline._state import _boot_and_namespace

    ns = _namespace()
    assert store.claim(f"{ns}:x", "b", 30)
    mark = store.mark(ns, "a")
    assert not mark.clean and not mark.unchanged_at(store.claim(f"{ns}:y", "a", 30))
    if os.path.exists("/proc/self/ns/pid"):  # a holder that has ended stores nothing more: no matter
        gone = f"x@{_boot_and_namespace()}/{os.getuid()}/{2**22 + 1}/1"
        other = _namespace()
        assert store.claim(f"{other}:x", gone, 30)
        assert store.mark(other, "a").clean


def test_a_flushed_redis_is_a_new_epoch_that_no_earlier_mark_holds_for(redis_url):
    import redis

    store, ns = RedisClaims(redis_url), _namespace()
    mark = store.mark(ns, "a")
    redis.Redis.from_url(redis_url).delete(f"normals:changes:{ns}")  # as FLUSHALL does, with the claims
    assert not mark.unchanged_at(store.claim(f"{ns}:x", "a", 30))


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


def _claims(where):
    """A store from a picklable `(kind, place)`: a spawned process opens its own."""
    kind, place = where
    return SQLiteClaims(place) if kind == "sqlite" else RedisClaims(place)


@pytest.fixture(params=["sqlite", "redis"])
def shared(request, tmp_path):
    """Where processes of this host share claims, as `_claims` takes it."""
    return ("sqlite", tmp_path) if request.param == "sqlite" else ("redis", request.getfixturevalue("redis_url"))


def _hold_forever(where, ready, name, ttl_s=1.0):
    guard = ClaimGuard(_claims(where), "out", ttl_s=ttl_s)
    guard.acquire(name)
    ready.set()
    time.sleep(600)


def test_a_killed_processs_claim_lapses_while_a_live_one_is_renewed(shared):
    name = f"content-{uuid.uuid4().hex}"
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    victim = context.Process(target=_hold_forever, args=(shared, ready, name))
    victim.start()
    assert ready.wait(60)
    waiter = ClaimGuard(_claims(shared), "out", ttl_s=1.0)
    time.sleep(1.5)  # past one TTL: the holder's renewals keep it
    assert not waiter.store.claim(f"out:{name}", waiter.owner, 1.0)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    started = time.monotonic()
    assert waiter.acquire(name)
    assert time.monotonic() - started < 5
    waiter.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/ns/pid"), reason="needs /proc")
def test_a_claim_of_a_process_killed_on_this_host_is_taken_at_once_and_a_live_ones_is_not(shared):
    """The holder's owner names its process, so the run after a killed one does not wait out a claim lifetime
    (here ten minutes) for claims nobody can renew, nor send with, any more."""
    name = f"content-{uuid.uuid4().hex}"
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    victim = context.Process(target=_hold_forever, args=(shared, ready, name, 600.0))
    victim.start()
    assert ready.wait(60)
    store = _claims(shared)
    assert not store.claim(f"out:{name}", "waiter", 600.0)  # alive: held
    os.kill(victim.pid, signal.SIGKILL)  # not reaped until the join: a zombie, its threads ending
    deadline = time.monotonic() + 30  # far within the claim's ten minutes
    while not store.claim(f"out:{name}", "waiter", 600.0):
        assert time.monotonic() < deadline, "the killed holder's claim was not taken"
        time.sleep(0.05)
    victim.join()  # reaped only now: the claim was taken from the zombie
    assert not store.claim(f"out:{name}", "another", 600.0)  # the waiter, alive, holds it now
    store.release(f"out:{name}", "waiter")


@pytest.mark.skipif(not os.path.exists("/proc/self/ns/pid"), reason="needs /proc")
def test_a_holder_of_another_host_namespace_or_user_is_never_judged_ended(shared):
    """Its pid means nothing here (another host's, another container's) or its /proc may be hidden (another
    user's): its claim waits to lapse, as any claim did before."""
    from normals_pipeline._state import _boot_and_namespace, holder_ended, process_tag

    here, uid = _boot_and_namespace(), os.getuid()
    gone = 2**22 + 1  # above the kernel's pid_max: no such process
    assert holder_ended(f"x@{here}/{uid}/{gone}/1")
    for owner in (
        f"x@00000000-0000-0000-0000-000000000000/pid:[1]/{uid}/{gone}/1",  # another boot or host
        f"x@{here.split('/')[0]}/pid:[1]/{uid}/{gone}/1",  # another pid namespace
        f"x@{here}/{uid + 1}/{gone}/1",  # another user
        "x",  # no process named (Redis-era owners, a platform without /proc)
        f"x@{here}/{uid}/not-a-pid/1",
    ):
        assert not holder_ended(owner), owner
    assert not holder_ended("x" + process_tag())  # this process, alive
    store, name = _claims(shared), f"n-{uuid.uuid4().hex}"
    assert store.claim(name, f"x@{here}/{uid + 1}/{gone}/1", 600.0)
    assert not store.claim(name, "y", 600.0)
    store.release(name, f"x@{here}/{uid + 1}/{gone}/1")
