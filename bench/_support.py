"""Helpers shared by the figures: test images, emulators (in-process and as a subprocess), CLI runs,
the naive client, and child-process resource accounting."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

API_PATH = "/portrait-surface-normals/v1"
CLI = [sys.executable, "-m", "normals_pipeline.cli"]
CHILD = [sys.executable, str(Path(__file__).with_name("_child.py"))]  # reports a child's own peak RSS and CPU


def fresh_key(figure: str) -> str:
    """A key nobody used before: a rate guard that persists across processes (or runs) starts empty."""
    return f"bench-{figure}-{uuid.uuid4().hex[:10]}"


# -- images ---------------------------------------------------------------------------------------


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
    """When requests arrived at and left the emulator, from its clock hook and its bookkeeping."""

    arrivals: list[float] = field(default_factory=list)
    finished: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clock(self) -> float:
        now = time.time()
        with self.lock:
            self.arrivals.append(now)
        return now

    def summary(self, latency: float) -> dict[str, Any]:
        """First arrival, last answer and the span between them (answer times estimated when not hooked)."""
        with self.lock:
            arrivals = sorted(self.arrivals)
            finished = sorted(self.finished)
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
        }


class RecordingEmulator:
    """The emulator in this process, with a timeline of request arrivals and answers."""

    def __init__(self, *, keys: dict[str, Any], rpm: int, latency: float) -> None:
        from normals_pipeline.emulator import Emulator, EmulatorConfig

        self.timeline = Timeline()
        self.latency = latency
        self.rpm = rpm
        self._emulator = Emulator(EmulatorConfig(keys=keys, rpm=rpm, latency=latency, clock=self.timeline.clock))

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
    """`normals-pipeline emulator` in its own process, so its CPU and memory are not the client's."""

    def __init__(self, *, keys: dict[str, int], rpm: int, latency: float, log: Path) -> None:
        self.command = [*CLI, "emulator", "--port", "0", "--rpm", str(rpm), "--latency", str(latency)]
        for key, credits in keys.items():
            self.command += ["--api-key", f"{key}:{credits}"]
        self.log = log
        self.url = ""
        self.rusage: Any = None

    def __enter__(self) -> EmulatorProcess:
        self._stderr = open(self.log, "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
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


# -- runs -----------------------------------------------------------------------------------------


@dataclass
class CliRun:
    """One `normals-pipeline run` subprocess; stdout/stderr go to files (a full pipe would block it)."""

    dataset: Path
    output: Path
    url: str
    key: str
    rpm: int
    concurrency: int
    shards: int = 1
    logdir: Path | None = None
    started: float = 0.0
    wall_s: float = 0.0
    returncode: int | None = None
    maxrss_kib: int = 0
    cpu_s: float = 0.0
    stdout_tail: str = ""

    def start(self) -> CliRun:
        env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}  # ephemeral Dagster instance
        env["CLIPDROP_API_KEY"] = self.key
        # Shared rate/credit state (SQLite files) next to the data, not in the user's cache: every run of
        # one figure shares it, as runs of one user would share theirs.
        env["NORMALS_STATE_DIR"] = str(self.output.parent / "state")
        command = [
            *CLI, "run", "--dataset", str(self.dataset), "--output", str(self.output), "--api-url", self.url,
            "--rpm", str(self.rpm), "--shards", str(self.shards), "--concurrency", str(self.concurrency),
        ]  # fmt: skip
        logdir = self.logdir or self.output.parent
        self._out_path, self._err_path = logdir / f"{self.output.name}.out", logdir / f"{self.output.name}.err"
        self._usage_path = logdir / f"{self.output.name}.usage.json"
        with open(self._out_path, "w") as out, open(self._err_path, "w") as err:
            self.started = time.monotonic()
            self._proc = subprocess.Popen([*CHILD, str(self._usage_path), *command], stdout=out, stderr=err, env=env)
        return self

    def wait(self) -> CliRun:
        self._proc.wait()
        self.wall_s = time.monotonic() - self.started
        usage = json.loads(self._usage_path.read_text())
        self.returncode = usage["returncode"]
        self.maxrss_kib = usage["maxrss_kib"]  # Linux: KiB, the run's own peak (see _child.py)
        self.cpu_s = usage["cpu_s"]
        text = self._out_path.read_text(errors="replace").strip().splitlines()
        errors = self._err_path.read_text(errors="replace").strip().splitlines()
        self.stdout_tail = "\n".join(text[-3:] + ([f"stderr: {errors[-1]}"] if self.returncode else []))
        return self

    def raw(self) -> dict[str, Any]:
        return {
            "returncode": self.returncode,
            "wall_s": round(self.wall_s, 3),
            "maxrss_kib": self.maxrss_kib,
            "cpu_s": round(self.cpu_s, 3),
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
