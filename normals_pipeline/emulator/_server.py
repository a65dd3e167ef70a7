"""A loopback HTTP server that behaves like the Clipdrop portrait-surface-normals API.

The real API is unreachable from the project's machines, so demos and tests run
against this. It follows the API document and adds what a client must survive:
rate limiting (sliding or fixed windows; ``rate_limit_headers`` adds ``X-RateLimit-*`` headers, which the real
API is not known to send), credits, and injected faults.

Checks run in the order a client would meet them: api key (401, 403), rate
limit (429), credits (402), input (400), injected faults (500, resets, drops,
slow, truncated or corrupt 200s), success. Every authenticated request counts
toward the rate limit, rejected ones included. Credits are reserved at the
credit check (so concurrent requests cannot overdraw) and kept only for answers
the server believes succeeded: 200s, including truncated and corrupt ones, and
drops. A reset (``reset_rate``) breaks the connection before the request is
processed and is not charged; a drop (``drop_rate``) processes and charges the
request, then breaks the connection with a TCP RST instead of answering: the API
charged, but the answer never arrived.

The stats count charges per content: ``charged_by_content`` maps the SHA-256
(hex) of each charged request's ``image_file`` bytes to how many times it was
charged, and ``charged_twice`` counts the charges for content charged before,
so a client that re-sends what it already paid for shows up.

Control endpoints (not counted in the stats): ``GET /_emulator/stats``,
``POST /_emulator/faults`` (JSON body with ``Faults`` fields), ``POST /_emulator/reset``
(clears the stats, not the credits nor the rate limiter).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import ipaddress
import json
import logging
import math
import random
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from decimal import Decimal
from email.message import Message
from email.parser import HeaderParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import urlsplit

from PIL import Image

from ._normals import render_normal_map

__all__ = ["API_PATH", "Emulator", "EmulatorConfig", "Faults", "fingerprint", "format_decimal"]

logger = logging.getLogger(__name__)

API_PATH = "/portrait-surface-normals/v1"
MAX_PIXELS = 25_000_000
MAX_FILE_BYTES = 30 * 1024 * 1024
MAX_BODY_BYTES = 40 * 1024 * 1024  # a 30 MB file plus generous multipart overhead
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
WINDOW_SECONDS = 60.0
_SOCKET_TIMEOUT = 30.0  # a stalled client must not pin a handler thread forever
_POLL_INTERVAL = 0.05  # how quickly stop() returns; the stdlib default (0.5 s) slows test teardown
_GARBAGE = b"NOT A JPEG: injected corrupt response\n" * 64


@dataclass
class Faults:
    """Injected misbehaviour, all off by default; rates are fractions of valid requests.

    ``rate_limit_burst`` (429s) and ``credits_after`` (402s) act at their own
    check; the others only hit requests that passed every check. Counters
    (bursts, ``credits_after``) and the ``seed``-ed randomness restart whenever
    faults are set.

    ``reset_rate`` breaks the connection (TCP RST) before processing: not
    charged, labelled ``reset`` in the stats. ``drop_rate`` processes and
    charges the request, then breaks the connection (TCP RST) instead of
    answering: the API charged but the answer was lost; labelled ``dropped``.
    At most one fault hits a request, in this order: reset, error (500), drop,
    truncate, corrupt; ``slow`` adds its delay to any of them.
    """

    error_rate: float = 0.0
    error_burst: int = 0
    rate_limit_burst: int = 0
    retry_after: float | None = None
    reset_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 0.0
    truncate_rate: float = 0.0
    corrupt_rate: float = 0.0
    drop_rate: float = 0.0
    credits_after: int | None = None
    seed: int = 0


@dataclass
class EmulatorConfig:
    """How the emulator behaves; ``keys`` maps api key -> credits (None = unlimited).

    Every answer waits ``latency`` seconds, plus a uniform draw in ±``latency_jitter`` (never below
    0 in all), from a generator seeded with ``faults.seed`` when the emulator starts.
    """

    host: str = "127.0.0.1"
    port: int = 0
    keys: dict[str, Decimal | None] = field(default_factory=lambda: {"emulator-key": Decimal(1000)})
    rpm: int = 60
    window: Literal["sliding", "fixed"] = "sliding"
    latency: float = 0.0
    latency_jitter: float = 0.0
    credits_per_call: Decimal = Decimal(1)
    faults: Faults = field(default_factory=Faults)
    credit_headers: bool = True
    rate_limit_headers: bool = False  # X-RateLimit-Limit / -Remaining / -Reset on every answer to a known key
    # Every success answers the map rendered for the first image (a cache), not one rendered per image: a
    # stand-in that answers faster than any client, so a throughput figure measures the client, not it.
    cached_answer: bool = False
    allow_remote: bool = False
    clock: Callable[[], float] = time.time  # injectable so tests can cross window edges instantly


def fingerprint(key: str) -> str:
    """Identify a key in logs and stats without revealing it."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def format_decimal(value: Decimal) -> str:
    """``99`` rather than ``99.0`` or ``9.9E+1``; ``0.2`` for fractions."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


class BadRequest(Exception):
    """Input the API would refuse with 400; the message goes to the client."""


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    mode: Literal["normal", "reset", "drop", "truncate"] = "normal"
    delay: float = 0.0

    @classmethod
    def error(cls, status: int, message: str, headers: dict[str, str] | None = None) -> _Reply:
        return cls(status, json.dumps({"error": message}).encode(), headers=headers or {})


@dataclass
class _FaultState:
    faults: Faults
    rng: random.Random
    error_burst: int
    rate_limit_burst: int
    granted: int = 0  # successes (and in-flight reservations) since the faults were set

    @classmethod
    def of(cls, faults: Faults) -> _FaultState:
        return cls(faults, random.Random(faults.seed), faults.error_burst, faults.rate_limit_burst)


class _Service:
    """The API's behaviour and bookkeeping, independent of HTTP plumbing."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._credits = dict(config.keys)
        self._limiter: dict[str, deque[float]] = {key: deque() for key in config.keys}
        self._faults = _FaultState.of(config.faults)
        self._latency_rng = random.Random(config.faults.seed)  # apart from the faults': set_faults resets those
        self._in_flight = 0
        self._cached: bytes | None = None
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._requests = 0
        self._by_status: Counter[str] = Counter()
        self._charged: dict[str, Decimal] = {key: Decimal(0) for key in self._credits}
        self._log: dict[str, list[float]] = {key: [] for key in self._credits}
        self._charged_by_content: Counter[str] = Counter()
        self._charged_twice = 0
        self._concurrent_max = self._in_flight

    # -- bookkeeping -------------------------------------------------------

    def begin(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._concurrent_max = max(self._concurrent_max, self._in_flight)

    def end(self, status: str) -> None:
        with self._lock:
            self._in_flight -= 1
            self._requests += 1
            self._by_status[status] += 1

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_stats()

    def latency(self) -> float:
        """This answer's delay: ``latency`` ± a uniform draw within ``latency_jitter``, at least 0."""
        jitter = self.config.latency_jitter
        if jitter <= 0:
            return self.config.latency
        with self._lock:
            offset = self._latency_rng.uniform(-jitter, jitter)
        return max(0.0, self.config.latency + offset)

    def set_faults(self, faults: Faults) -> None:
        with self._lock:
            self._faults = _FaultState.of(faults)

    def credits(self, key: str) -> Decimal | None:
        with self._lock:
            return self._credits[key]

    def top_up(self, key: str, amount: Decimal) -> None:
        with self._lock:
            balance = self._credits[key]
            self._credits[key] = None if balance is None else balance + amount

    def stats(self) -> dict[str, Any]:
        with self._lock:
            keys = {
                fingerprint(key): {
                    "requests": len(self._log[key]),
                    "charged": format_decimal(self._charged[key]),
                    "remaining": None if self._credits[key] is None else format_decimal(self._credits[key]),
                }
                for key in self._credits
            }
            return {
                "requests": self._requests,
                "by_status": dict(sorted(self._by_status.items())),
                "charged": format_decimal(sum(self._charged.values(), Decimal(0))),
                "charged_by_content": dict(self._charged_by_content),
                "charged_twice": self._charged_twice,
                "keys": keys,
                "max_in_any_60s": max((_max_in_window(log) for log in self._log.values()), default=0),
                "concurrent_max": self._concurrent_max,
                "in_flight": self._in_flight,
            }

    # -- the API -----------------------------------------------------------

    def handle(self, api_key: str | None, content_type: str, body: bytes, arrived: float) -> _Reply:
        """Answer one ``POST`` to the API path, in the documented check order."""
        if not api_key:
            return _Reply.error(401, "No api key provided")
        if api_key not in self._credits:
            return _Reply.error(403, "Invalid or revoked api key")
        with self._lock:
            self._log[api_key].append(arrived)
            limited = self._rate_limited(api_key, arrived)
            limits = self._rate_limit_headers(api_key, arrived)
            if limited:
                return self._too_many_requests(limits)
            remaining = self._reserve(api_key)
        if remaining is False:
            return _Reply.error(402, "Your account has no remaining credits", limits)
        data: bytes | None = None
        try:
            data = _image_part(content_type, body)
            reply = self._success_or_fault(_read_image(data), remaining)
        except BadRequest as error:
            reply = _Reply.error(400, str(error))
        except Exception:  # a bug here must look like the real API's 500, and refund
            logger.exception("emulator failed to answer a request")
            reply = _Reply.error(500, "Internal server error")
        charged = reply.status == 200  # includes drops: the answer was ready, then lost
        digest = hashlib.sha256(data).hexdigest() if charged and data is not None else None  # outside the lock
        self._settle(api_key, charged=charged, digest=digest)
        return replace(reply, headers={**limits, **reply.headers})

    def _rate_limited(self, key: str, arrived: float) -> bool:
        """Record the request, then say whether it is over the limit (or burst-faulted)."""
        window = self._limiter[key]
        if self.config.window == "sliding":
            while window and window[0] <= arrived - WINDOW_SECONDS:
                window.popleft()
        else:
            bucket_start = arrived // WINDOW_SECONDS * WINDOW_SECONDS
            while window and window[0] < bucket_start:
                window.popleft()
        over = len(window) >= self.config.rpm
        window.append(arrived)
        if self._faults.rate_limit_burst > 0:
            self._faults.rate_limit_burst -= 1
            return True
        return over

    def _rate_limit_headers(self, key: str, arrived: float) -> dict[str, str]:
        """With `rate_limit_headers`: the limit per minute, what is left of it, and the seconds until the window
        has room again (the oldest request counted leaves a sliding window; a fixed one ends)."""
        if not self.config.rate_limit_headers:
            return {}
        window, rpm = self._limiter[key], self.config.rpm
        if self.config.window == "sliding":
            reset = window[0] + WINDOW_SECONDS - arrived if window else 0.0
        else:
            reset = (arrived // WINDOW_SECONDS + 1) * WINDOW_SECONDS - arrived
        remaining = max(0, rpm - len(window))
        return {
            "X-RateLimit-Limit": str(rpm),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(math.ceil(reset)),
        }

    def _too_many_requests(self, limits: dict[str, str]) -> _Reply:
        retry_after = self._faults.faults.retry_after
        headers = limits if retry_after is None else {**limits, "Retry-After": str(math.ceil(retry_after))}
        message = f"Too many requests: this key is limited to {self.config.rpm} requests per minute"
        return _Reply.error(429, message, headers)

    def _reserve(self, key: str) -> Decimal | None | Literal[False]:
        """Hold the price of a call; return the balance after it, None if unlimited, False if broke."""
        credits_after = self._faults.faults.credits_after
        if credits_after is not None and self._faults.granted >= credits_after:
            return False
        balance = self._credits[key]
        cost = self.config.credits_per_call
        if balance is not None and balance < cost:
            return False
        self._faults.granted += 1
        if balance is None:
            return None
        self._credits[key] = balance - cost
        return self._credits[key]

    def _settle(self, key: str, *, charged: bool, digest: str | None = None) -> None:
        cost = self.config.credits_per_call
        with self._lock:
            if charged:
                self._charged[key] += cost
                if digest is not None:
                    if self._charged_by_content[digest]:
                        self._charged_twice += 1
                    self._charged_by_content[digest] += 1
                return
            self._faults.granted = max(0, self._faults.granted - 1)  # faults may have been reset meanwhile
            if self._credits[key] is not None:
                self._credits[key] += cost

    def _success_or_fault(self, image: Image.Image, remaining: Decimal | None) -> _Reply:
        fault, delay = self._draw_fault()
        return replace(self._reply_for(fault, image, remaining), delay=delay)

    def _reply_for(self, fault: str | None, image: Image.Image, remaining: Decimal | None) -> _Reply:
        if fault == "reset":
            return _Reply(0, b"", mode="reset")
        if fault == "error":
            return _Reply.error(500, "Internal server error")
        headers = self._credit_headers(remaining)
        if fault == "corrupt":
            return _Reply(200, _GARBAGE, "image/jpeg", headers)
        mode: Literal["normal", "drop", "truncate"] = "normal"
        if fault == "drop":
            mode = "drop"  # the answer is ready (and charged), then lost: the connection is reset
        elif fault == "truncate":
            mode = "truncate"
        return _Reply(200, self._normal_map(image), "image/jpeg", headers, mode=mode)

    def _normal_map(self, image: Image.Image) -> bytes:
        if not self.config.cached_answer:
            return render_normal_map(image)
        if self._cached is None:  # a race renders it twice at most: the same bytes
            self._cached = render_normal_map(image)
        return self._cached

    def _draw_fault(self) -> tuple[str | None, float]:
        """Pick at most one fault and the extra delay.

        Draws the same count of numbers for every request, whatever the outcome, for
        determinism: five, plus a sixth (last) for ``drop_rate`` only when it is set, so
        the sequences of seeds chosen before drops existed are unchanged.
        """
        with self._lock:
            state = self._faults
            faults = state.faults
            reset, slow, error, truncate, corrupt = (state.rng.random() for _ in range(5))
            drop = state.rng.random() if faults.drop_rate > 0 else 1.0
            delay = faults.slow_seconds if slow < faults.slow_rate else 0.0
            if reset < faults.reset_rate:
                return "reset", delay
            if state.error_burst > 0 or error < faults.error_rate:
                state.error_burst = max(0, state.error_burst - 1)
                return "error", delay
            if drop < faults.drop_rate:
                return "drop", delay
            if truncate < faults.truncate_rate:
                return "truncate", delay
            if corrupt < faults.corrupt_rate:
                return "corrupt", delay
            return None, delay

    def _credit_headers(self, remaining: Decimal | None) -> dict[str, str]:
        if not self.config.credit_headers:
            return {}
        headers = {"x-credits-consumed": format_decimal(self.config.credits_per_call)}
        if remaining is not None:
            headers["x-remaining-credits"] = format_decimal(remaining)
        return headers


def _max_in_window(timestamps: list[float]) -> int:
    """Largest number of timestamps inside any half-open 60 s window."""
    ordered = sorted(timestamps)
    return max(
        (i - bisect.bisect_right(ordered, t - WINDOW_SECONDS) + 1 for i, t in enumerate(ordered)),
        default=0,
    )


def _read_image(data: bytes) -> Image.Image:
    """Fully decode the ``image_file`` part's bytes, refusing what the API refuses."""
    if len(data) > MAX_FILE_BYTES:
        raise BadRequest(f"Input file is {len(data) / 2**20:.1f} MB; the maximum file size is 30 MB")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise BadRequest(f"Image resolution is too big: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise BadRequest("Input image format is not valid: image_file must be a PNG, JPEG or WEBP file") from error
    if image.format not in ACCEPTED_FORMATS:
        raise BadRequest(f"Input image format {image.format} is not valid: send a PNG, JPEG or WEBP file")
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise BadRequest(
            f"Image resolution is too big: {width}x{height} is {width * height / 1e6:.2f} megapixels, "
            "the maximum is 25 megapixels"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise BadRequest(f"Input image could not be decoded, it may be truncated or corrupt: {error}") from error
    return image


def _image_part(content_type: str, body: bytes) -> bytes:
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        raise BadRequest("Missing image_file in request: the body must be multipart/form-data")
    for name, content in _multipart_parts(body, boundary.encode("latin-1")):
        if name == "image_file":
            return content
    raise BadRequest("Missing image_file in request")


def _multipart_parts(body: bytes, boundary: bytes) -> Iterator[tuple[object, bytes]]:
    """Split a multipart body by hand: the email parser is slow on 30 MB of binary."""
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary)
    if len(chunks) < 2 or not chunks[-1].startswith(b"--"):
        raise BadRequest("Malformed multipart body: the closing boundary is missing")
    for chunk in chunks[1:-1]:
        _, _, chunk = chunk.partition(b"\r\n")  # the rest of the boundary line
        head, separator, content = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise BadRequest("Malformed multipart body: a part has no header/body separator")
        headers = HeaderParser().parsestr(head.decode("utf-8", "replace"))
        yield headers.get_param("name", header="content-disposition"), content


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The head and the body go out in two writes: with Nagle's algorithm the body waits for the client's
    # delayed ACK of the head (40 ms on Linux), so every request on a kept-alive connection took ~44 ms.
    disable_nagle_algorithm = True
    timeout = _SOCKET_TIMEOUT
    server: _Server

    def do_POST(self) -> None:
        self._dispatch()

    do_GET = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_POST

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/_emulator/"):
            self._control(path)
            return
        self.server.service.begin()
        self._counted = False
        try:
            self._api(path)
        finally:
            self._count("aborted")  # the connection broke before an answer was written

    def _api(self, path: str) -> str:
        arrived = self.server.service.config.clock()
        try:
            body = self._read_body()
        except BadRequest as error:
            return self._send(_Reply.error(400, str(error)))
        if path != API_PATH:
            return self._send(_Reply.error(404, f"Not found: {path}; the API is POST {API_PATH}"))
        if self.command != "POST":
            return self._send(_Reply.error(405, f"Method {self.command} not allowed: use POST", {"Allow": "POST"}))
        reply = self.server.service.handle(
            self.headers.get("x-api-key"), self.headers.get("content-type", ""), body, arrived
        )
        time.sleep(self.server.service.latency() + reply.delay)
        return self._send(reply)

    def _control(self, path: str) -> None:
        service = self.server.service
        try:
            body = self._read_body()
        except BadRequest as error:
            self._send(_Reply.error(400, str(error)))
            return
        if path not in {"/_emulator/stats", "/_emulator/faults", "/_emulator/reset"}:
            self._send(_Reply.error(404, f"Not found: {path}"))
        elif path == "/_emulator/stats" and self.command == "GET":
            self._send_json(service.stats())
        elif path == "/_emulator/reset" and self.command == "POST":
            service.reset_stats()
            self._send_json({"reset": True})
        elif path == "/_emulator/faults" and self.command == "POST":
            self._set_faults(body or b"{}")
        else:
            self._send(_Reply.error(405, f"Method {self.command} not allowed on {path}"))

    def _set_faults(self, body: bytes) -> None:
        try:
            faults = Faults(**json.loads(body))
        except (ValueError, TypeError) as error:
            names = ", ".join(f.name for f in fields(Faults))
            self._send(_Reply.error(400, f"Faults must be a JSON object with fields among {names}: {error}"))
            return
        self.server.service.set_faults(faults)
        self._send_json({"faults": asdict(faults)})

    def _read_body(self) -> bytes:
        """The body by Content-Length; refuses (and will close) rather than read a huge one."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self.close_connection = True
            raise BadRequest("Chunked request bodies are not supported: send a Content-Length")
        try:
            length = int(self.headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise BadRequest("Invalid Content-Length header")
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest(f"Request body of {length / 2**20:.1f} MB is too large: the maximum file size is 30 MB")
        return self.rfile.read(length)

    def _send_json(self, payload: dict[str, Any]) -> None:
        self._send(_Reply(200, json.dumps(payload).encode()))

    def _count(self, status: str) -> None:
        """Record an API request once, before its answer goes out, so a client never sees stats lag."""
        if getattr(self, "_counted", True):
            return
        self._counted = True
        self.server.service.end(status)

    def _send(self, reply: _Reply) -> str:
        """Write the reply (or misbehave as asked); return the status label for the stats."""
        if reply.mode in ("reset", "drop"):
            label = "reset" if reply.mode == "reset" else "dropped"
            self._count(label)
            self._reset_connection()
            return label
        self._count(str(reply.status))
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if self.close_connection or reply.mode == "truncate":
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body[: len(reply.body) // 2] if reply.mode == "truncate" else reply.body)
        if reply.mode == "truncate":
            self.close_connection = True
        return str(reply.status)

    def _reset_connection(self) -> None:
        """Close with RST: SO_LINGER 0 makes close() abort instead of FIN."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # socketserver's 5 overflows when a client opens dozens of connections at once

    def __init__(self, address: tuple[str, int], service: _Service, family: socket.AddressFamily) -> None:
        self.address_family = family
        self.service = service
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Unblock keep-alive handlers so a stopped emulator really stops answering."""
        with self._connections_lock:
            for connection in list(self._connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("connection from %s ended with an error", client_address, exc_info=True)


class Emulator:
    """The emulated API on a loopback port, served from a daemon thread.

    Use as a context manager, or ``start()``/``stop()``.
    """

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        _check_host(self.config.host, self.config.allow_remote)
        self._service = _Service(self.config)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Emulator:
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        self._server = _Server((self.config.host, self.config.port), self._service, family)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name="clipdrop-emulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._server = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the emulator is not running: call start() first")
        host = self.config.host
        port = self._server.server_address[1]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stats(self) -> dict[str, Any]:
        return self._service.stats()

    def set_faults(self, faults: Faults) -> None:
        self._service.set_faults(faults)

    def credits(self, key: str) -> Decimal | None:
        return self._service.credits(key)

    def top_up(self, key: str, amount: Decimal) -> None:
        """Add credits to a key, as buying them does."""
        self._service.top_up(key, amount)


def _check_host(host: str, allow_remote: bool) -> None:
    """Refuse to expose a test server (with known keys) beyond this machine by accident."""
    if allow_remote:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)} if host else set()
    except socket.gaierror as error:
        raise ValueError(f"cannot resolve emulator host {host!r}: {error}") from error
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(
            f"refusing to bind the emulator to non-loopback host {host!r}: "
            "pass allow_remote=True (CLI: --allow-remote) to expose it to the network"
        )
