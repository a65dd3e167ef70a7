"""Helpers shared by the figures: test images, emulators (in-process and as a subprocess), CLI runs,
the naive client, the bare httpx loop, and child-process resource accounting."""

from __future__ import annotations

import bisect
import json
import math
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

API_PATH = "/portrait-surface-normals/v1"
CLI = [sys.executable, "-m", "normals_pipeline.cli"]
CHILD = [sys.executable, str(Path(__file__).with_name("_child.py"))]  # reports a child's own peak RSS and CPU
UNGUARDED = (sys.executable, str(Path(__file__).with_name("_unguarded.py")))  # the CLI with no guarantee (figure 6)
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# The bench sets these itself or wants the CLI's defaults: a user's NORMALS_SHARDS or NORMALS_REDIS_URL in the
# environment would change the run shape or the rate guard being measured.
_RUN_ENV_PREFIXES = ("NORMALS_", "CLIPDROP_")
# The emulator's numpy calls come from many HTTP handler threads at once; OpenBLAS's own helper threads then
# spin for work and cost ~8 ms of CPU per request on 2 cores, more than the rendering itself. The emulators
# (in this process or started from it) get one BLAS thread; the runs being measured get the user's setting.
_BLAS = "OPENBLAS_NUM_THREADS"
_USER_BLAS = os.environ.get(_BLAS)
os.environ[_BLAS] = "1"  # before numpy is imported: the emulator imports it


def client_env(**extra: str) -> dict[str, str]:
    """This process's environment as a measured client should get it: the user's BLAS setting, no
    NORMALS_*/CLIPDROP_* (the bench passes what it means), no DAGSTER_HOME (an ephemeral instance)."""
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME" and not k.startswith(_RUN_ENV_PREFIXES)}
    env.pop(_BLAS, None)
    if _USER_BLAS is not None:
        env[_BLAS] = _USER_BLAS
    return {**env, **extra}


def fresh_key(figure: str) -> str:
    """A key nobody used before: a rate guard that persists across processes (or runs) starts empty."""
    return f"bench-{figure}-{uuid.uuid4().hex[:10]}"


# -- images ---------------------------------------------------------------------------------------


def write_result(result: dict[str, Any], name: str) -> Path:
    """Print `result` and write it to bench/results/<its date>-<name>.json; returns the path."""
    out = RESULTS / f"{result['date'][:10]}-{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return out


def make_small_jpegs(folder: Path, count: int, seed: int, size: tuple[int, int] = (256, 320)) -> list[Path]:
    """`count` small portrait-like JPEGs (a random ellipse on a plain backdrop), every file's bytes unique.

    Uniqueness matters: the pipeline sends identical bytes once. The JPEG comment holds seed and index,
    so two files never collide even if the drawing did.
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    paths = []
    for index in range(count):
        image = Image.new("RGB", size, tuple(rng.randrange(150, 256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.4, 0.6)
        rx, ry = width * rng.uniform(0.15, 0.3), height * rng.uniform(0.2, 0.35)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=tuple(rng.randrange(0, 140) for _ in range(3)))
        path = folder / f"img_{seed:03d}_{index:05d}.jpg"
        image.save(path, "JPEG", quality=85, comment=f"bench seed={seed} index={index}".encode())
        paths.append(path)
    return paths


def make_padded_jpegs(folder: Path, count: int, seed: int, file_bytes: int = 2_000_000) -> list[Path]:
    """`count` JPEGs of `file_bytes` bytes each (a few bytes less at most): a small portrait (256×320) plus JPEG comment
    segments filling the rest, every file's bytes unique.

    For the client a file's size is what it holds in memory: it reads headers, not pixels, and sends the
    bytes as they are (`prepare`). The emulator decodes and renders every pixel, so a photo of that size
    (6 megapixels) would cost it ~0.3 s of CPU and cap a 2-core machine far below 50 images/s; these
    cost it ~20 ms.
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    filler = rng.randbytes(65533)  # the most one segment holds
    paths = []
    for index, small in enumerate(make_small_jpegs(folder / ".base", count, seed)):
        base = small.read_bytes()
        small.unlink()
        tag = f"bench seed={seed} index={index}".encode()
        segments = [b"\xff\xfe" + struct.pack(">H", len(tag) + 2) + tag]
        room = file_bytes - len(base) - len(segments[0])
        while room > 4:  # each segment: marker, length, up to 65533 bytes
            chunk = min(len(filler), room - 4)
            segments.append(b"\xff\xfe" + struct.pack(">H", chunk + 2) + filler[:chunk])
            room -= chunk + 4
        path = folder / f"big_{seed:03d}_{index:05d}.jpg"
        path.write_bytes(base[:2] + b"".join(segments) + base[2:])
        paths.append(path)
    (folder / ".base").rmdir()
    return paths


def make_photos(folder: Path, count: int, seed: int, size: tuple[int, int] = (2000, 3000)) -> list[Path]:
    """Photo-like JPEGs (q=90): smooth random colour fields plus sensor-like noise, so they do not
    compress trivially and decode about as slowly as camera pictures of the same size."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    paths = []
    for index in range(count):
        coarse = rng.integers(0, 256, size=(12, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
        detail = rng.integers(0, 256, size=(height // 4, width // 4, 3), dtype=np.uint8)
        texture = np.asarray(Image.fromarray(detail, "RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.int16)
        luma = rng.integers(-10, 11, size=(height, width, 1), dtype=np.int16)
        chroma = rng.integers(-3, 4, size=(height, width, 3), dtype=np.int16)
        pixels = np.clip(base * 0.7 + texture * 0.3 + luma + chroma, 0, 255).astype(np.uint8)
        path = folder / f"photo_{seed:03d}_{index:03d}.jpg"
        Image.fromarray(pixels, "RGB").save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


# -- emulators ------------------------------------------------------------------------------------


@dataclass
class Timeline:
    """When requests arrived at and left the emulator, from its clock hook and its bookkeeping.

    Times are `time.time()`, so a timeline recorded in another process (`EmulatorProcess(record=...)`)
    compares with this process's clock, and `summary(since=..., until=...)` can cut one phase out of it.
    """

    arrivals: list[float] = field(default_factory=list)
    finished: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clock(self) -> float:
        now = time.time()
        with self.lock:
            self.arrivals.append(now)
        return now

    def dump(self, path: Path) -> None:
        with self.lock:
            path.write_text(json.dumps({"arrivals": self.arrivals, "finished": self.finished}))

    @classmethod
    def load(cls, path: Path) -> Timeline:
        data = json.loads(path.read_text())
        return cls(list(data["arrivals"]), [(t, str(status)) for t, status in data["finished"]])

    def _cut(self, since: float | None, until: float | None) -> tuple[list[float], list[tuple[float, str]]]:
        low, high = -math.inf if since is None else since, math.inf if until is None else until
        with self.lock:
            arrivals = sorted(t for t in self.arrivals if low <= t <= high)
            finished = sorted((t, status) for t, status in self.finished if low <= t <= high)
        return arrivals, finished

    def summary(self, latency: float, *, since: float | None = None, until: float | None = None) -> dict[str, Any]:
        """First arrival, last answer and the span between them (answer times estimated when not hooked),
        and the most arrivals in any 10 s, for the requests that arrived between `since` and `until`."""
        arrivals, finished = self._cut(since, until)
        if not arrivals:
            return {"requests_seen": 0}
        last_answer = finished[-1][0] if finished else arrivals[-1] + latency
        ok_arrivals = [t for t, status in finished if status == "200"]
        span = arrivals[-1] - arrivals[0]
        return {
            "requests_seen": len(arrivals),
            "mean_interval_s": span / (len(arrivals) - 1) if len(arrivals) > 1 else None,
            "first_request": arrivals[0],
            "last_request": arrivals[-1],
            "last_answer": last_answer,
            "answer_times_hooked": bool(finished),
            "elapsed_s": last_answer - arrivals[0],
            "last_success_answer": ok_arrivals[-1] if ok_arrivals else None,
            "max_in_any_10s": max_in_window(arrivals, 10.0),
            "statuses": dict(sorted(Counter(status for _, status in finished).items())),
        }


def max_in_window(times: list[float], seconds: float) -> int:
    """The most of `times` (sorted) inside any half-open window [t, t + seconds)."""
    return max((bisect.bisect_left(times, t + seconds) - i for i, t in enumerate(times)), default=0)


class RecordingEmulator:
    """The emulator in this process, with a timeline of request arrivals and answers."""

    def __init__(
        self,
        *,
        keys: dict[str, Any],
        rpm: int,
        latency: float,
        latency_jitter: float = 0.0,
        port: int = 0,
        seed: int = 0,
        cached_answer: bool = False,
    ) -> None:
        from normals_pipeline.emulator import Emulator, EmulatorConfig, Faults

        self.timeline = Timeline()
        self.latency = latency
        self.rpm = rpm
        config = EmulatorConfig(
            port=port,
            keys={key: None if credits is None else Decimal(credits) for key, credits in keys.items()},
            rpm=rpm,
            latency=latency,
            latency_jitter=latency_jitter,
            faults=Faults(seed=seed),  # no faults; the seed drives the latency jitter
            clock=self.timeline.clock,
            cached_answer=cached_answer,
        )
        self._emulator = Emulator(config)

    def __enter__(self) -> RecordingEmulator:
        self._emulator.start()
        service = getattr(self._emulator, "_service", None)  # private: only to time answers; optional
        original_end = getattr(service, "end", None)
        if original_end is not None:
            timeline = self.timeline

            def end(status: str) -> None:
                original_end(status)
                with timeline.lock:
                    timeline.finished.append((time.time(), status))

            service.end = end  # type: ignore[union-attr]
        return self

    def __exit__(self, *exc: object) -> None:
        self._emulator.stop()

    @property
    def url(self) -> str:
        return self._emulator.url

    def stats(self) -> dict[str, Any]:
        return self._emulator.stats()


class EmulatorProcess:
    """The emulator in its own process, so its CPU and memory are not the client's (nor its GIL).

    It runs `python -m bench._emulator`: a `RecordingEmulator`, which
    with `record` writes its `Timeline` there when it stops; it is then in `self.timeline`.
    """

    def __init__(
        self,
        *,
        keys: dict[str, int | None],
        rpm: int,
        latency: float,
        log: Path,
        latency_jitter: float = 0.0,
        record: Path | None = None,
        port: int = 0,
        cached_answer: bool = False,
    ) -> None:
        self.command = [sys.executable, "-m", "bench._emulator", "--port", str(port), "--rpm", str(rpm)]
        self.command += ["--latency", str(latency)] + (["--cached-answer"] if cached_answer else [])
        if record:
            self.command += ["--timeline", str(record)]
        if latency_jitter:
            self.command += ["--latency-jitter", str(latency_jitter)]
        for key, credits in keys.items():
            self.command += ["--api-key", f"{key}:{'unlimited' if credits is None else credits}"]
        self.log = log
        self.record = record
        self.url = ""
        self.rusage: Any = None
        self.timeline: Timeline | None = None

    def __enter__(self) -> EmulatorProcess:
        self._stderr = open(self.log, "w")  # noqa: SIM115 - closed in __exit__
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env, cwd=ROOT
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]  # the URL comes first
        if not line.startswith("http"):
            self.__exit__()
            raise RuntimeError(f"emulator did not start: {line!r}; see {self.log}")
        self.url = line.split()[0]
        return self

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_emulator/stats", timeout=30) as response:
            return json.loads(response.read())

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, status, self.rusage = os.wait4(self.proc.pid, 0)
            self.proc.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            pass
        if self.proc.stdout:
            self.proc.stdout.close()
        self._stderr.close()
        if self.record is not None and self.record.exists():
            self.timeline = Timeline.load(self.record)


# -- runs -----------------------------------------------------------------------------------------


@dataclass
class CliRun:
    """One `normals-pipeline run` subprocess; stdout/stderr go to files (a full pipe would block it).

    `concurrency` and `shards` None (the default) pass neither option: the run has the CLI's default
    shape (NORMALS_SHARDS unset, so 16 shards in one Dagster run) and in-flight window (it follows the
    key's rate), as a user's `normals-pipeline run` does. `dataset` and `output` may be `s3://` URIs; the
    run's logs and state folder are then under `logdir`, and `env` says where S3 is.
    """

    dataset: Path | str
    output: Path | str
    url: str
    key: str
    rpm: int
    concurrency: int | None = None
    shards: int | None = None
    logdir: Path | None = None
    options: tuple[str, ...] = ()  # more options of `run`, e.g. ("--no-training-pairs",)
    env: dict[str, str] = field(default_factory=dict)
    name: str | None = None  # of its log files (default: the output's name); several runs on one output differ
    program: tuple[str, ...] = tuple(CLI)  # the command before `run` (UNGUARDED: figure 6's price of the guarantees)
    started: float = 0.0
    wall_s: float = 0.0
    returncode: int | None = None
    maxrss_kib: int = 0
    cpu_s: float = 0.0
    stdout_tail: str = ""
    shards_used: int | None = None  # from the run's first line
    images: int | None = None  # from its last "done in" line
    enriched: int | None = None

    def command(self) -> list[str]:
        command = [
            *self.program, "run", "--dataset", str(self.dataset), "--output", str(self.output), "--api-url", self.url,
            "--rpm", str(self.rpm),
        ]  # fmt: skip
        if self.shards is not None:
            command += ["--shards", str(self.shards)]
        if self.concurrency is not None:
            command += ["--concurrency", str(self.concurrency)]
        return command + list(self.options)

    def start(self) -> CliRun:
        # Shared rate/credit state (SQLite files) next to the data, not in the user's cache: every run of
        # one figure shares it, as runs of one user would share theirs.
        output = Path(urllib.parse.urlsplit(str(self.output)).path) if "://" in str(self.output) else Path(self.output)
        logdir, name = self.logdir or output.parent, self.name or output.name
        state = logdir / "state" if "://" in str(self.output) else output.parent / "state"
        env = client_env(CLIPDROP_API_KEY=self.key, NORMALS_STATE_DIR=str(state), **self.env)
        self._out_path, self._err_path = logdir / f"{name}.out", logdir / f"{name}.err"
        self._usage_path = logdir / f"{name}.usage.json"
        with open(self._out_path, "w") as out, open(self._err_path, "w") as err:
            self.started = time.monotonic()
            self.started_at = time.time()  # to cut this run out of an emulator's timeline
            self._proc = subprocess.Popen([*CHILD, str(self._usage_path), *self.command()], stdout=out, stderr=err,
                                          env=env)  # fmt: skip
        return self

    def wait(self) -> CliRun:
        self._proc.wait()
        self.wall_s = time.monotonic() - self.started
        self.ended_at = time.time()
        usage = json.loads(self._usage_path.read_text())
        self.returncode = usage["returncode"]
        self.maxrss_kib = usage["maxrss_kib"]  # Linux: KiB, the run's own peak (see _child.py)
        self.cpu_s = usage["cpu_s"]
        output = self._out_path.read_text(errors="replace")
        text = output.strip().splitlines()
        errors = self._err_path.read_text(errors="replace").strip().splitlines()
        self.stdout_tail = "\n".join(text[-3:] + ([f"stderr: {errors[-1]}"] if self.returncode and errors else []))
        if match := re.search(r"\((\d+) shards,", output):
            self.shards_used = int(match.group(1))
        if matches := re.findall(r"done in [\d.]+ s: (\d+) images, (\d+) enriched", output):
            self.images, self.enriched = map(int, matches[-1])
        return self

    def raw(self) -> dict[str, Any]:
        return {
            "command_options": {"shards": self.shards, "concurrency": self.concurrency, "rpm": self.rpm},
            "shards_used": self.shards_used,
            "returncode": self.returncode,
            "wall_s": round(self.wall_s, 3),
            "maxrss_kib": self.maxrss_kib,
            "cpu_s": round(self.cpu_s, 3),
            "images": self.images,
            "enriched": self.enriched,
            "output_tail": self.stdout_tail,
        }


def naive_client(url: str, key: str, paths: list[Path], output: Path) -> dict[str, Any]:
    """The API document's Python example in a loop: one image after the other, raise_for_status."""
    import requests

    output.mkdir(parents=True, exist_ok=True)
    ok = 0
    started = time.monotonic()
    for path in paths:
        with open(path, "rb") as image_file_object:
            r = requests.post(
                url + API_PATH,
                files={"image_file": ("portrait.jpg", image_file_object, "image/jpeg")},
                headers={"x-api-key": key},
            )
        if r.ok:
            (output / f"{path.stem}.jpg").write_bytes(r.content)
            ok += 1
        else:
            r.raise_for_status()
    return {"images": len(paths), "ok": ok, "wall_s": time.monotonic() - started}


def bare_httpx_loop(url: str, key: str, dataset: Path, output: Path, threads: int = 16) -> dict[str, Any]:
    """`_bare.py` as a subprocess (a bare httpx loop over every file of `dataset`); its summary, and
    `wall_s` from its start to its exit, start-up included, as a `CliRun`'s."""
    started_at, started = time.time(), time.monotonic()
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_bare.py")), url, key, str(dataset), str(output), str(threads)],
        capture_output=True,
        text=True,
        env=client_env(),
    )
    wall = time.monotonic() - started
    if done.returncode:
        raise RuntimeError(f"the bare loop failed: {done.stderr.strip()[-500:]}")
    return {**json.loads(done.stdout), "wall_s": wall, "process_started_at": started_at}
