"""``normals-pipeline emulator``: serve the emulated API until Ctrl-C."""

from __future__ import annotations

import argparse
import sys
import threading
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._server import EmulatorConfig

__all__ = ["add_arguments", "config_from_args", "run"]

_DEFAULT_CREDITS = Decimal(1000)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the emulator's options on ``parser`` (a subcommand's parser)."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback unless --allow-remote)")
    parser.add_argument("--port", type=int, default=8765, help="port to bind, 0 for any free port")
    parser.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        type=_api_key,
        metavar="KEY[:CREDITS]",
        help="accepted key and its credits (default 1000, 'unlimited' for no limit); repeatable; "
        "default emulator-key:1000",
    )
    parser.add_argument("--rpm", type=int, default=60, help="requests per minute allowed per key")
    parser.add_argument("--window", choices=["sliding", "fixed"], default="sliding", help="rate-limit window")
    parser.add_argument("--latency", type=float, default=0.0, metavar="SECONDS", help="delay added to every answer")
    parser.add_argument(
        "--latency-jitter",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="add a uniform draw in ±SECONDS to each answer's latency (never below 0; seeded by --seed)",
    )
    parser.add_argument("--credits-per-call", type=Decimal, default=Decimal(1), metavar="CREDITS")
    parser.add_argument("--no-credit-headers", action="store_true", help="omit x-credits-consumed/x-remaining-credits")
    parser.add_argument(
        "--rate-limit-headers", action="store_true", help="send X-RateLimit-Limit/-Remaining/-Reset on every answer"
    )
    parser.add_argument(
        "--cached-answer",
        action="store_true",
        help="answer every success with the map rendered for the first image (fast, for throughput benchmarks)",
    )
    parser.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback interface")
    faults = parser.add_argument_group("injected faults")
    faults.add_argument("--error-rate", type=float, default=0.0, help="fraction of valid requests answered 500")
    faults.add_argument("--error-burst", type=int, default=0, help="the next N valid requests get 500")
    faults.add_argument("--rate-limit-burst", type=int, default=0, help="the next N requests get 429")
    faults.add_argument("--retry-after", type=float, default=None, help="send Retry-After (seconds) with 429s")
    faults.add_argument("--reset-rate", type=float, default=0.0, help="fraction of connections reset unanswered")
    faults.add_argument("--slow-rate", type=float, default=0.0, help="fraction of requests delayed --slow-seconds")
    faults.add_argument("--slow-seconds", type=float, default=0.0)
    faults.add_argument("--truncate-rate", type=float, default=0.0, help="fraction of 200s cut short (charged)")
    faults.add_argument(
        "--corrupt-rate", type=float, default=0.0, help="fraction of 200s with a non-JPEG body (charged)"
    )
    faults.add_argument(
        "--drop-rate",
        type=float,
        default=0.0,
        help="fraction of valid requests charged, then reset unanswered (the answer is lost)",
    )
    faults.add_argument("--credits-after", type=int, default=None, help="answer 402 after N successes")
    faults.add_argument("--seed", type=int, default=0, help="seed of the fault randomness")


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    from ._server import EmulatorConfig, Faults  # numpy and Pillow: not for `normals-pipeline --help`

    faults = Faults(
        error_rate=args.error_rate,
        error_burst=args.error_burst,
        rate_limit_burst=args.rate_limit_burst,
        retry_after=args.retry_after,
        reset_rate=args.reset_rate,
        slow_rate=args.slow_rate,
        slow_seconds=args.slow_seconds,
        truncate_rate=args.truncate_rate,
        corrupt_rate=args.corrupt_rate,
        drop_rate=args.drop_rate,
        credits_after=args.credits_after,
        seed=args.seed,
    )
    return EmulatorConfig(
        host=args.host,
        port=args.port,
        keys=dict(args.api_keys or [("emulator-key", _DEFAULT_CREDITS)]),
        rpm=args.rpm,
        window=args.window,
        latency=args.latency,
        latency_jitter=args.latency_jitter,
        credits_per_call=args.credits_per_call,
        faults=faults,
        credit_headers=not args.no_credit_headers,
        rate_limit_headers=args.rate_limit_headers,
        cached_answer=args.cached_answer,
        allow_remote=args.allow_remote,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; print one line, URL first, so scripts can scrape it."""
    from ._server import Emulator, fingerprint, format_decimal

    try:
        emulator = Emulator(config_from_args(args)).start()
    except (ValueError, OSError) as error:
        print(f"emulator: {error}", file=sys.stderr)
        return 2
    config = emulator.config
    keys = ", ".join(
        f"{key} (sha256:{fingerprint(key)}, {'unlimited' if credits is None else format_decimal(credits)} credits)"
        for key, credits in config.keys.items()
    )
    print(f"{emulator.url}  keys: {keys}  rpm={config.rpm} ({config.window})  Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
    return 0


def _api_key(text: str) -> tuple[str, Decimal | None]:
    key, separator, credits = text.rpartition(":")
    if not separator:
        return text, _DEFAULT_CREDITS
    if credits.lower() == "unlimited":
        return key, None
    try:
        return key, Decimal(credits)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"credits must be a number or 'unlimited', got {credits!r}") from None
