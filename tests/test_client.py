"""The client against the emulator over real HTTP on loopback."""

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from email.utils import formatdate

import httpx
import pytest
from PIL import Image

from normals_pipeline import (
    ApiUnreachable,
    ClipdropClient,
    CreditLimitReached,
    ImageRejected,
    InvalidApiKey,
    InvalidResponse,
    MissingApiKey,
    NoAnswer,
    OutOfCredits,
    RateGuard,
    RetryPolicy,
    RunStopped,
    ServerError,
)
from normals_pipeline._errors import Interrupted
from normals_pipeline._state import MemoryState
from normals_pipeline.client import DEFAULT_COOLDOWN_S, _retry_after, parse_credits
from normals_pipeline.emulator import Faults

FAST_RETRY = RetryPolicy(attempts=4, timeout_s=10, wait_initial_s=0.01, wait_max_s=0.05, wait_jitter_s=0.0)


def jpeg(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 150, 120)).save(buffer, "JPEG")
    return buffer.getvalue()


def make_client(url: str, key: str = "test-key", **kwargs) -> ClipdropClient:
    kwargs.setdefault("rate_guard", RateGuard(100_000))
    kwargs.setdefault("retry", FAST_RETRY)
    return ClipdropClient(key, base_url=url, **kwargs)


def test_success_returns_the_map_and_credits(emulator):
    with make_client(emulator.url) as client:
        result = client.surface_normals(jpeg(64, 48), "image.jpg", "image/jpeg")
    assert Image.open(io.BytesIO(result.content)).size == (64, 48)
    assert result.credits_consumed == 1 and result.remaining_credits == 999
    assert emulator.stats()["charged"] == "1"


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("1", Decimal(1)), ("0.2", Decimal("0.2")), (" 7 ", Decimal(7)), ("x", None), (None, None), ("NaN", None)],
)
def test_credit_headers_are_decimals_or_nothing(value, parsed):
    assert parse_credits(value) == parsed


def test_missing_credit_headers_assume_the_documented_price(emulator_factory):
    emulator = emulator_factory(credit_headers=False)
    with make_client(emulator.url) as client:
        result = client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert result.credits_consumed == 1 and result.remaining_credits is None


def test_no_key_is_a_clear_stop_without_the_key(emulator):
    with make_client(emulator.url, key="") as client, pytest.raises(MissingApiKey) as raised:
        client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert raised.value.status == 401 and "CLIPDROP_API_KEY" in raised.value.message


def test_unknown_key_never_appears_in_the_message(emulator):
    with make_client(emulator.url, key="sk-canary-0451") as client, pytest.raises(InvalidApiKey) as raised:
        client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert raised.value.error_code == "invalid_api_key"
    assert "canary" not in str(raised.value) and "canary" not in repr(raised.value)


def test_bad_image_is_a_per_image_error(emulator):
    with make_client(emulator.url) as client, pytest.raises(ImageRejected) as raised:
        client.surface_normals(b"GIF89a not really", "image.gif", "image/gif")
    assert raised.value.error_code == "bad_request" and raised.value.status == 400


def test_402_stops_the_guard(emulator_factory):
    emulator = emulator_factory(keys={"test-key": Decimal(0)})
    with make_client(emulator.url) as client:
        with pytest.raises(OutOfCredits) as raised:
            client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
        assert raised.value.status == 402
        with pytest.raises(OutOfCredits):  # the guard now refuses before sending
            client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert emulator.stats()["requests"] == 1


def test_known_empty_balance_is_not_sent(emulator_factory):
    emulator = emulator_factory(keys={"test-key": Decimal(1)})
    with make_client(emulator.url) as client:
        client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
        with pytest.raises(CreditLimitReached, match="no credits left"):
            client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert emulator.stats()["requests"] == 1


def test_500s_are_retried(emulator_factory):
    emulator = emulator_factory(faults=Faults(error_burst=2))
    with make_client(emulator.url) as client:
        result = client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
        assert client.retries_by_code == {"server_error": 2}
    assert result.credits_consumed == 1


def test_500s_give_up_after_the_attempts(emulator_factory):
    emulator = emulator_factory(faults=Faults(error_rate=1.0))
    with make_client(emulator.url) as client, pytest.raises(ServerError):
        client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert emulator.stats()["requests"] == FAST_RETRY.attempts


def test_429_honours_retry_after_and_pauses_the_key(emulator_factory):
    emulator = emulator_factory(faults=Faults(rate_limit_burst=1, retry_after=1))
    guard = RateGuard(100_000)
    cooldowns = []
    guard.cooldown = cooldowns.append  # type: ignore[method-assign]
    with make_client(emulator.url, rate_guard=guard) as client:
        result = client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
        assert client.retries_by_code == {"rate_limited": 1}
    assert result.status == 200
    assert cooldowns == [1.0]  # every caller on the key pauses for Retry-After


def test_429_without_retry_after_pauses_the_key_for_a_default(emulator_factory):
    emulator = emulator_factory(faults=Faults(rate_limit_burst=1))
    guard = RateGuard(100_000)
    cooldowns = []
    guard.cooldown = cooldowns.append  # type: ignore[method-assign]
    with make_client(emulator.url, rate_guard=guard) as client:
        client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert cooldowns == [DEFAULT_COOLDOWN_S]


def test_corrupt_body_is_charged_and_not_retried(emulator_factory):
    emulator = emulator_factory(faults=Faults(corrupt_rate=1.0))
    with make_client(emulator.url) as client, pytest.raises(InvalidResponse) as raised:
        client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert raised.value.credits_consumed == 1
    assert emulator.stats()["requests"] == 1


def test_unreachable_api_is_retried_then_raised():
    with make_client("http://127.0.0.1:9") as client, pytest.raises(ApiUnreachable) as raised:
        client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert raised.value.error_code == "connection_error"


def test_an_api_never_reached_is_given_up_within_seconds_whatever_the_attempts(monkeypatch):
    """A wrong URL is a configuration error: said after a few seconds of tries, not after the whole backoff."""
    monkeypatch.setattr("normals_pipeline.client.FIRST_CONTACT_GIVE_UP_S", 0.3)
    monkeypatch.setattr("normals_pipeline.client.FIRST_CONTACT_WAIT_S", 0.05)
    patient = RetryPolicy(attempts=1000, timeout_s=600, wait_initial_s=30, wait_max_s=30, wait_jitter_s=0.0)
    with make_client("http://127.0.0.1:9", retry=patient) as client, pytest.raises(ApiUnreachable) as raised:
        client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert 1 <= client.retries_by_code["connection_error"] <= 10
    assert raised.value.message.startswith("ConnectError") and "127.0.0.1" not in raised.value.message


def test_after_an_answer_a_lost_connection_gets_the_whole_retry_policy(emulator_factory):
    """Once the API has answered, a refused connection is a network hiccup: every attempt of the policy is used."""
    emulator = emulator_factory()
    with make_client(emulator.url) as client:
        client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
        emulator.stop()
        with pytest.raises(ApiUnreachable):
            client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert client.retries_by_code["connection_error"] == FAST_RETRY.attempts  # each attempt's failure is counted


def test_an_answer_that_trickles_ends_as_a_charged_timeout_at_the_deadline(fault_server):
    """httpx's timeouts are per read: a 200 trickling one byte at a time would never trip them. One deadline
    covers the whole exchange; the 200 said what it cost, so the error keeps it, and it is not retried."""
    server = fault_server("trickle", interval=0.2)
    started = time.monotonic()
    with make_client(server.url, timeout_s=1.0) as client, pytest.raises(NoAnswer) as raised:
        client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert time.monotonic() - started < 15  # not the ~200 s the body would take
    assert raised.value.error_code == "timeout" and raised.value.status == 200
    assert raised.value.credits_consumed == 1 == server.charged
    assert server.requests == 1 == client.tally.requests and not client.retries_by_code


def test_a_request_waiting_for_its_answer_counts_as_sent_and_abort_ends_it_at_once(fault_server):
    server = fault_server("silent")
    with make_client(server.url, timeout_s=600) as client:
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(client.surface_normals, jpeg(), "image.jpg", "image/jpeg")
            wait_for(lambda: client.tally.requests == 1)  # counted as it went out, with no answer yet
            assert not call.done()
            client.abort()
            with pytest.raises(Interrupted) as raised:
                call.result(timeout=15)
    assert raised.value.credits_consumed is None  # no answer: it may have cost, nobody knows what
    assert server.requests == 1 and not client.retries_by_code


def test_abort_cuts_a_trickling_200_and_keeps_its_cost(fault_server):
    server = fault_server("trickle", interval=0.5)
    with make_client(server.url, timeout_s=600) as client:
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(client.surface_normals, jpeg(), "image.jpg", "image/jpeg")
            wait_for(lambda: server.charged == 1)
            client.abort()
            with pytest.raises(Interrupted) as raised:
                call.result(timeout=15)
    assert raised.value.error_code == "interrupted" and raised.value.credits_consumed == 1


def test_after_stop_sending_nothing_goes_out(emulator):
    with make_client(emulator.url) as client:
        client.stop_sending()
        with pytest.raises(RunStopped):
            client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert emulator.stats()["requests"] == 0 == client.tally.requests


def test_every_attempt_is_a_request_and_a_refused_connection_is_none(emulator_factory):
    emulator = emulator_factory(faults=Faults(error_rate=1.0))
    with make_client(emulator.url) as client, pytest.raises(ServerError):
        client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert client.tally.requests == FAST_RETRY.attempts == emulator.stats()["requests"]
    with make_client("http://127.0.0.1:9") as refused, pytest.raises(ApiUnreachable):
        refused.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert refused.tally.requests == 0


def wait_for(condition, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the bound"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        (lambda: {"retry-after": "7"}, 7.0),
        (lambda: {"retry-after": formatdate(time.time() + 30, usegmt=True)}, 30.0),  # an HTTP date
        (lambda: {"x-ratelimit-reset": "12"}, 12.0),  # no Retry-After: the rate limit's reset, in seconds ...
        (lambda: {"ratelimit-reset": str(int(time.time()) + 20)}, 20.0),  # ... or as a Unix time
        (lambda: {"retry-after": "soon"}, None),
        (dict, None),
    ],
)
def test_a_429_says_how_long_to_wait_in_any_of_the_usual_headers(headers, seconds):
    waited = _retry_after(httpx.Response(429, headers=headers()))
    assert waited == pytest.approx(seconds, abs=1.5) if seconds is not None else waited is None


def test_a_limit_the_api_states_is_kept_to_by_every_guard_on_the_key(emulator_factory):
    emulator = emulator_factory(rpm=60, rate_limit_headers=True)
    state = MemoryState()
    with make_client(emulator.url, rate_guard=RateGuard(120, state)) as client:
        client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert RateGuard(120, state).effective_rpm == 60
    assert RateGuard(50, state).effective_rpm == 50  # never above the configured rate


def test_a_5xx_is_retried_at_once_not_after_the_backoff(emulator_factory):
    """The breaker paces an outage for every sender; a stray 5xx costs no wait of its own."""
    emulator = emulator_factory(faults=Faults(error_burst=2))
    patient = RetryPolicy(attempts=4, timeout_s=600, wait_initial_s=60, wait_max_s=60, wait_jitter_s=0.0)
    started = time.monotonic()
    with make_client(emulator.url, retry=patient) as client:
        client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    assert time.monotonic() - started < 30  # not a minute's backoff per 500
    assert emulator.stats()["by_status"] == {"200": 1, "500": 2}


def test_stop_ends_a_call_waiting_for_its_turn_without_sending(emulator):
    guard = RateGuard(100_000)
    guard.cooldown(60)  # the key is paused
    with make_client(emulator.url, rate_guard=guard) as client:
        failures: list[Exception] = []
        caller = threading.Thread(target=lambda: _call_catching(client, failures))
        caller.start()
        time.sleep(0.3)
        client.stop_sending()
        caller.join(timeout=5)
    assert not caller.is_alive() and isinstance(failures[0], RunStopped)
    assert emulator.stats()["requests"] == 0


def _call_catching(client: ClipdropClient, failures: list[Exception]) -> None:
    try:
        client.surface_normals(jpeg(), "image.jpg", "image/jpeg")
    except Exception as error:
        failures.append(error)


def test_each_thread_sends_on_its_own_connection_and_threads_beyond_the_limit_wait(emulator_factory):
    """A connection per sending thread (a pool shared by the workers convoyed on its lock), at most
    `max_connections` exchanges at once however many threads send; a finished run's threads leave no
    connection open behind them, and a closed client sends nothing."""
    emulator = emulator_factory(latency=0.2)
    with make_client(emulator.url, max_connections=3) as client:
        for _ in range(2):  # two runs, each with threads of its own
            with ThreadPoolExecutor(6) as pool:
                results = list(pool.map(lambda _: client.surface_normals(jpeg(), "a.jpg", "image/jpeg"), range(12)))
            assert len(results) == 12
        assert emulator.stats()["concurrent_max"] == 3
        with ThreadPoolExecutor(1) as pool:  # a third run's thread: the first two runs' connections are closed
            pool.submit(client.surface_normals, jpeg(), "a.jpg", "image/jpeg").result()
        assert len(client._clients) == 1
    with pytest.raises(RuntimeError, match="the client is closed"):
        client.surface_normals(jpeg(), "a.jpg", "image/jpeg")
