"""What `normals-pipeline run` shows while it runs: one live display on a terminal (rich), plain progress
lines otherwise (CI, logs). It only renders the core's `Progress` snapshots; nothing here decides anything."""

from __future__ import annotations

import re
import shlex
import sys
import time
import urllib.parse
from collections import deque
from dataclasses import replace
from decimal import Decimal
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .enrich import Progress, Throttle

# Local URIs as `Path.as_uri` writes them: everything but `/` and unreserved characters is %-encoded, so a
# URI ends at the first space or punctuation of the sentence around it.
_FILE_URI = re.compile(r"file://[A-Za-z0-9/%._~\-]+")


def plain_number(value: float | Decimal) -> str:
    """Credits as a person writes them: 9,998,000 or 0.2, never 9.998e+06."""
    return f"{round(Decimal(str(value)), 6).normalize():,f}"


def counted(n: int, noun: str) -> str:
    """`1 error`, `2 errors`: a count a person reads without stumbling."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def shell_paths(text: str) -> str:
    """`file://` URIs in a message as paths a user can paste into a shell; `s3://` URIs stay as they are."""
    return _FILE_URI.sub(lambda found: shlex.quote(urllib.parse.unquote(found[0].removeprefix("file://"))), text)


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RateMeter:
    """Requests sent in the last minute, which is what the key's limit counts, from the running count of
    successive snapshots (all of them while the run is younger than a minute)."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._seen: deque[tuple[float, int]] = deque()

    def add(self, requests: int, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        self._seen.append((now, requests))
        while len(self._seen) > 1 and now - self._seen[1][0] >= self.window_s:
            self._seen.popleft()
        since, before = self._seen[0]
        return requests - before if now - since >= self.window_s else requests


def figures(progress: Progress, rpm: int, limit: int) -> list[str]:
    """The display's parts, shared by the live view and the plain lines."""
    remaining = f", {plain_number(progress.remaining)} remaining" if progress.remaining is not None else ""
    left = f", about {duration(progress.left_s)} left" if progress.left_s is not None else ""
    errors = counted(progress.error_count, "error")
    return [
        f"{progress.done}/{progress.total} images, {progress.enriched} enriched, {errors}",
        f"{rpm}/{limit} rpm, {counted(progress.requests, 'request')}",
        f"{plain_number(progress.credits)} {'credit' if progress.credits == 1 else 'credits'} spent{remaining}",
        f"{duration(progress.elapsed_s)} elapsed{left}",
    ]


class PlainView:
    """Without a terminal: a progress line every ~10 s or 5 % of the images, never two within a second, and
    none when there is nothing to send."""

    def __init__(self, limit: int, stream: TextIO) -> None:
        self.limit, self.stream = limit, stream
        self.meter, self.throttle = RateMeter(), Throttle(seconds=10, fraction=0.05)
        self.last: Progress | None = None

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, progress: Progress) -> None:
        self.last = progress
        rpm = self.meter.add(progress.requests)
        if progress.total and self.throttle.due(progress):  # a run with nothing to send says so once, at its end
            self.print("progress: " + "; ".join(figures(progress, rpm, self.limit)))

    def print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class LiveView(PlainView):
    """On a terminal: one display for the whole run, redrawn in place; lines printed meanwhile go above it."""

    def __init__(self, limit: int, console: Console) -> None:
        super().__init__(limit, console.file)
        self.console, self.rpm, self.updated_at = console, 0, time.monotonic()
        self.live = Live(get_renderable=self._render, console=console, refresh_per_second=4, transient=False)

    def __enter__(self) -> LiveView:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()

    def update(self, progress: Progress) -> None:
        self.last, self.rpm, self.updated_at = progress, self.meter.add(progress.requests), time.monotonic()

    def print(self, text: str) -> None:
        self.console.print(Text(text))

    def _render(self) -> Table | Text:
        if self.last is None:
            return Text("starting…")
        now = replace(self.last, elapsed_s=self.last.elapsed_s + time.monotonic() - self.updated_at)  # no freeze
        images, rate, credits, times = figures(now, self.rpm, self.limit)
        table = Table.grid(padding=(0, 2))
        bar = ProgressBar(
            total=self.last.total or 1,
            completed=self.last.done if self.last.total else 1,
            width=30,
            style="grey35",
            complete_style="cyan",
            finished_style="green",
        )
        table.add_row(bar, images)
        table.add_row("", rate)
        table.add_row("", credits)
        table.add_row("", times)
        return table


def open_view(limit: int, *, verbose: bool) -> PlainView:
    """The live display when stdout is a terminal (and Dagster's log is not on it), plain lines otherwise."""
    if verbose or not sys.stdout.isatty():
        return PlainView(limit, sys.stdout)
    return LiveView(limit, Console(file=sys.stdout))
