"""The exception hierarchy: every outcome that is not a normal map has a class and a stable code.

The shape follows the decision a caller has to make, not the HTTP status:

    ClipdropError
    ├── ImageRejected      one image is bad: record its code, go on          (400, other 4xx, local checks)
    ├── InvalidResponse    the API answered 200 but the body is unusable     (charged; recorded, not retried)
    ├── NoAnswer           sent, but no answer in time: may be charged       (recorded, not retried)
    │   ├── ConnectionLost sent, then the connection broke before the answer
    │   └── Interrupted    sent, then the run was stopped (SIGTERM, Ctrl-C) before the answer was whole
    ├── TransientError     retried with backoff, then recorded               (429, 5xx, connection, send timeout)
    │   ├── RateLimited
    │   ├── ServerError
    │   ├── ApiTimeout
    │   └── ApiUnreachable
    └── RunStopped         stop sending; keep what is done                   (401, 403, 402, credit guards)
        ├── MissingApiKey
        ├── InvalidApiKey
        ├── OutOfCredits
        ├── CreditLimitReached
        ├── ApiDown        only 5xx for longer than the retry policy's timeout (the key's breaker gave up)
        ├── MapNotStored   a paid answer could not be stored: kept in the spool, recorded with its cost, then stop
        ├── ManifestNotWritten  the shard's manifest could not be written: its rows stay in the journal
        └── StateUnavailable    the shared state (Redis, SQLite) failed: the answer in hand is kept, then stop

Messages never contain the API key: they are built from the status and the server's JSON only.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import ApiResult


class ClipdropError(Exception):
    """Base class; `error_code` is the stable string written to the manifest."""

    error_code = "clipdrop_error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ImageRejected(ClipdropError):
    """This image cannot be enriched as it is; other images are unaffected."""

    error_code = "bad_request"

    def __init__(self, message: str, *, status: int | None = None, error_code: str | None = None) -> None:
        super().__init__(message, status=status)
        if error_code is not None:
            self.error_code = error_code


class InvalidResponse(ClipdropError):
    """A 200 whose body is not a usable JPEG. Credits may have been charged, so it is not retried."""

    error_code = "invalid_response"

    def __init__(self, message: str, *, status: int | None, credits_consumed: Decimal | None) -> None:
        super().__init__(message, status=status)
        self.credits_consumed = credits_consumed


class NoAnswer(ClipdropError):
    """The image was sent but no whole answer came within the timeout. The API may have processed and charged
    it, so it is not resent in this run: a retry could charge twice. The next run sends it again.
    `credits_consumed`: what a 200 cut off by the deadline said it cost (None before any answer)."""

    error_code = "timeout"

    def __init__(self, message: str, *, status: int | None = None, credits_consumed: Decimal | None = None) -> None:
        super().__init__(message, status=status)
        self.credits_consumed = credits_consumed


class ConnectionLost(NoAnswer):
    """The image was sent, then the connection broke before an answer. The server may have charged it
    (from here it looks the same as a charge followed by a dropped connection), so it is handled like a
    timeout: recorded, not resent in this run, sent again by the next."""

    error_code = "connection_lost"


class Interrupted(NoAnswer):
    """The run was stopped (SIGTERM, Ctrl-C) while the image's request was out, and its answer did not come
    whole within the grace the stop gives: the exchange was ended. Like a timeout it may have been charged
    (a 200 cut off says so and the row keeps that cost); the next run sends it again."""

    error_code = "interrupted"


class TransientError(ClipdropError):
    """Worth another try after a pause."""

    retry_after: float | None = None


class RateLimited(TransientError):
    error_code = "rate_limited"

    def __init__(self, message: str, *, status: int | None = 429, retry_after: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class ServerError(TransientError):
    error_code = "server_error"


class ApiTimeout(TransientError):
    """The request could not be delivered in time: nothing was processed, so it is safe to resend."""

    error_code = "send_timeout"


class ApiUnreachable(TransientError):
    """No connection could be made, or it broke while the request was still being written (the server
    cannot answer a request it has not read whole): nothing was charged."""

    error_code = "connection_error"


class RunStopped(ClipdropError):
    """Sending more would be refused or would overspend: the whole run stops, done work is kept."""


class MissingApiKey(RunStopped):
    error_code = "missing_api_key"


class InvalidApiKey(RunStopped):
    error_code = "invalid_api_key"


class OutOfCredits(RunStopped):
    error_code = "out_of_credits"


class CreditLimitReached(RunStopped):
    """A guard stopped sending before the credit floor or the run budget was crossed."""

    error_code = "credit_limit"


class ApiDown(RunStopped):
    """The API answered nothing but server errors while every sender on the key waited at its breaker (one probe
    at a time) for longer than the retry policy allows: the images left were not sent, the next run sends them."""

    error_code = "api_down"


class MapNotStored(RunStopped):
    """The API answered (and charged), but the normal map could not be written (disk full, permission).
    The row keeps what it cost; the run stops, since every further answer would be lost the same way."""

    error_code = "map_not_stored"

    def __init__(self, message: str, *, credits_consumed: Decimal | None) -> None:
        super().__init__(message, status=200)
        self.credits_consumed = credits_consumed


class ManifestNotWritten(RunStopped):
    """The shard's manifest could not be written; its rows stay journaled for the next run."""

    error_code = "manifest_not_written"


class StateUnavailable(RunStopped):
    """The shared state (the key's rate and credits, the claims: Redis or the SQLite files) failed, so
    nothing more can be sent safely. `answer` is what the exchange in hand brought (a paid `ApiResult`, or
    the error its row records; None if nothing was sent): the caller keeps it before stopping."""

    error_code = "state_unavailable"

    def __init__(self, cause: Exception, answer: ApiResult | ClipdropError | None = None) -> None:
        super().__init__(
            f"the shared state (rate, credits, claims) failed ({type(cause).__name__}: {cause}); "
            "sending stopped and every answer that arrived is stored: bring it back, then re-run"
        )
        self.answer = answer


def stop_message(error: Exception, api_url: str) -> str:
    """One line: what happened and what to do. Built from our own messages, which never hold the key."""
    if isinstance(error, ApiUnreachable):
        return (
            f"cannot reach the Clipdrop API at {api_url} ({error.message}); check the URL and the network, then re-run"
        )
    return error.message if isinstance(error, ClipdropError) else f"{type(error).__name__}: {error}"


def stopped_line(message: str) -> str:
    """The line a stopped run ends with, in every shell: the reason, and that what was paid for is kept."""
    advice = "finished images are kept" if "re-run" in message else "finished images are kept; re-run to continue"
    return f"run stopped: {message} ({advice})"
