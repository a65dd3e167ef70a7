"""A UI backfill across the cluster's Celery workers (deploy/), as the UI launches it, at the key's rate.

    python -m bench.cluster [--images 2400] [--rpm 600] [--kill-at 0.4] [--shards-per-run N]

`deploy/cluster.sh up` runs in a work folder with a database of its own (three workers, webserver, daemon),
against the bench's recording emulator in its strict sliding window (0.8 s ± 0.2 s, no Retry-After) instead of
the cluster's own, on `normals-pipeline portraits` images. The inventory is refreshed (its step on a worker),
then the webserver gets `launchPartitionBackfill` of every `surface_normals` shard, the UI's "Materialize
all". Per worker, from the instance's event log: the steps it started (the Celery executor's "Celery
worker" engine event) and the rows its steps wrote (`processed_this_run` of each materialization after it).

`--kill-at F`: once F of the images are charged, the whole process group of a worker running a step gets
SIGKILL (a lost host); the backfill must still complete with one row per image, charged ≤ images + the
requests in flight at that moment. Results: bench/results/<date>-cluster[-kill].json.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
from dagster import DagsterInstance
from dagster._core.storage.dagster_run import RunsFilter
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from ._support import ROOT, EmulatorProcess, client_env, fresh_key, write_result
from .backfill import BIN, LAUNCH, STATUS, free_port, graphql, http_json, manifest_totals, runs_of, wait_for
from .throughput import rate_figure

CLUSTER = ROOT / "deploy" / "cluster.sh"
PG_SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"
TARGET = 0.95
DONE = ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED")


def _engine_worker(event: Any) -> str | None:
    if not event.dagster_event or event.dagster_event.event_type_value != "ENGINE_EVENT":
        return None
    entry = event.dagster_event.engine_event_data.metadata.get("Celery worker")
    return entry.value if entry is not None else None


def participation(instance: Any, run_ids: list[str]) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Per worker: steps started there, shards materialized and rows written by those steps (a
    materialization belongs to the worker of the run's latest step start before it: a redelivered step
    starts again on another worker). Per run: its shards, workers, and where its time went."""
    workers: dict[str, Counter] = defaultdict(Counter)
    runs = []
    for record in sorted(instance.get_run_records(RunsFilter(run_ids=run_ids)), key=lambda r: r.create_timestamp):
        current, step_starts, step_end = None, [], None
        for event in instance.all_logs(record.dagster_run.run_id):
            if (worker := _engine_worker(event)) is not None:
                current = worker
                workers[worker]["steps"] += 1
                step_starts.append((worker, event.timestamp))
            elif event.dagster_event and event.dagster_event.event_type_value == "STEP_SUCCESS":
                step_end = event.timestamp
            elif event.dagster_event and event.dagster_event.is_step_materialization and current:
                metadata = event.dagster_event.step_materialization_data.materialization.metadata
                if "processed_this_run" in metadata:
                    workers[current]["shards"] += 1
                    workers[current]["rows_written"] += int(metadata["processed_this_run"].value)
        tags, created, started = record.dagster_run.tags, record.create_timestamp.timestamp(), record.start_time
        runs.append({
            "shards": f"{tags.get(ASSET_PARTITION_RANGE_START_TAG)}-{tags.get(ASSET_PARTITION_RANGE_END_TAG)}",
            "status": record.dagster_run.status.value,
            "workers": [worker for worker, _ in step_starts],
            "queued_s": round(started - created, 1) if started else None,  # waiting in the queue for a slot
            "start_to_step_s": round(step_starts[0][1] - started, 1) if step_starts and started else None,
            "step_s": round(step_end - step_starts[-1][1], 1) if step_end and step_starts else None,
        })  # fmt: skip
    return {worker: dict(counts) for worker, counts in sorted(workers.items())}, runs


def busy_worker(instance: Any, run_ids: list[str]) -> str | None:
    """A worker whose latest step has started and not ended (no STEP_SUCCESS/FAILURE after it)."""
    for run_id in run_ids:
        current = None
        for record in instance.all_logs(run_id):
            if (worker := _engine_worker(record)) is not None:
                current = worker
            elif record.dagster_event and record.dagster_event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
                current = None
        if current:
            return current
    return None


def host_usage(leader: int) -> dict[str, float]:
    """CPU seconds of every live process in a process group (a worker "host"), reaped children included, and
    the largest peak RSS among them (the Celery pool process that ran the steps)."""
    ticks, peak_kib = 0, 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != leader:  # pgrp
                continue
            ticks += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
            status = (proc / "status").read_text()
        except OSError:
            continue
        peak_kib = max([peak_kib] + [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")])
    return {"cpu_s": round(ticks / os.sysconf("SC_CLK_TCK"), 1), "peak_rss_mb": round(peak_kib / 1024)}


def _database(name: str, action: str) -> None:
    import psycopg2

    connection = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=5)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f'{action} DATABASE "{name}"' + (" WITH (FORCE)" if action == "DROP" else ""))
    connection.close()


def run(images: int, rpm: int, kill_at: float | None, shards_per_run: int | None, latency: float = 0.8) -> dict:
    work = Path(tempfile.mkdtemp(prefix="normals-cluster-"))
    subprocess.run([str(BIN / "normals-pipeline"), "portraits", str(work / "dataset"), "--count", str(images)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    database = f"normals_bench_{uuid.uuid4().hex[:10]}"
    _database(database, "CREATE")
    key, ui_port = fresh_key("cluster"), free_port()
    emulator = EmulatorProcess(keys={key: None}, rpm=rpm, latency=latency, latency_jitter=0.2,
                               log=work / "emulator.log", record=work / "timeline.json")  # fmt: skip
    load_before = os.getloadavg()
    killed: dict[str, Any] = {}
    with emulator:  # stopped last: it writes its timeline when it stops
        env = client_env(
            NORMALS_CLUSTER_RUN=str(work / "run"),
            NORMALS_CLUSTER_UI_PORT=str(ui_port),
            DAGSTER_PG_URL=f"{PG_SERVER}/{database}",
            NORMALS_DATASET=str(work / "dataset"),
            NORMALS_OUTPUT=str(work / "output"),
            CLIPDROP_API_URL=emulator.url,
            CLIPDROP_API_KEY=key,
            CLIPDROP_RPM=str(rpm),
            **({"NORMALS_SHARDS_PER_RUN": str(shards_per_run)} if shards_per_run else {}),
        )
        os.environ.update(DAGSTER_HOME=str(work / "run" / "home"), DAGSTER_PG_URL=env["DAGSTER_PG_URL"])
        stats_url = f"{emulator.url}/_emulator/stats"
        try:
            subprocess.run([str(CLUSTER), "up"], env=env, check=True, timeout=300)
            subprocess.run([str(BIN / "dagster"), "job", "execute", "-f", str(ROOT / "deploy" / "definitions.py"),
                            "-j", "refresh_inventory"], env=env, check=True, timeout=300,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            params = {"assetSelection": [{"path": ["surface_normals"]}], "allPartitions": True, "title": "cluster"}
            launched = graphql(ui_port, LAUNCH, {"params": params})["launchPartitionBackfill"]
            if launched["__typename"] != "LaunchBackfillSuccess":
                raise RuntimeError(f"backfill not launched: {launched}")
            backfill_tag = [{"key": "dagster/backfill", "value": launched["backfillId"]}]
            started = time.monotonic()
            first = wait_for(lambda: http_json(stats_url)["requests"] > 0 and time.monotonic(), 600, "a request")
            instance = DagsterInstance.get()

            def backfill_runs() -> list[str]:
                return [
                    r.run_id for r in instance.get_runs(RunsFilter(tags={"dagster/backfill": launched["backfillId"]}))
                ]

            if kill_at is not None:
                wait_for(lambda: int(http_json(stats_url)["charged"]) >= kill_at * images, 3600, "the kill point", 0.2)
                victim = wait_for(lambda: busy_worker(instance, backfill_runs()), 60, "a busy worker", 0.2)
                name = victim.split("@")[0]
                before = http_json(stats_url)
                os.killpg(int((work / "run" / "pids" / name).read_text()), signal.SIGKILL)
                killed = {"worker": victim, "at_charged": before["charged"], "in_flight_at_kill": before["in_flight"],
                          "seconds_after_first_request": round(time.monotonic() - first, 1)}  # fmt: skip

            def finished() -> str | None:
                status = graphql(ui_port, STATUS, {"id": launched["backfillId"]})["partitionBackfillOrError"]["status"]
                return status if status in DONE else None

            status = wait_for(finished, 3600, "the backfill to complete", 2)
            stats = http_json(stats_url)
            runs = runs_of(ui_port, backfill_tag)
            workers, per_run = participation(instance, backfill_runs())
            rows, recorded = manifest_totals(work / "output")
            paths = ds.dataset(str(work / "output" / "manifest"), partitioning="hive").to_table(columns=["path"])
            distinct_paths = len(set(paths["path"].to_pylist()))
            for pid in (work / "run" / "pids").glob("worker-*"):  # a killed host's CPU went with it
                host = next((w for w in workers if w.startswith(f"{pid.name}@")), None)
                if host is not None and host != killed.get("worker"):
                    workers[host].update(host_usage(int(pid.read_text())))
            instance.dispose()
        finally:
            subprocess.run([str(CLUSTER), "down"], env=env, timeout=300)
    load_after = os.getloadavg()
    _database(database, "DROP")
    timeline = emulator.timeline.summary(latency) if emulator.timeline else {}
    figure = rate_figure(stats, timeline, rpm)
    charged = float(stats["charged"])
    every_worker = len([w for w in workers.values() if w.get("steps")]) >= 3
    passed = (
        status == "COMPLETED_SUCCESS"
        and every_worker
        and figure["status_429"] == 0
        and rows == distinct_paths == images
        and (figure["ratio"] >= TARGET and charged == images if kill_at is None
             else charged <= images + killed["in_flight_at_kill"])
    )  # fmt: skip
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "images": images,
        "image_source": "normals-pipeline portraits (384-640 x 448-768 px, JPEG/PNG/WEBP)",
        "rpm": rpm,
        "latency_s": latency,
        "latency_jitter_s": 0.2,
        "shards": 16,
        "shards_per_run": shards_per_run or "deploy default",
        "backfill_status": status,
        "dagster_runs": runs["count"],
        "dagster_run_statuses": runs["statuses"],
        "workers": workers,
        "runs": per_run,
        "killed": killed or None,
        "seconds_to_first_request": round(first - started, 1),
        "seconds_sending": round(figure["elapsed_s"], 1),
        "successes": figure["successes"],
        "http_429": figure["status_429"],
        "max_in_any_60s": figure["max_in_any_60s"],
        "concurrent_max": figure["concurrent_max"],
        "rate_over_limit": round(figure["ratio"], 3),
        "target": TARGET,
        "charged": charged,
        "charged_twice": stats["charged_twice"],
        "manifest_rows": rows,
        "manifest_distinct_paths": distinct_paths,
        "manifest_credits": recorded,
        "passed": passed,
        "emulator_cpu_s": round(emulator.rusage.ru_utime + emulator.rusage.ru_stime, 1) if emulator.rusage else None,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(),
        "workdir": str(work),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--kill-at", type=float, default=None, help="SIGKILL a busy worker at this share charged")
    parser.add_argument("--shards-per-run", type=int, default=None, help="default: deploy/cluster.sh's")
    args = parser.parse_args()
    result = run(args.images, args.rpm, args.kill_at, args.shards_per_run)
    suffix = ("-kill" if args.kill_at is not None else "") + (
        f"-{args.shards_per_run}-per-run" if args.shards_per_run else ""
    )
    out = write_result(result, f"cluster{suffix}")
    print(f"{'pass' if result['passed'] else 'FAIL'}; written to {out}")


if __name__ == "__main__":
    main()
