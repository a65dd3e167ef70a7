"""The Clipdrop client: one image in, one normal map out, behind the rate and credit guards.

Retries (429, 5xx, timeouts, connection errors) go through stamina; a 429's `Retry-After` (or a rate-limit
reset header) is honoured and also pauses every other caller on the key, and a limit the API states in its
headers is kept to. A 5xx is retried at once: the key's breaker (in the rate guard) paces an outage for every
sender. Each attempt has one deadline for the whole exchange, and a stopped run ends the exchanges still in
flight (`_Exchange`). Nothing here knows about Dagster.
"""

from __future__ import annotations

import heapq
import itertools
import json
import socket
import sys
import threading
import time
import urllib.parse
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import httpx
import stamina

from ._errors import (
    ApiTimeout,
    ApiUnreachable,
    ClipdropError,
    ConnectionLost,
    ImageRejected,
    Interrupted,
    InvalidApiKey,
    InvalidResponse,
    MissingApiKey,
    NoAnswer,
    OutOfCredits,
    RateLimited,
    RunStopped,
    ServerError,
    StateUnavailable,
    TransientError,
)
from .guards import CREDITS_PER_CALL, CreditGuard, Outcome, RateGuard

if TYPE_CHECKING:
    import httpcore

DEFAULT_API_URL = "https://clipdrop-api.co"
SURFACE_NORMALS_PATH = "/portrait-surface-normals/v1"
JPEG_MAGIC = b"\xff\xd8\xff"
DEFAULT_COOLDOWN_S = 5.0
INITIAL_LATENCY_S = 2.0  # a guess until answers tell: errs towards more in flight, which the rate bounds anyway
LATENCY_WEIGHT = 0.2  # weight of each new answer in the moving average
# Before the API has answered once, a refused or failing connection is most likely a wrong URL or no network:
# retried about once a second for this long, then the run says so (after an answer, the retry policy's backoff).
FIRST_CONTACT_GIVE_UP_S = 2.0
FIRST_CONTACT_WAIT_S = 1.0
# httpcore's `trace` extension events: a connection made for the exchange (its socket), and the request out
# whole (its body written) or answered (the body's send failed, yet the server answered).
_CONNECTED = frozenset({"connection.connect_tcp.complete", "connection.start_tls.complete"})
_SENT = frozenset({"http11.send_request_body.complete", "http11.receive_response_headers.complete"})


def check_api_url(url: str) -> str:
    """`url` if it is http(s) with a host. Anything else would only fail at the first request, and then
    be retried as a network error for a long while before the run says it cannot reach the API."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError as error:
        raise ValueError(f"the API URL {url!r} is not a valid URL ({error})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the API URL must start with http:// or https:// and name a host, got {url!r}")
    return url


@dataclass(frozen=True)
class ApiResult:
    """A successful call: the JPEG bytes and what it cost."""

    content: bytes
    status: int
    credits_consumed: Decimal | None
    remaining_credits: Decimal | None


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    timeout_s: float = 300.0
    wait_initial_s: float = 1.0
    wait_max_s: float = 30.0
    wait_jitter_s: float = 1.0


def parse_credits(value: str | None) -> Decimal | None:
    """Credit headers may be missing or fractional: parse as decimals, ignore what is not a number."""
    if value is None:
        return None
    try:
        parsed = Decimal(value.strip())
    except InvalidOperation:
        return None
    return parsed if parsed.is_finite() else None


def _error_text(response: httpx.Response) -> str:
    try:
        detail = response.json().get("error")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        detail = None
    return str(detail) if detail else response.reason_phrase or "no detail"


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait before the next request: `Retry-After` (seconds or an HTTP date), else the rate limit's
    reset (`RateLimit-Reset` / `X-RateLimit-Reset`: seconds, or a Unix time); None if neither says."""
    value = response.headers.get("retry-after")
    if value is not None:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    reset = _header_number(response, "ratelimit-reset", "x-ratelimit-reset")
    if reset is None:
        return None
    return max(0.0, reset - time.time() if reset > 1e9 else reset)  # a Unix time (GitHub's) or seconds


def _header_number(response: httpx.Response, *names: str) -> float | None:
    """The first of `names` present as a plain number (`RateLimit-Limit: 60`, also `60;w=60`)."""
    for name in names:
        if (value := response.headers.get(name)) is not None:
            try:
                return float(value.split(";")[0].split(",")[0].strip())
            except ValueError:
                return None
    return None


def _outcome(error: Exception) -> Outcome:
    """What a failed attempt tells the rate guard: a 429, a 5xx, another answer, or no answer at all."""
    if isinstance(error, RateLimited):
        return "rate_limited"
    if isinstance(error, ServerError):
        return "server_error"
    return "answered" if isinstance(error, ClipdropError) and error.status is not None else "no_answer"


def _cause(error: Exception) -> str:
    """E.g. `ConnectError: [Errno 111] Connection refused`: the caller says where it could not connect."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def raise_for_status(response: httpx.Response) -> None:
    """Map every documented status to its typed error; 200 returns."""
    status = response.status_code
    if status == 200:
        return
    detail = f"{status} {_error_text(response)}"
    if status == 401:
        raise MissingApiKey(
            f"Clipdrop refused the request: no API key was sent ({detail}); set CLIPDROP_API_KEY", status=status
        )
    if status == 403:
        raise InvalidApiKey(f"Clipdrop refused the API key ({detail}); check CLIPDROP_API_KEY", status=status)
    if status == 402:
        raise OutOfCredits(
            f"Clipdrop says the account has no credits left ({detail}); buy credits, then re-run", status=status
        )
    if status == 429:
        raise RateLimited(f"rate limited ({detail})", retry_after=_retry_after(response))
    if status >= 500:
        raise ServerError(f"server error ({detail})", status=status)
    code = "bad_request" if status == 400 else f"http_{status}"
    raise ImageRejected(f"image refused ({detail})", status=status, error_code=code)


def _shut(sock: socket.socket) -> None:
    """End every read or write blocked on `sock`, in any thread. The plain socket's `shutdown`, also for a TLS
    socket: the TLS socket's own would drop its TLS state under a thread reading it."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # closed already
        pass


@dataclass(order=True)
class _Deadline:
    """When an exchange's time is up and what ends it; `cancel` once the exchange is over."""

    at: float
    seq: int
    action: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class _Deadlines:
    """Every exchange's deadline, watched by one thread per client (a timer thread per exchange would start a
    thread for every image sent)."""

    def __init__(self) -> None:
        self._heap: list[_Deadline] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, seconds: float, action: Callable[[], None]) -> _Deadline:
        deadline = _Deadline(time.monotonic() + seconds, next(self._seq), action)
        with self._cond:
            while self._heap and self._heap[0].cancelled:  # ended exchanges: the heap stays the size of those in flight
                heapq.heappop(self._heap)
            heapq.heappush(self._heap, deadline)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0] is deadline:
                self._cond.notify()
        return deadline

    def _watch(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                due = self._heap[0]
                if (left := due.at - time.monotonic()) > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._heap)
            if not due.cancelled:
                due.action()


class _Exchange:
    """One attempt's request and answer under one deadline: httpx's timeouts are per read, so an answer that
    trickles in never trips them. At the deadline (or when the client aborts) the exchange's connection is shut
    down, which ends a read blocked on it at once; `expired` then says why it broke off. `sent`: the request went
    out whole (or was answered), so the server may have acted on it; counted as a request then."""

    def __init__(self, client: ClipdropClient, seconds: float) -> None:
        self.client = client
        self.sent = False
        self.expired = False
        self._seconds = seconds
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._deadline: _Deadline | None = None

    def __enter__(self) -> _Exchange:
        self._deadline = self.client._deadlines.add(self._seconds, self._expire)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._deadline is not None:
            self._deadline.cancel()

    def trace(self, event: str, info: dict) -> None:
        """httpcore's `trace` extension: called in the sending thread as the exchange goes."""
        if event in _CONNECTED:
            self.attach(info["return_value"])
        elif event in _SENT and not self.sent:
            self.sent = True
            self.client._count_request()

    def attach(self, stream: httpcore.NetworkStream) -> None:
        """The connection in use: from the trace when it was made for this exchange, else (one kept alive) from
        the answer. Shut at once if the deadline passed while it was not known yet."""
        sock = stream.get_extra_info("socket")
        if sock is None:
            return
        with self._lock:
            self._socket, late = sock, self.expired
        self.client._track(sock)
        if late:
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired, sock = True, self._socket
        if sock is not None:
            _shut(sock)


@dataclass
class _Charge:
    """What an exchange cost and the balance it reported, as far as its answer got (None: not known)."""

    consumed: Decimal | None = None
    remaining: Decimal | None = None

    def pair(self) -> tuple[Decimal | None, Decimal | None]:
        return self.consumed, self.remaining


@dataclass
class Tally:
    """What the client did: requests sent (every attempt that went out, retries included) and retries by
    error code. The client keeps one for all its callers and one per `counting` block."""

    requests: int = 0
    retries: Counter[str] = field(default_factory=Counter)


CLOSED = "the client is closed: open another to send"


class ClipdropClient:
    """Sends images to a Clipdrop image endpoint; thread-safe, a connection per sending thread."""

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_API_URL,
        rate_guard: RateGuard,
        credit_guard: CreditGuard | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        max_connections: int = 16,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.rate_guard = rate_guard
        self.credit_guard = credit_guard or CreditGuard(state=rate_guard.state)
        self.retry = retry
        self.timeout_s = timeout_s  # the deadline of each attempt's whole exchange
        self.tally = Tally()  # every caller's
        self.latency_s = INITIAL_LATENCY_S  # moving average of the time from sending to the answer's end
        self._count_lock = threading.Lock()
        self._answered = threading.Event()  # the API has answered at least once (any status)
        self._unreachable_since: float | None = None
        self._given_up: ApiUnreachable | None = None  # set once the API was given up as never reached
        self._giving_up = threading.Event()  # wakes the workers waiting for a turn: given up, or `stop`
        self._announced: float | None = None  # the last rate limit the API's headers stated
        self._counting = threading.local()  # the calling thread's `counting` block, if any
        self._stopping = threading.Event()  # `stop_sending`: no request goes out any more
        self._aborted = threading.Event()  # `abort`: exchanges in flight are ended too
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # the connections made, for `abort`
        self._deadlines = _Deadlines()
        # One connection per sending thread, each in a pool of its own: the workers sharing one pool took its lock
        # twice per request, and with the GIL handed among 16 threads that lock convoyed (a run sent at 0.47 of a
        # bare loop's speed, 0.68 with a pool per thread). The TLS context is made once, not per pool.
        tls = httpx.create_ssl_context()
        self._connect = lambda: httpx.Client(
            verify=tls,
            base_url=self.base_url,
            headers={"x-api-key": api_key},
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        self._local = threading.local()  # this thread's client
        self._clients: dict[threading.Thread, httpx.Client] | None = {}  # each thread's, to close; None once closed
        self._connections = threading.BoundedSemaphore(max_connections)  # exchanges at once, whatever the threads

    @property
    def _http(self) -> httpx.Client:
        """The calling thread's own client (and connection), made on its first request."""
        http = getattr(self._local, "http", None)
        if http is None:
            made = self._connect()  # made and closed outside the lock every request's count takes
            with self._count_lock:
                clients, ended = self._clients, []
                if clients is not None:  # a finished run's workers: their connections would idle until `close`
                    ended = [clients.pop(thread) for thread in list(clients) if not thread.is_alive()]
                    clients[threading.current_thread()] = made
            if clients is None:
                made.close()
                raise RuntimeError(CLOSED)
            for old in ended:
                old.close()
            http = self._local.http = made
        return http

    def close(self) -> None:
        with self._count_lock:
            clients, self._clients = self._clients or {}, None
        for http in clients.values():
            http.close()

    def stop_sending(self) -> None:
        """The run is stopping: no request goes out from now (a worker waiting for its turn wakes up and gives
        it up, with no row); the exchanges in flight go on."""
        self._stopping.set()
        self._giving_up.set()  # wakes the workers waiting for a turn

    def abort(self) -> None:
        """`stop_sending`, and end the exchanges still in flight at once: their connections are shut, whatever
        they wait for (a trickle, a hang, a connection kept alive), and each ends as `Interrupted`."""
        self.stop_sending()
        self._aborted.set()
        with self._count_lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def _track(self, sock: socket.socket) -> None:
        with self._count_lock:
            self._sockets.add(sock)
        if self._aborted.is_set():  # made while `abort` went through the others
            _shut(sock)

    def __enter__(self) -> ClipdropClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def retries_by_code(self) -> dict[str, int]:
        return dict(self.tally.retries)

    @contextmanager
    def counting(self) -> Iterator[Tally]:
        """What this thread's calls send inside the block: a caller sharing the client (several shards on one
        pool) can tell its own requests and retries from the others'."""
        self._counting.tally = Tally()
        try:
            yield self._counting.tally
        finally:
            self._counting.tally = None

    def _tallies(self) -> list[Tally]:
        return [tally for tally in (self.tally, getattr(self._counting, "tally", None)) if tally is not None]

    def surface_normals(self, image: bytes, filename: str, content_type: str) -> ApiResult:
        return self.call(SURFACE_NORMALS_PATH, image, filename, content_type)

    def call(self, path: str, image: bytes, filename: str, content_type: str) -> ApiResult:
        """POST one image, retrying transient failures; raises a `ClipdropError` otherwise."""
        for attempt in stamina.retry_context(
            on=self._backoff,
            attempts=self.retry.attempts,
            timeout=self.retry.timeout_s,
            wait_initial=self.retry.wait_initial_s,
            wait_max=self.retry.wait_max_s,
            wait_jitter=self.retry.wait_jitter_s,
        ):
            with attempt:
                return self._send_once(path, image, filename, content_type)
        raise AssertionError("unreachable")

    def _backoff(self, error: Exception) -> bool | float:
        """stamina hook: retry transient errors. After a 429 or a 5xx the retry goes straight back to the rate
        guard, which holds it (where a stop ends the wait) through the key's pause or its breaker."""
        if not isinstance(error, TransientError):
            return False
        with self._count_lock:  # workers retry concurrently
            for tally in self._tallies():
                tally.retries[error.error_code] += 1
        if isinstance(error, RateLimited | ServerError):
            return 0.0
        if isinstance(error, ApiUnreachable) and not self._answered.is_set():
            return self._first_contact_wait(error)
        return True

    def _first_contact_wait(self, error: ApiUnreachable) -> bool | float:
        """Retry an API never reached for `FIRST_CONTACT_GIVE_UP_S` in all (every worker's tries together),
        so a wrong URL is said in seconds, not after the whole backoff; then every worker gives up at once."""
        with self._count_lock:
            now = time.monotonic()
            if self._unreachable_since is None:
                self._unreachable_since = now
            if now - self._unreachable_since < FIRST_CONTACT_GIVE_UP_S:
                return FIRST_CONTACT_WAIT_S
            self._given_up = error
            self._giving_up.set()
            return False

    def _send_once(self, path: str, image: bytes, filename: str, content_type: str) -> ApiResult:
        if self._clients is None:  # before a turn is taken: a closed client is a caller's mistake, not a failure
            raise RuntimeError(CLOSED)
        self._raise_if_given_up()
        with _shared_state():  # the turn holds the credit lease too: one transaction to start, one to end
            turn = self.rate_guard.acquire(self._giving_up, give_up_s=self.retry.timeout_s, credit=self.credit_guard)
        if turn is None:  # woken while waiting: the API was given up, or the run is stopping
            self._raise_if_given_up()
            raise RunStopped("the run stopped before this image was sent")
        outcome: Outcome = "no_answer"
        result: ApiResult | None = None
        charge = _Charge()
        try:
            self._raise_if_given_up()  # decided while this worker waited for its turn
            result = self._send_in_turn(path, image, filename, content_type, charge)
            outcome = "answered"
            return result
        except Exception as error:
            outcome = _outcome(error)
            if isinstance(error, RateLimited):  # pause the key first: the sends behind this one stop at once
                with _shared_state():
                    self.rate_guard.cooldown(DEFAULT_COOLDOWN_S if error.retry_after is None else error.retry_after)
            raise
        finally:
            policy = self.retry
            _after_exchange(
                lambda: self.rate_guard.finished(
                    turn, outcome, policy.wait_initial_s, policy.wait_max_s, self.credit_guard, charge.pair()
                ),
                result,
            )

    def _raise_if_given_up(self) -> None:
        """The run is stopping, or another worker found the API unreachable: nothing more is sent."""
        if self._stopping.is_set():
            raise RunStopped("the run is stopping: not sent")
        if self._given_up is not None and not self._answered.is_set():
            raise self._given_up

    def _send_in_turn(self, path: str, image: bytes, filename: str, content_type: str, charge: _Charge) -> ApiResult:
        """One exchange; what it cost and the balance it reported go in `charge` as they are known."""
        started = time.monotonic()
        exchange = _Exchange(self, self.timeout_s)
        files = {"image_file": (filename, image, content_type)}
        try:
            with (
                self._connections,
                exchange,
                self._http.stream("POST", path, files=files, extensions={"trace": exchange.trace}) as response,
            ):
                exchange.attach(response.extensions["network_stream"])
                self._answered.set()
                self._heed_rate_headers(response)
                charge.remaining = parse_credits(response.headers.get("x-remaining-credits"))
                if response.status_code != 200:
                    response.read()
                    raise_for_status(response)
                # A success is charged even when the header is missing: assume the documented price.
                reported = parse_credits(response.headers.get("x-credits-consumed"))
                charge.consumed = CREDITS_PER_CALL if reported is None else reported
                body = self._read_body(response, charge.consumed, exchange)
            self._observe(time.monotonic() - started)
            return ApiResult(body, response.status_code, charge.consumed, charge.remaining)
        except RunStopped as error:  # 401, 403, 402: no later request on this key can succeed
            self.credit_guard.stop(error)
            raise
        except httpx.TransportError as error:
            raise self._broken_off(error, exchange) from None

    def _broken_off(self, error: httpx.TransportError, exchange: _Exchange) -> ClipdropError:
        """What an exchange that broke off before its answer means: a request that did not go out whole is
        safe to send again (unless the run is stopping); one that did may have been charged."""
        if not exchange.sent:
            if self._aborted.is_set():
                return RunStopped("the run is stopping: not sent")
            if isinstance(error, httpx.ConnectTimeout):
                return ApiUnreachable(_cause(error))
            if exchange.expired or isinstance(error, httpx.TimeoutException):  # write or pool timeout
                return ApiTimeout(f"could not send the image in time ({type(error).__name__})")
            return ApiUnreachable(_cause(error))  # connect or write error: nothing the server could answer
        if self._aborted.is_set():
            return Interrupted("sent, then the run was stopped before an answer; it may have been charged")
        if exchange.expired or isinstance(error, httpx.ReadTimeout):
            return NoAnswer(f"sent, but no answer within the {self.timeout_s:g} s timeout; it may have been charged")
        return ConnectionLost(
            f"sent, then the connection broke before an answer ({type(error).__name__}); it may have been charged"
        )

    def _heed_rate_headers(self, response: httpx.Response) -> None:
        """A limit the API states (`RateLimit-Limit` / `X-RateLimit-Limit`, per minute as documented) is kept to by
        every process on the key; a success that leaves none (`...-Remaining: 0`) pauses the key until the reset."""
        limit = _header_number(response, "ratelimit-limit", "x-ratelimit-limit")
        if limit is not None and limit >= 1 and limit != self._announced:
            self._announced = limit
            self.rate_guard.announce(int(limit))
        if (
            response.status_code == 200
            and _header_number(response, "ratelimit-remaining", "x-ratelimit-remaining") == 0
        ):
            if (reset := _retry_after(response)) is not None:
                self.rate_guard.cooldown(reset)

    def _count_request(self) -> None:
        """A request sent: out whole (answered or not), or answered. A connection refused or a send that broke
        off unanswered is not one. Counted as it goes out, so a request still waiting for its answer counts."""
        with self._count_lock:
            for tally in self._tallies():
                tally.requests += 1

    def _observe(self, seconds: float) -> None:
        with self._count_lock:
            self.latency_s += LATENCY_WEIGHT * (seconds - self.latency_s)

    def _read_body(self, response: httpx.Response, consumed: Decimal | None, exchange: _Exchange) -> bytes:
        """Read a 200's body; a broken one is charged already, so it must not be retried."""
        try:
            body = response.read()
        except httpx.TransportError as error:
            if self._aborted.is_set():
                raise Interrupted(
                    "the run was stopped while the answer (200) arrived; it is charged",
                    status=200,
                    credits_consumed=consumed,
                ) from None
            if exchange.expired or isinstance(error, httpx.ReadTimeout):
                raise NoAnswer(
                    f"the answer (200) was not whole within the {self.timeout_s:g} s timeout; it is charged",
                    status=200,
                    credits_consumed=consumed,
                ) from None
            raise InvalidResponse(
                f"response body cut off ({type(error).__name__})", status=200, credits_consumed=consumed
            ) from None
        if not body.startswith(JPEG_MAGIC):
            raise InvalidResponse("response body is not a JPEG", status=200, credits_consumed=consumed)
        return body


@contextmanager
def _shared_state(answer: ApiResult | ClipdropError | None = None) -> Iterator[None]:
    """Around the guards' calls: what they raise other than a `ClipdropError` is the shared state failing
    (Redis gone, a SQLite file unusable), raised as `StateUnavailable` carrying the exchange's `answer`."""
    try:
        yield
    except ClipdropError:
        raise
    except Exception as error:
        raise StateUnavailable(error, answer) from error


def _after_exchange(bookkeeping: Callable[[], object], result: ApiResult | None) -> None:
    """The guards' bookkeeping in an exchange's `finally`. The answer arrived before it, so a state that fails
    here must not discard it: the paid `result`, or the error the exchange is raising (its row), goes on in
    `StateUnavailable` for the caller to keep."""
    ending = sys.exception() if result is None else None  # no result: the exchange is raising
    if isinstance(ending, StateUnavailable):
        with suppress(Exception):  # the same outage, already raised with the answer: keep that one
            bookkeeping()
        return
    with _shared_state(result or (ending if isinstance(ending, ClipdropError) else None)):
        bookkeeping()


__all__ = [
    "DEFAULT_API_URL",
    "SURFACE_NORMALS_PATH",
    "ApiResult",
    "ClipdropClient",
    "ClipdropError",
    "RetryPolicy",
    "Tally",
    "parse_credits",
    "raise_for_status",
]
