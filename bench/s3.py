"""Figure 9: the unthrottled run of figure 6 with dataset and output on S3 (a stand-in on loopback, `bench._s3`)
÷ the same run on local disk, with the S3 requests it made per image.

The stand-in answers from memory at once, so the figure measures what the pipeline asks of S3 (requests, their
client-side cost, connections), not S3's latency (figure 9b adds some): on real S3 each request costs 10–50 ms more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from ._support import ROOT, CliRun, EmulatorProcess, fresh_key, make_small_jpegs

BUCKET = "bench"
OPTIONS = ("--no-training-pairs",)  # the run the issue measured: maps and manifest only


class S3Process:
    """`python -m bench._s3` (an S3 stand-in counting requests: `MemoryS3`, or moto) in its own process."""

    def __init__(self, log: Path, latency: float = 0.0, moto: bool = False) -> None:
        self.log = log
        self.latency = latency
        self.options = ["--moto"] if moto else []
        self.url = ""

    def __enter__(self) -> S3Process:
        self._stderr = open(self.log, "w")  # noqa: SIM115 - closed in __exit__
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench._s3", "--latency", str(self.latency), *self.options],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
            cwd=ROOT,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]  # the URL comes first
        if not line.startswith("http"):
            self.__exit__()
            raise RuntimeError(f"the S3 stand-in did not start: {line!r}; see {self.log}")
        self.url = line.split()[0]
        return self

    def counts(self, reset: bool = False) -> dict[str, int]:
        """Requests served since the last reset, by verb and folder (see `bench._s3`)."""
        request = urllib.request.Request(
            f"{self.url}/_bench/{'reset' if reset else 'counts'}", method="POST" if reset else "GET"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def env(self) -> dict[str, str]:
        """What a process needs to reach this server and nothing else (fake keys, no profile, no metadata)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def cpu_s(self) -> float | None:
        """The server's CPU time so far (Linux: /proc), to show how much of the machine the stand-in took."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def client(self) -> Any:
        import boto3

        env = self.env()
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._stderr.close()


def s3_speed(cfg: Any, workdir: Path) -> dict[str, Any]:
    """Figure 9: images/s of `normals-pipeline run --no-training-pairs` (default shape, no rate limit, the
    cached-answer emulator of figure 6) with dataset and output on the S3 stand-in ÷ the same on local disk. Local and
    S3 runs alternate, `cfg.s3_repeats` of each, and the faster of each counts (the machine is shared)."""
    return _s3_versus_local(cfg, workdir, 0.0)


def s3_latency_speed(cfg: Any, workdir: Path) -> dict[str, Any]:
    """Figure 9b: figure 9 with every S3 request held `cfg.s3_latency_s` first, as a remote S3 answers: what
    the run's requests one after another (listing, records, manifests, previews) cost where each is a wait."""
    return _s3_versus_local(cfg, workdir, cfg.s3_latency_s)


def _s3_versus_local(cfg: Any, workdir: Path, latency: float) -> dict[str, Any]:
    count = cfg.overhead_images
    paths = make_small_jpegs(workdir / "dataset", count, seed=90, size=cfg.rate_image_size)
    key = fresh_key("s3")
    with (
        S3Process(workdir / "s3.log", latency, cfg.s3_moto) as s3,
        EmulatorProcess(
            keys={key: None}, rpm=1_000_000, latency=0.0, log=workdir / "emulator.log", cached_answer=True
        ) as emulator,
    ):
        client = s3.client()
        client.create_bucket(Bucket=BUCKET)
        for path in paths:
            client.put_object(Bucket=BUCKET, Key=f"dataset/{path.name}", Body=path.read_bytes())
        local_runs, s3_runs, requests, server_cpu = [], [], [], []
        for i in range(cfg.s3_repeats):
            local_runs.append(
                _run(workdir / "dataset", workdir / f"local-{i}", emulator.url, key, workdir).start().wait()
            )
            s3.counts(reset=True)
            before = s3.cpu_s()
            run = _run(f"s3://{BUCKET}/dataset", f"s3://{BUCKET}/output-{i}", emulator.url, key, workdir, s3.env())
            s3_runs.append(run.start().wait())
            after = s3.cpu_s()
            server_cpu.append(after - before if before is not None and after is not None else None)
            requests.append(s3.counts())
    local = min(local_runs, key=lambda run: run.wall_s)
    remote = min(s3_runs, key=lambda run: run.wall_s)
    local_rate, s3_rate = count / local.wall_s, count / remote.wall_s
    per_image = sum(requests[s3_runs.index(remote)].values()) / count
    complete = all(run.returncode == 0 and run.enriched == count for run in [*local_runs, *s3_runs])
    measured = s3_rate / local_rate
    return {
        "measured": measured,
        "passed": measured >= cfg.target_s3 and complete,
        "naive": None,
        "note": f"{count} imgs: S3 {s3_rate:.0f} img/s ({remote.wall_s:.1f} s) vs local {local_rate:.0f} img/s "
        f"({local.wall_s:.1f} s); {per_image:.2f} S3 requests/img" + ("" if complete else " (INCOMPLETE)"),
        "raw": {
            "images": count,
            "image_size": list(cfg.rate_image_size),
            "s3_latency_s": latency,
            "s3_stand_in": "moto" if cfg.s3_moto else "memory",
            "options": list(OPTIONS),
            "s3_images_per_s": [count / run.wall_s for run in s3_runs],
            "local_images_per_s": [count / run.wall_s for run in local_runs],
            "s3_requests_per_image": [sum(r.values()) / count for r in requests],
            "s3_requests": requests,
            # the stand-in's CPU during each S3 run: on this machine's cores, beside the run's own (real S3's is not)
            "s3_server_cpu_s": server_cpu,
            "s3_runs": [run.raw() for run in s3_runs],
            "local_runs": [run.raw() for run in local_runs],
        },
    }


def _run(
    dataset: Path | str, output: Path | str, url: str, key: str, logdir: Path, env: dict[str, str] | None = None
) -> CliRun:
    return CliRun(dataset, output, url, key, 10_000_000, logdir=logdir, options=OPTIONS, env=env or {})
