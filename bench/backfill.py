"""A UI backfill of 100 shards, as the Dagster UI launches it, against the emulator at the key's rate.

`dagster dev` (webserver + daemon) runs on loopback with the repository's `dagster.yaml`; the backfill
is launched through the same GraphQL mutation the UI uses ("Materialize all" on `surface_normals`). The
asset's backfill policy decides how many run processes that makes (a handful: several shards per run);
only the shared rate guard keeps them together under the limit.

    python -m bench.backfill [--images 240] [--rpm 60] [--latency 0.8] [--latency-jitter 0.2] [--shards 100]
                             [--duplicates 0]

The emulator is strict (sliding window, no Retry-After). The figure is successes per second ÷ the limit
over the sending period (the emulator's first request to its last answer, on its own clock), target
>= 0.95 with 0 × 429; the result also counts the runs Dagster created for the backfill.

`--duplicates N` also writes N more files, each a copy of an image's bytes under another name (so
mostly in another shard, run by another process at the same time): each distinct content must still
be charged once, and the manifest must hold one row per file and add up to the bill.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image, ImageDraw

from ._support import ROOT, EmulatorProcess, client_env, write_result
from .throughput import rate_figure

BIN = Path(sys.executable).parent
KEY = "bench-backfill-key"
LAUNCH = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""
STATUS = "query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } } }"
RUNS = """
query($tags: [ExecutionTag!]) {
  runsOrError(filter: {tags: $tags}) {
    __typename
    ... on Runs { count results { runId status } }
    ... on PythonError { message }
  }
}"""
TARGET = 0.95


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_dataset(folder: Path, count: int, duplicates: int = 0) -> None:
    """Small portraits whose bytes all differ (the pipeline sends identical bytes once), plus
    `duplicates` copies of the first ones under other names."""
    folder.mkdir(parents=True)
    for index in range(count):
        image = Image.new("RGB", (160, 200), (200 - index % 50, 210, 220))
        ImageDraw.Draw(image).ellipse((40, 30 + index % 20, 120, 130), fill=(230, 180, 150))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90, comment=f"bench {index}".encode())
        (folder / f"img_{index:05d}.jpg").write_bytes(buffer.getvalue())
    for index in range(duplicates):
        shutil.copy(folder / f"img_{index % count:05d}.jpg", folder / f"copy_{index:05d}.jpg")


def manifest_totals(output: Path) -> tuple[int, float]:
    import pyarrow.dataset as ds

    table = ds.dataset(str(output / "manifest"), partitioning="hive").to_table(columns=["credits_consumed"])
    return table.num_rows, float(sum(value or 0 for value in table["credits_consumed"].to_pylist()))


def http_json(url: str, payload: dict | None = None, timeout: float = 30) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def graphql(port: int, query: str, variables: dict) -> dict:
    return http_json(f"http://127.0.0.1:{port}/graphql", {"query": query, "variables": variables})["data"]


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := predicate():
                return result
        except OSError:
            pass
        time.sleep(every)
    raise TimeoutError(f"timed out waiting for {what}")


def runs_of(port: int, tags: list[dict] | None = None) -> dict:
    """The runs in the instance (with `tags`: those carrying them), as the UI's run list shows them."""
    found = graphql(port, RUNS, {"tags": tags})["runsOrError"]
    if found["__typename"] != "Runs":
        raise RuntimeError(f"runs not listed: {found}")
    return {"count": found["count"], "statuses": dict(Counter(run["status"] for run in found["results"]))}


def _backfill(work: Path, env: dict, ui_port: int, stats_url: str, images: int) -> tuple:
    """Start `dagster dev`, materialize the inventory, launch the backfill, wait for it; stop `dagster dev`."""
    dev = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(ui_port)],
        cwd=ROOT,
        env=env,
        stdout=open(work / "dagster-dev.log", "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: http_json(stats_url), 30, "the emulator")
        wait_for(lambda: graphql(ui_port, "{ version }", {}), 180, "the Dagster webserver")
        inventory = subprocess.run(
            [str(BIN / "dagster"), "job", "execute", "-f", "definitions.py", "-j", "refresh_inventory"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=300,
        )
        if inventory.returncode:
            raise RuntimeError(inventory.stderr.decode()[-2000:])
        params = {"assetSelection": [{"path": ["surface_normals"]}], "allPartitions": True, "title": "bench"}
        launched = graphql(ui_port, LAUNCH, {"params": params})["launchPartitionBackfill"]
        if launched["__typename"] != "LaunchBackfillSuccess":
            raise RuntimeError(f"backfill not launched: {launched}")
        started = time.monotonic()
        first = wait_for(lambda: http_json(stats_url)["requests"] > 0 and time.monotonic(), 600, "the first request")
        wait_for(lambda: int(http_json(stats_url)["charged"]) >= images, 60 * images, "every image", 0.2)

        def finished() -> str | None:
            status = graphql(ui_port, STATUS, {"id": launched["backfillId"]})["partitionBackfillOrError"]["status"]
            return status if status in ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED") else None

        status = wait_for(finished, 600, "the backfill to complete")
        stats = http_json(stats_url)
        backfill_runs = runs_of(ui_port, [{"key": "dagster/backfill", "value": launched["backfillId"]}])
        all_runs = runs_of(ui_port)
        rows, recorded = manifest_totals(work / "output")
    finally:
        os.killpg(dev.pid, signal.SIGTERM)
        dev.wait(timeout=60)
    return stats, status, first, started, backfill_runs, all_runs, rows, recorded


def run(images: int, rpm: int, latency: float, shards: int, duplicates: int = 0, latency_jitter: float = 0.2) -> dict:
    work = Path(tempfile.mkdtemp(prefix="normals-backfill-"))
    make_dataset(work / "dataset", images, duplicates)
    home = work / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    ui_port = free_port()
    emulator = EmulatorProcess(
        keys={KEY: 1_000_000},
        rpm=rpm,
        latency=latency,
        latency_jitter=latency_jitter,
        log=work / "emulator.log",
        record=work / "timeline.json",
    )
    with emulator:  # stopped last: it writes its timeline when it stops
        env = client_env(
            DAGSTER_HOME=str(home),
            NORMALS_DATASET=str(work / "dataset"),
            NORMALS_OUTPUT=str(work / "output"),
            NORMALS_SHARDS=str(shards),
            NORMALS_STATE_DIR=str(work / "state"),
            CLIPDROP_API_URL=emulator.url,
            CLIPDROP_API_KEY=KEY,
            CLIPDROP_RPM=str(rpm),
        )
        stats, status, first, started, backfill_runs, all_runs, rows, recorded = _backfill(
            work, env, ui_port, f"{emulator.url}/_emulator/stats", images
        )
    if emulator.timeline is None:
        raise RuntimeError(f"the emulator wrote no timeline; see {work / 'emulator.log'}")
    timeline = emulator.timeline.summary(latency)
    figure = rate_figure(stats, timeline, rpm)
    key_stats = next(iter(stats["keys"].values()))
    passed = (
        status in ("COMPLETED", "COMPLETED_SUCCESS")
        and figure["ratio"] >= TARGET
        and figure["status_429"] == 0
        and figure["successes"] >= images
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "images": images,
        "shards": shards,
        "rpm": rpm,
        "latency_s": latency,
        "latency_jitter_s": latency_jitter,
        "backfill_status": status,
        "dagster_runs": backfill_runs["count"],  # the runs the backfill launched
        "dagster_run_statuses": backfill_runs["statuses"],
        "dagster_runs_in_instance": all_runs["count"],  # those plus the inventory job's run
        "seconds_to_first_request": round(first - started, 1),
        "seconds_sending": round(figure["elapsed_s"], 1),  # the emulator's first request to its last answer
        "successes": figure["successes"],
        "http_429": figure["status_429"],
        "max_in_any_60s": figure["max_in_any_60s"],
        "max_in_any_10s": figure["max_in_any_10s"],
        "burstiness": round(figure["burstiness"], 3),
        "rate_over_limit": round(figure["ratio"], 3),
        "paced_ratio": round(figure["paced_ratio"], 3) if figure["paced_ratio"] else None,
        "target": TARGET,
        "passed": passed,
        "charged": key_stats["charged"],
        "files": images + duplicates,
        "distinct_contents": images,
        "charged_twice": stats["charged_twice"],
        "manifest_rows": rows,
        "manifest_credits": recorded,
        "workdir": str(work),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--rpm", type=int, default=60)
    parser.add_argument("--latency", type=float, default=0.8)
    parser.add_argument("--latency-jitter", type=float, default=0.2, help="± seconds, uniform, on each answer")
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--duplicates", type=int, default=0)
    args = parser.parse_args()
    result = run(args.images, args.rpm, args.latency, args.shards, args.duplicates, args.latency_jitter)
    suffix = "-duplicates" if args.duplicates else ""
    out = write_result(result, f"backfill{suffix}")
    verdict = "pass" if result["passed"] else "FAIL"
    print(
        f"{result['shards']} shards in {result['dagster_runs']} Dagster runs: {result['rate_over_limit']} of the limit "
        f"over {result['seconds_sending']} s of sending (target >= {TARGET}), {result['http_429']} x 429: {verdict}"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
