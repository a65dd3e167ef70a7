"""What `normals-pipeline run` shows while it runs: the live display on a terminal, bounded plain lines
without one, and what a stopped (or SIGTERMed) run prints."""

import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from normals_pipeline.cli import main
from normals_pipeline.enrich import Progress, Throttle
from normals_pipeline.live import PlainView, RateMeter, plain_number, shell_paths
from normals_pipeline.synthetic import make_portraits

CLI = str(Path(sys.executable).with_name("normals-pipeline"))


@pytest.fixture
def portraits(tmp_path):
    make_portraits(tmp_path / "in", 100)
    return tmp_path / "in"


def arguments(dataset, output, url, *extra) -> list[str]:
    return ["run", "--dataset", str(dataset), "--output", str(output), "--api-url", url, "--shards", "4", *extra]


class TimedStdout(io.StringIO):
    """Stdout that is not a terminal and notes when each line was written."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.lines += [(time.monotonic(), line) for line in text.splitlines() if line]
        return super().write(text)

    def isatty(self) -> bool:
        return False


def test_without_a_terminal_progress_lines_are_few_and_at_least_a_second_apart(
    portraits, tmp_path, emulator_factory, monkeypatch
):
    emulator = emulator_factory(latency=0.1)
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    stdout = TimedStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(arguments(portraits, tmp_path / "out", emulator.url, "--rpm", "100000", "--concurrency", "4")) == 0
    progress = [(at, line) for at, line in stdout.lines if line.startswith("progress: ")]
    assert 1 <= len(progress) <= 21, stdout.getvalue()
    assert all(later - earlier >= 0.99 for (earlier, _), (later, _) in zip(progress, progress[1:]))
    assert re.search(r"\d+/100 images, \d+ enriched, 0 errors; \d+/100000 rpm", progress[0][1])
    assert not any(re.match(r"\s*shard \d+", line) for _, line in stdout.lines)
    assert "done in" in stdout.lines[-3][1] and "100 images, 100 enriched" in stdout.lines[-3][1]


def read_all(fd: int, process: subprocess.Popen, timeout: float = 120) -> bytes:
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            data += chunk
        elif process.poll() is not None:
            break
    return data


def test_on_a_terminal_one_live_display_shows_the_runs_figures(portraits, tmp_path, emulator_factory):
    emulator = emulator_factory(latency=0.2)
    leader, follower = pty.openpty()
    env = {**os.environ, "CLIPDROP_API_KEY": "test-key", "TERM": "xterm-256color", "COLUMNS": "120"}
    args = arguments(portraits, tmp_path / "out", emulator.url, "--rpm", "6000", "--concurrency", "4")
    process = subprocess.Popen([CLI, *args], stdout=follower, stderr=subprocess.PIPE, env=env)
    os.close(follower)
    try:
        screen = read_all(leader, process).decode(errors="replace")
    finally:
        os.close(leader)
    assert process.wait(timeout=60) == 0, process.stderr.read()
    assert "\x1b[" in screen  # drawn in place, not printed line after line
    assert "progress: " not in screen
    for field in (r"\d+/100 images, \d+ enriched, 0 errors", r"\d+/6000 rpm", r"credits spent, [\d,]+ remaining"):
        assert re.search(field, screen), field
    assert re.search(r"\d+:\d\d elapsed, about \d+:\d\d left", screen)
    assert "100/100 images, 100 enriched, 0 errors" in screen
    assert "done in" in screen and "100 credits consumed, 900 remaining" in screen


def test_a_stopped_run_prints_its_summary_and_one_reason_and_no_shard_lines(
    portraits, tmp_path, emulator_factory, monkeypatch, capsys
):
    emulator = emulator_factory(keys={"test-key": Decimal(2)})
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    assert main(arguments(portraits, tmp_path / "out", emulator.url, "--rpm", "100000", "--concurrency", "1")) == 1
    captured = capsys.readouterr()
    assert not re.search(r"shard \d+", captured.out), captured.out
    [summary] = [line for line in captured.out.splitlines() if line.startswith("stopped after")]
    assert re.search(
        r": 2 of 100 images processed \(98 unfinished\), 2 enriched, errors: .*; \d+ requests, 2 credits consumed",
        summary,
    )
    [reason] = captured.err.strip().splitlines()
    assert reason.startswith("normals-pipeline: run stopped: ") and "buy credits" in reason
    assert "done in" not in captured.out


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_stops_the_run_keeping_finished_images_and_a_rerun_finishes(
    portraits, tmp_path, emulator_factory, monkeypatch, capsys, stop
):
    emulator = emulator_factory(latency=0.2)
    output = tmp_path / "out"
    env = {**os.environ, "CLIPDROP_API_KEY": "test-key"}
    args = arguments(portraits, output, emulator.url, "--rpm", "6000", "--concurrency", "4")
    process = subprocess.Popen(
        [CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, start_new_session=True
    )
    assert process.stdout.readline().startswith("enriching ")
    while not re.match(r"progress: [1-9]\d*/100 images", process.stdout.readline()):  # until images are finished
        assert process.poll() is None
    os.kill(process.pid, stop)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1, err
    [reason] = err.strip().splitlines()
    assert reason == f"normals-pipeline: stopped by {stop.name}; finished images kept (re-run to continue)"
    assert re.search(r"^stopped after [\d.]+ s: \d+ of 100 images processed", out, re.MULTILINE), out
    kept = _journaled(output)
    assert 0 < len(kept) < 100 and Decimal(emulator.stats()["charged"]) >= len(kept)

    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    assert main(args) == 0
    table = ds.dataset(str(output / "manifest"), partitioning="hive").to_table().to_pandas()
    assert len(table) == 100 and table["path"].is_unique and table["error_code"].isna().all()
    assert Decimal(emulator.stats()["charged"]) <= 100 + 4  # at most what was in flight is sent twice
    assert "100 images, 100 enriched" in capsys.readouterr().out


def test_the_throttle_lets_a_line_through_every_step_or_period_never_two_within_the_gap():
    throttle = Throttle(seconds=10, fraction=0.05)
    at = {0.0: 1, 0.5: 20, 1.0: 21, 1.2: 40, 2.5: 41, 13.0: 42, 13.5: 100}
    passed = [now for now, done in at.items() if throttle.due(Progress(done=done, total=100), now=now)]
    assert passed == [0.0, 1.0, 2.5, 13.0]  # 0.5 and 1.2 and 13.5 within a second of the last; 41 a new step


def test_a_run_with_nothing_to_send_prints_no_progress_line():
    stream = io.StringIO()
    PlainView(60, stream).update(Progress(total=0))
    assert stream.getvalue() == ""  # not "0/0 images": its summary says "nothing to send"


def test_the_rate_is_the_requests_of_the_last_minute():
    meter = RateMeter()
    assert [meter.add(requests, now=now) for now, requests in [(0, 1), (30, 30), (59, 60)]] == [1, 30, 60]
    assert meter.add(90, now=90) == 60  # 90 sent, 30 of them by 30 s
    assert meter.add(91, now=150) == 1


def test_credits_are_plain_numbers_and_local_uris_are_paths_to_paste():
    numbers = [plain_number(value) for value in (9.998e6, 0.2, 4.0, Decimal("12.500"))]
    assert numbers == ["9,998,000", "0.2", "4", "12.5"]
    text = "could not write file:///tmp/out%20put/manifest/partition%3D00/manifest.parquet (disk full); s3://b/k"
    assert shell_paths(text) == (
        "could not write '/tmp/out put/manifest/partition=00/manifest.parquet' (disk full); s3://b/k"
    )
    assert shell_paths("file:///data/enriched/partition%3D01.") == "/data/enriched/partition=01."


def test_the_first_sigterm_stops_a_run_whose_answers_trickle_and_keeps_what_they_cost(tmp_path, fault_server):
    """Answers trickling in (200, then a byte every 2 s) under a long --timeout: one SIGTERM ends the run within
    seconds (the answers on their way get a short grace, then their exchanges are cut); each cut 200 keeps a row
    with its cost, and the stop line counts the requests sent."""
    server = fault_server("trickle", interval=2.0)
    make_portraits(tmp_path / "in", 6)
    output = tmp_path / "out"
    env = {**os.environ, "CLIPDROP_API_KEY": "test-key"}
    args = arguments(tmp_path / "in", output, server.url, "--rpm", "100000", "--concurrency", "4", "--timeout", "100")
    process = subprocess.Popen(
        [CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while server.charged < 4:  # four 200s trickling
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        signalled = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert time.monotonic() - signalled < 15
    assert process.returncode == 1 and err.strip() == (
        "normals-pipeline: stopped by SIGTERM; finished images kept (re-run to continue)"
    )
    assert re.search(
        r"^stopped after [\d.]+ s: 4 of 6 images processed \(2 unfinished\), 0 enriched, errors: interrupted: 4; "
        r"4 requests, 4 credits consumed",
        out,
        re.MULTILINE,
    ), out
    rows = _journaled(output)
    assert [row["error_code"] for row in rows] == ["interrupted"] * 4
    assert sum(row["credits_consumed"] for row in rows) == server.charged == server.requests == 4


def _journaled(output: Path) -> list[dict]:
    """Every row in an output's journal files (one row a file, or JSON lines)."""
    return [
        json.loads(line) for path in (output / "journal").rglob("*.json*") for line in path.read_text().splitlines()
    ]
