"""A UI backfill of 100 shards, as the Dagster UI launches it, against the emulator at the key's rate.

`dagster dev` (webserver + daemon) runs on loopback with the repository's `dagster.yaml`; the backfill
is launched through the same GraphQL mutation the UI uses ("Materialize all" on `surface_normals`), so
each shard is its own run process and only the shared rate guard keeps them together under the limit.

    python -m bench.backfill [--images 240] [--rpm 60] [--latency 0.8] [--shards 100] [--duplicates 0]

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
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
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


def run(images: int, rpm: int, latency: float, shards: int, duplicates: int = 0) -> dict:
    work = Path(tempfile.mkdtemp(prefix="normals-backfill-"))
    make_dataset(work / "dataset", images, duplicates)
    home = work / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    api_port, ui_port = free_port(), free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "NORMALS_DATASET": str(work / "dataset"),
        "NORMALS_OUTPUT": str(work / "output"),
        "NORMALS_SHARDS": str(shards),
        "NORMALS_STATE_DIR": str(work / "state"),
        "CLIPDROP_API_URL": f"http://127.0.0.1:{api_port}",
        "CLIPDROP_API_KEY": KEY,
        "CLIPDROP_RPM": str(rpm),
    }
    emulator_args = ["emulator", "--port", str(api_port), "--rpm", str(rpm), "--latency", str(latency)]
    emulator = subprocess.Popen(
        [str(BIN / "normals-pipeline"), *emulator_args, "--api-key", f"{KEY}:1000000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dev = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(ui_port)],
        cwd=ROOT,
        env=env,
        stdout=open(work / "dagster-dev.log", "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stats_url = f"http://127.0.0.1:{api_port}/_emulator/stats"
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
        last = wait_for(
            lambda: int(http_json(stats_url)["charged"]) >= images and time.monotonic(), 60 * images, "every image", 0.2
        )
        def finished() -> str | None:
            status = graphql(ui_port, STATUS, {"id": launched["backfillId"]})["partitionBackfillOrError"]["status"]
            return status if status in ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED") else None

        status = wait_for(finished, 600, "the backfill to complete")
        stats = http_json(stats_url)
        rows, recorded = manifest_totals(work / "output")
    finally:
        os.killpg(dev.pid, signal.SIGTERM)
        emulator.terminate()
        dev.wait(timeout=60)
        emulator.wait(timeout=10)
    key_stats = next(iter(stats["keys"].values()))
    sending = last - first
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "images": images,
        "shards": shards,
        "rpm": rpm,
        "latency_s": latency,
        "backfill_status": status,
        "seconds_to_first_request": round(first - started, 1),
        "seconds_sending": round(sending, 1),
        "successes": stats["by_status"].get("200", 0),
        "http_429": stats["by_status"].get("429", 0),
        "max_in_any_60s": stats["max_in_any_60s"],
        "rate_over_limit": round(images / sending / (rpm / 60), 3) if sending else None,
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
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--duplicates", type=int, default=0)
    args = parser.parse_args()
    result = run(args.images, args.rpm, args.latency, args.shards, args.duplicates)
    suffix = "-duplicates" if args.duplicates else ""
    out = ROOT / "bench" / "results" / f"{result['date'][:10]}-backfill{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
