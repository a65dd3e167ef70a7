"""The output's owner (`normals_pipeline.ownership`): runs whose claims live in different states (two hosts, each
with its own NORMALS_STATE_DIR and no Redis) never enrich one output at once, on a local folder and on S3."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from normals_pipeline import ownership
from normals_pipeline._state import SQLiteClaims, StateIdentity
from normals_pipeline.client import ClipdropClient
from normals_pipeline.enrich import current_items, enrich_shard
from normals_pipeline.guards import RateGuard
from normals_pipeline.inventory import take_inventory
from normals_pipeline.ownership import OutputInUse, OutputTaken
from normals_pipeline.storage import LocalStorage, S3Storage, Storage
from normals_pipeline.synthetic import make_portraits

CLI = str(Path(sys.executable).with_name("normals-pipeline"))
REFUSAL = "keeps its claims elsewhere"


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "out")
    client = request.getfixturevalue("s3_client")
    return S3Storage(request.getfixturevalue("s3_bucket"), "out", client)


def test_a_run_of_another_state_is_refused_while_the_owners_lease_is_live(output, tmp_path):
    first = ownership.take(output, SQLiteClaims(tmp_path / "host-a"))
    try:
        with pytest.raises(OutputInUse) as refused:
            ownership.take(output, SQLiteClaims(tmp_path / "host-b"))
    finally:
        first.close()
    message = str(refused.value)
    assert output.uri in message and str(tmp_path / "host-a") in message and REFUSAL in message
    assert "NORMALS_REDIS_URL" in message and "NORMALS_STATE_DIR" in message and "\n" not in message


def test_processes_sharing_one_state_share_the_lease(output, tmp_path):
    heard: list[str] = []
    leases = [ownership.take(output, SQLiteClaims(tmp_path / "state"), heard.append) for _ in range(3)]
    for lease in leases:
        lease.close()
    assert [lease.generation for lease in leases] == [1, 1, 1] and heard == []


def test_a_lapsed_lease_of_another_state_is_taken_over_with_one_warning(output, tmp_path, monkeypatch):
    monkeypatch.setattr(ownership, "LEASE_TTL_S", 0.3)
    ownership.take(output, SQLiteClaims(tmp_path / "host-a")).close()
    time.sleep(0.4)
    heard: list[str] = []

    lease = ownership.take(output, SQLiteClaims(tmp_path / "host-b"), heard.append)
    lease.close()

    assert lease.generation == 2 and output.list_prefix(ownership.OWNER_DIR) == ["owner/lease-00000002.json"]
    assert len(heard) == 1 and str(tmp_path / "host-a") in heard[0] and "takes the output over" in heard[0]


def test_a_live_lease_of_a_store_reset_at_the_same_place_is_taken_over(output, tmp_path):
    """Redis restarted empty (or a state folder's id lost): the old id's claims are gone with it, so its lease
    holds nothing back; a store elsewhere is still refused."""
    first = ownership.take(output, SQLiteClaims(tmp_path / "host-a"))
    first.close()
    (tmp_path / "host-a" / "state-id").unlink()  # the same place, a new id
    heard: list[str] = []

    lease = ownership.take(output, SQLiteClaims(tmp_path / "host-a"), heard.append)
    lease.close()

    assert lease.generation == 2 and len(heard) == 1 and "or that state was reset" in heard[0]
    with pytest.raises(OutputInUse):
        ownership.take(output, SQLiteClaims(tmp_path / "host-b"))


def test_an_unreadable_lease_is_replaced_with_a_warning(output, tmp_path):
    output.write_bytes("owner/lease-00000007.json", b"{not json")
    heard: list[str] = []
    ownership.take(output, SQLiteClaims(tmp_path / "state"), heard.append).close()
    assert output.list_prefix(ownership.OWNER_DIR) == ["owner/lease-00000008.json"]
    assert heard == [f"{output.uri_for('owner/lease-00000007.json')} was unreadable: replaced by this run's lease"]


def test_of_states_racing_for_one_output_exactly_one_wins(output, tmp_path):
    states = [SQLiteClaims(tmp_path / f"host-{index}") for index in range(6)]
    start = threading.Barrier(len(states))
    won, refused = [], []

    def race(store: SQLiteClaims) -> None:
        start.wait()
        try:
            won.append(ownership.take(output, store))
        except OutputInUse:
            refused.append(store)

    threads = [threading.Thread(target=race, args=(store,)) for store in states]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for lease in won:
        lease.close()
    assert (len(won), len(refused)) == (1, 5)


def test_a_run_whose_lease_was_taken_over_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(ownership, "LEASE_TTL_S", 0.3)
    output = LocalStorage(tmp_path / "out")
    lease = ownership.take(output, SQLiteClaims(tmp_path / "host-a"))
    stopped = threading.Event()
    errors: list[Exception] = []
    lease.on_lost(lambda error: (errors.append(error), stopped.set()))
    # What another state does once this run's renewals have failed for a whole TTL: the next generation.
    output.create_if_absent(
        "owner/lease-00000002.json", ownership._record(SQLiteClaims(tmp_path / "host-b").identity(), time.time())
    )
    assert stopped.wait(15)
    lease.close()
    assert isinstance(errors[0], OutputTaken) and str(tmp_path / "host-b") in str(errors[0])


def test_a_lease_renewed_again_by_its_own_state_after_a_lapse_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(ownership, "LEASE_TTL_S", 0.3)
    output, state = LocalStorage(tmp_path / "out"), SQLiteClaims(tmp_path / "state")
    lease = ownership.take(output, state)
    errors: list[Exception] = []
    lease.on_lost(errors.append)
    output.create_if_absent("owner/lease-00000002.json", ownership._record(state.identity(), time.time()))
    deadline = time.monotonic() + 15
    while lease.generation != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    lease.close()
    assert lease.generation == 2 and errors == []


def enrich(folder: Path, output: Storage, url: str, state: Path, notify=lambda message: None):
    dataset = LocalStorage(folder)
    items = current_items(dataset, take_inventory(dataset, 1))
    with ClipdropClient("test-key", base_url=url, rate_guard=RateGuard(100_000)) as client:
        return enrich_shard(dataset, output, client, "00", items, claims=SQLiteClaims(state), notify=notify)


def test_a_later_run_from_another_state_takes_over_and_charges_nothing_twice(tmp_path, emulator, monkeypatch):
    monkeypatch.setattr(ownership, "LEASE_TTL_S", 0.5)
    make_portraits(tmp_path / "in", 6)
    output = LocalStorage(tmp_path / "out")
    enrich(tmp_path / "in", output, emulator.url, tmp_path / "host-a")
    time.sleep(0.6)
    make_portraits(tmp_path / "in", 9)  # the same 6 and 3 new
    heard: list[str] = []

    result = enrich(tmp_path / "in", output, emulator.url, tmp_path / "host-b", heard.append)

    stats = emulator.stats()
    assert result.enriched == 9 and result.credits_consumed == 3
    assert stats["charged_twice"] == 0 and Decimal(stats["charged"]) == len(stats["charged_by_content"]) == 9
    assert len(heard) == 1 and "takes the output over" in heard[0]


def two_runs_with_their_own_state(
    tmp_path: Path, output_uri: str, url: str, key: str, redis_url: str | None = None
) -> list[tuple[int, str, str]]:
    """Two `normals-pipeline run`s started at once on one output, each with its own NORMALS_STATE_DIR (two hosts),
    and no Redis unless `redis_url`."""
    runs = []
    for host in ("a", "b"):
        env = {**os.environ, "CLIPDROP_API_KEY": key, "NORMALS_STATE_DIR": str(tmp_path / f"host-{host}")}
        env.pop("NORMALS_REDIS_URL", None)
        env.update({"NORMALS_REDIS_URL": redis_url} if redis_url else {})
        args = [CLI, "run", "--dataset", str(tmp_path / "in"), "--output", output_uri, "--api-url", url]
        args += ["--rpm", "100000", "--shards", "2"]
        runs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(run.wait(timeout=300), *run.communicate()) for run in runs]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_hosts_with_their_own_state_on_one_output_charge_each_content_once(
    tmp_path, emulator_factory, where, request
):
    key = f"key-{uuid.uuid4().hex}"
    emulator = emulator_factory(keys={key: Decimal(1000)}, latency=0.3)
    make_portraits(tmp_path / "in", 30)
    uri = str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/out"

    results = two_runs_with_their_own_state(tmp_path, uri, emulator.url, key)

    stats = emulator.stats()
    assert stats["charged_twice"] == 0 and Decimal(stats["charged"]) == len(stats["charged_by_content"]) == 30
    # whichever took the output first enriches it; the other is refused at start, with one line
    assert sorted(code for code, _, _ in results) == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert REFUSAL in refused and refused.strip().count("\n") == 0


def test_a_run_from_another_host_after_the_last_one_ended_takes_over_with_a_warning(tmp_path, emulator):
    """The user moved hosts: the lease the old host left has lapsed, so the run goes on and says so."""
    make_portraits(tmp_path / "in", 4)
    gone = StateIdentity("an-old-state", "old-host:/home/me/.cache/normals-pipeline")
    LocalStorage(tmp_path / "out").write_bytes("owner/lease-00000003.json", ownership._record(gone, time.time() - 60))
    env = {**os.environ, "CLIPDROP_API_KEY": "test-key", "NORMALS_STATE_DIR": str(tmp_path / "new-host")}
    args = [CLI, "run", "--dataset", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--api-url"]

    done = subprocess.run([*args, emulator.url, "--shards", "1"], env=env, capture_output=True, text=True)

    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "old-host:/home/me" in warnings[0] and "takes the output over" in warnings[0]
    assert Decimal(emulator.stats()["charged"]) == 4


def test_two_hosts_sharing_one_redis_both_run_on_one_output_and_charge_each_content_once(
    tmp_path, emulator_factory, redis_url
):
    key = f"key-{uuid.uuid4().hex}"  # its own rate and balance in the shared Redis, whatever other tests left there
    emulator = emulator_factory(keys={key: Decimal(1000)}, latency=0.3)
    make_portraits(tmp_path / "in", 30)

    results = two_runs_with_their_own_state(tmp_path, str(tmp_path / "out"), emulator.url, key, redis_url)

    assert [code for code, _, _ in results] == [0, 0], results
    stats = emulator.stats()
    assert stats["charged_twice"] == 0 and Decimal(stats["charged"]) == len(stats["charged_by_content"]) == 30
