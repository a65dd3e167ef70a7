"""The emulator in its own process, recording when each request arrived and was answered.

    python -m bench._emulator [--timeline OUT.json] [--port 0] [--rpm 60] [--latency 0.8] [--latency-jitter 0.2]
                              [--api-key KEY[:CREDITS|:unlimited] ...]

Prints the URL first (as `normals-pipeline emulator` does), serves until SIGINT or SIGTERM, then writes the
`Timeline` (arrivals and answers, `time.time()`) to OUT.json if asked. Every `EmulatorProcess` of the bench runs
this: the emulator must not share the bench's GIL (`cpu`, `memory`, `overhead`) or must outlive a whole
deployment (`bench.backfill`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from decimal import Decimal
from pathlib import Path

from ._support import RecordingEmulator


def _key(text: str) -> tuple[str, Decimal | None]:
    key, separator, credits = text.rpartition(":")
    if not separator:
        return text, Decimal(1000)
    return key, None if credits == "unlimited" else Decimal(credits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._emulator", description=__doc__.splitlines()[0])
    parser.add_argument("--timeline", type=Path, default=None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rpm", type=int, default=60)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--latency-jitter", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", dest="keys", action="append", type=_key, default=[])
    parser.add_argument("--cached-answer", action="store_true", help="one rendered map for every success")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    emulator = RecordingEmulator(
        keys=dict(args.keys or [("emulator-key", Decimal(1000))]),
        rpm=args.rpm,
        latency=args.latency,
        latency_jitter=args.latency_jitter,
        port=args.port,
        seed=args.seed,
        cached_answer=args.cached_answer,
    )
    with emulator:
        print(f"{emulator.url}  rpm={args.rpm} latency={args.latency}±{args.latency_jitter}", flush=True)
        while not stop.wait(0.5):
            pass
    if args.timeline:
        emulator.timeline.dump(args.timeline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
