"""The shared state failing mid-run: a Redis server of the test's own, killed while answers are in flight.
Every answer that arrived is kept (its map stored, its row with its cost), the run stops with one line, and
a re-run with a fresh Redis charges nothing again."""

import os
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import pyarrow.dataset as ds

from normals_pipeline import manifest
from normals_pipeline.enrich import normal_map_path
from normals_pipeline.storage import LocalStorage
from normals_pipeline.synthetic import make_portraits

IMAGES = 40
CLI = str(Path(sys.executable).with_name("normals-pipeline"))


def run(dataset: Path, output: Path, api_url: str, redis_url: str) -> subprocess.CompletedProcess:
    """The CLI in its own process, as a user runs it: what it prints when the state dies is all it prints."""
    args = ["run", "--dataset", str(dataset), "--output", str(output), "--api-url", api_url, "--rpm", "100000"]
    args += ["--shards", "1", "--concurrency", "8", "--redis-url", redis_url]
    env = {**os.environ, "CLIPDROP_API_KEY": "test-key"}
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=120)


def kept_rows(output: Path):
    """The shard's rows as the next run finds them: its manifest with the journal folded in."""
    storage = LocalStorage(output)
    return manifest.load_shard(storage, manifest.Journal(storage, "00"), "00", set_aside=False).previous


def kill_when_charged(emulator, server: subprocess.Popen, charged: int) -> None:
    """SIGKILL the state's server once the API has charged `charged` images: others are in flight then."""
    deadline = time.monotonic() + 60
    while Decimal(emulator.stats()["charged"]) < charged and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()


def test_redis_killed_mid_run_stops_it_and_keeps_every_answer_that_arrived(tmp_path, emulator_factory, redis_server):
    emulator = emulator_factory(latency=0.5)  # 8 workers: several answers on their way when Redis dies
    make_portraits(tmp_path / "in", IMAGES)
    output = tmp_path / "out"
    url, server = redis_server()
    killer = threading.Thread(target=kill_when_charged, args=(emulator, server, 8))
    killer.start()
    stopped = run(tmp_path / "in", output, emulator.url, url)  # within its timeout: no hang on the dead server
    killer.join()

    assert stopped.returncode == 1
    err = stopped.stderr.strip().splitlines()
    assert len(err) == 1 and "the shared state (rate, credits, claims) failed (ConnectionError" in err[0], err
    first = emulator.stats()
    assert first["in_flight"] == 0 and 8 <= Decimal(first["charged"]) < IMAGES
    table = kept_rows(output)
    paid = table[table["credits_consumed"] > 0]
    assert set(paid["content_hash"]) == set(first["charged_by_content"])  # every answer the API charged has its row
    assert Decimal(str(table["credits_consumed"].sum())) == Decimal(first["charged"])
    out, spool = LocalStorage(output), manifest.spool_for(LocalStorage(output))
    assert all(
        out.exists(normal_map_path(digest)) or spool.exists(normal_map_path(digest)) for digest in paid["content_hash"]
    )

    fresh, _ = redis_server(int(url.rsplit(":", 1)[1].split("/")[0]))  # restarted where it was, empty
    assert run(tmp_path / "in", output, emulator.url, fresh).returncode == 0
    stats = emulator.stats()
    assert stats["requests"] - first["requests"] == IMAGES - len(first["charged_by_content"])
    assert stats["charged_twice"] == 0 and len(stats["charged_by_content"]) == IMAGES
    table = ds.dataset(str(output / "manifest"), partitioning="hive").to_table().to_pandas()
    assert len(table) == IMAGES and table["error_code"].isna().all()
    assert Decimal(str(table["credits_consumed"].sum())) == Decimal(stats["charged"])
