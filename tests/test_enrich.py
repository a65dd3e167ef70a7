"""The enrichment loop's in-flight window: by default it follows the key's rate and the observed latency."""

import hashlib
import io
import threading
import time
from types import SimpleNamespace

import pyarrow.compute as pc
import pytest
from PIL import Image

from normals_pipeline.client import INITIAL_LATENCY_S, ClipdropClient
from normals_pipeline.enrich import (
    MAX_BYTES_IN_FLIGHT,
    MAX_IN_FLIGHT,
    InFlightWindow,
    StoredMaps,
    images_per_second,
    normal_map_path,
)
from normals_pipeline.guards import RateGuard
from normals_pipeline.manifest import MANIFEST_DIR
from normals_pipeline.storage import LocalStorage


def client(rpm, latency):
    return SimpleNamespace(rate_guard=SimpleNamespace(rpm=rpm), latency_s=latency)


@pytest.mark.parametrize(
    ("rpm", "latency", "expected"),
    [(60, 0.8, 4), (300, 0.8, 8), (1200, 0.8, 26), (3000, 0.8, 62), (60, 0.05, 3), (100_000, 1.0, MAX_IN_FLIGHT)],
)
def test_the_window_is_rate_times_latency_with_headroom(rpm, latency, expected):
    assert InFlightWindow(client(rpm, latency), None).size() == expected


def test_the_window_follows_the_latency_as_it_changes():
    observed = client(1200, 0.5)
    window = InFlightWindow(observed, None)
    before = window.size()
    observed.latency_s = 2.0
    assert window.size() > 3 * before - 6


def test_an_explicit_concurrency_wins():
    window = InFlightWindow(client(3000, 5.0), 3)
    assert window.size() == 6 and window.threads == 3
    assert window.has_room(5, 10**12, 10**12)  # no byte cap when the user chose


def test_the_byte_budget_caps_what_is_held_but_never_stops_the_first():
    window = InFlightWindow(client(3000, 0.8), None)
    assert window.has_room(0, 0, 2 * MAX_BYTES_IN_FLIGHT)
    assert not window.has_room(1, MAX_BYTES_IN_FLIGHT - 10, 20)
    assert window.has_room(1, MAX_BYTES_IN_FLIGHT - 10, 10)


def test_the_client_observes_latency(emulator_factory):
    emulator = emulator_factory(latency=0.3)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 150, 120)).save(buffer, "PNG")
    with ClipdropClient("test-key", base_url=emulator.url, rate_guard=RateGuard(100_000)) as api:
        assert api.latency_s == INITIAL_LATENCY_S
        for _ in range(12):
            api.surface_normals(buffer.getvalue(), "a.png", "image/png")
        assert 0.3 <= api.latency_s < 0.8  # moved from the initial guess towards what it saw


@pytest.mark.parametrize(
    ("rpm", "latency", "concurrency", "expected"),
    [
        (60, INITIAL_LATENCY_S, None, 60 / 60.3),  # the key's schedule: one slot per 60.3/N s
        (6000, 2.0, 3, 1.5),  # three workers, 2 s each: the window cannot keep up with the key
        (3000, 2.0, None, MAX_IN_FLIGHT / 2.0),  # the window's cap, not the key, sets the pace
    ],
)
def test_the_pace_a_run_keeps_is_the_schedule_or_what_the_window_lets_through(rpm, latency, concurrency, expected):
    assert images_per_second(rpm, latency, concurrency) == pytest.approx(expected)


class CountingStorage(LocalStorage):
    def __init__(self, root) -> None:
        super().__init__(root)
        self.looks, self.listings = 0, 0

    def exists(self, path):
        self.looks += 1
        return super().exists(path)

    def list_prefix(self, prefix):
        self.listings += 1
        return super().list_prefix(prefix)


@pytest.mark.parametrize(
    ("looks", "recorded", "listed"), [(600, 0, True), (600, 200_000, True), (150, 200_000, False), (0, 0, False)]
)
def test_stored_maps_come_from_one_listing_only_when_that_takes_fewer_requests(tmp_path, looks, recorded, listed):
    output = CountingStorage(tmp_path)
    stored, absent = normal_map_path("a" * 64), normal_map_path("b" * 64)
    output.write_bytes(stored, b"map")
    maps = StoredMaps(output, looks, recorded)
    assert stored in maps and absent not in maps
    assert (output.listings, output.looks) == ((1, 0) if listed else (0, 2))


def _on_s3(s3_client, bucket: str, files: dict[str, bytes]):
    """`files` under s3://bucket/in, and that dataset with its output, s3://bucket/out."""
    from normals_pipeline.storage import open_storage

    for name, data in files.items():
        s3_client.put_object(Bucket=bucket, Key=f"in/{name}", Body=data)
    return open_storage(f"s3://{bucket}/in"), open_storage(f"s3://{bucket}/out")


def _plan_then_run(dataset, output, url, reads, before_run=lambda: None):
    """The plan of one shard keeping what it reads in `reads`, then the run of that shard taking from it."""
    from normals_pipeline.enrich import current_items, enrich_shard
    from normals_pipeline.inventory import take_inventory
    from normals_pipeline.plan import make_plan

    inventory = take_inventory(dataset, 1)
    plan = make_plan(dataset, output, 1, inventory=inventory, rpm=100_000, keep=reads)
    before_run()
    with ClipdropClient("test-key", base_url=url, rate_guard=RateGuard(100_000)) as api:
        result = enrich_shard(dataset, output, api, "0", current_items(dataset, inventory), reads=reads)
    return plan, result


def _portraits(tmp_path, count: int) -> dict[str, bytes]:
    from normals_pipeline.synthetic import make_portraits

    return {path.name: path.read_bytes() for path in make_portraits(tmp_path / "portraits", count)}


def test_a_run_after_the_plan_on_s3_reads_each_image_once(tmp_path, s3_client, s3_bucket, s3_requests, emulator):
    from normals_pipeline.enrich import PlanReads

    portraits = _portraits(tmp_path, 5)
    files = portraits | {"copy.png": next(iter(portraits.values())), "empty.jpg": b"", "broken.jpg": b"not an image"}
    dataset, output = _on_s3(s3_client, s3_bucket, files)
    s3_requests.clear()

    plan, result = _plan_then_run(dataset, output, emulator.url, PlanReads())

    reads = sorted(path for method, path in s3_requests if method == "GET" and path.startswith(f"/{s3_bucket}/in/"))
    assert reads == sorted(f"/{s3_bucket}/in/{name}" for name in files)  # the plan's: the run took what it read
    assert (plan.total.to_send, plan.total.duplicates, plan.total.refused) == (5, 1, 2)
    hashes = {hashlib.sha256(data).hexdigest() for data in portraits.values()}
    assert emulator.stats()["charged_by_content"] == dict.fromkeys(hashes, 1)  # the bytes the plan hashed, once each
    rows = result.manifest.set_index("path")
    assert rows.loc["empty.jpg", "error_code"] == "empty_file"
    assert rows.loc["broken.jpg", "error_code"] == "unreadable_image"
    assert result.enriched == 6


def test_a_file_rewritten_after_the_plan_is_sent_as_the_plan_read_it_and_resent_by_the_next_run(
    tmp_path, s3_client, s3_bucket, emulator
):
    """The run sends the bytes the plan hashed and counted, recorded under the version they were read at;
    the next listing sees the new version, and the next run sends the new bytes."""
    from normals_pipeline.enrich import PlanReads

    files = _portraits(tmp_path, 3)
    name = sorted(files)[0]
    dataset, output = _on_s3(s3_client, s3_bucket, files)
    rewritten = files[sorted(files)[1]] + b"\xff\xd9"  # other bytes, still an image

    def rewrite() -> None:
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=rewritten)

    _, result = _plan_then_run(dataset, output, emulator.url, PlanReads(), rewrite)
    row = result.manifest.set_index("path").loc[name]
    assert row["content_hash"] == hashlib.sha256(files[name]).hexdigest()
    assert row["source_version"] == hashlib.md5(files[name]).hexdigest()  # S3's ETag of the bytes sent

    _, again = _plan_then_run(dataset, output, emulator.url, PlanReads())
    assert again.new_rows == 1
    assert again.manifest.set_index("path").loc[name, "content_hash"] == hashlib.sha256(rewritten).hexdigest()
    assert emulator.stats()["charged"] == "4"


def test_what_the_plan_keeps_is_a_remote_datasets_readable_files_up_to_a_byte_budget(tmp_path, s3_client, s3_bucket):
    from normals_pipeline.enrich import Checked, Item, PlanReads, read_and_check

    files = _portraits(tmp_path, 3)
    dataset, _ = _on_s3(s3_client, s3_bucket, files)
    items = [Item(name, len(data), hashlib.md5(data).hexdigest()) for name, data in sorted(files.items())]
    checked = [read_and_check(dataset, item, "downscale") for item in items]
    reads = PlanReads(max_bytes=len(checked[0].prepared.data) + len(checked[1].prepared.data) // 2)
    for item, found in zip(items, checked):
        reads.keep(dataset, item, "downscale", found)
    reads.keep(dataset, Item("gone.jpg", 1, "x"), "downscale", Checked(None))  # unreadable: the run tries again
    local = LocalStorage(tmp_path / "portraits")
    reads.keep(local, items[2], "downscale", checked[2])  # a local read again is cheap: not kept

    assert reads.take(dataset, items[0], "downscale") is checked[0]
    assert reads.take(dataset, items[0], "downscale") is None  # taken once
    assert reads.take(dataset, items[1], "downscale") is None  # over the budget
    assert reads.take(dataset, items[2], "refuse") is None  # read under other settings
    assert reads.take(dataset, Item(items[2].path, items[2].size, "other"), "downscale") is None  # another version
    assert reads.take(dataset, Item("gone.jpg", 1, "x"), "downscale") is None
    assert reads.take(local, items[2], "downscale") is None


class _MeetingManifests:
    """A folder written as a remote store is (not a `LocalStorage`, so writes may go at once); each manifest
    write waits until `barrier`'s parties are all writing one: writes one after another never meet."""

    def __init__(self, root, barrier: threading.Barrier) -> None:
        self._folder = LocalStorage(root)
        self.barrier = barrier

    def __getattr__(self, name: str):
        return getattr(self._folder, name)

    def write_bytes(self, path: str, data: bytes, content_type: str | None = None) -> None:
        if path.startswith(f"{MANIFEST_DIR}/"):
            self.barrier.wait()
        self._folder.write_bytes(path, data, content_type)


def test_shards_are_written_at_once_and_reported_one_at_a_time(tmp_path, emulator):
    """On S3 a shard's commit is a few round trips: the last shards' are not made one after another (in a
    folder they are: each is work for this process, not a wait)."""
    from normals_pipeline.enrich import current_items, enrich_shards
    from normals_pipeline.inventory import partition_key, take_inventory
    from normals_pipeline.synthetic import make_portraits

    make_portraits(tmp_path / "in", 12)
    dataset = LocalStorage(tmp_path / "in")
    shards = 3
    inventory = take_inventory(dataset, shards)
    work = [
        (partition_key(shard, shards), current_items(dataset, inventory.filter(pc.equal(inventory["shard"], shard))))
        for shard in range(shards)
    ]
    output = _MeetingManifests(tmp_path / "out", threading.Barrier(shards, timeout=10))
    reporting, most = [], []

    def on_shard(key: str, result) -> None:
        reporting.append(key)
        most.append(len(reporting))
        time.sleep(0.05)
        reporting.remove(key)

    with ClipdropClient("test-key", base_url=emulator.url, rate_guard=RateGuard(100_000)) as api:
        results = enrich_shards(dataset, output, api, work, on_shard=on_shard)
    assert [result.stopped for result in results.values()] == [None] * shards  # every manifest was written
    assert sum(result.enriched for result in results.values()) == 12
    assert len(most) == shards and max(most) == 1


def test_a_run_nobody_claims_beside_asks_s3_nothing_after_its_claims(
    tmp_path, s3_client, s3_bucket, s3_requests, emulator
):
    """No HEAD of a map after each claim: nobody else took or gave up a claim of the output since the run's mark,
    so nothing can have been stored since it listed the maps. A duplicate still finds its twin's map."""
    from normals_pipeline.enrich import current_items, enrich_shard
    from normals_pipeline.inventory import take_inventory

    portraits = _portraits(tmp_path, 4)
    dataset, output = _on_s3(s3_client, s3_bucket, portraits | {"copy.png": next(iter(portraits.values()))})
    s3_requests.clear()
    with ClipdropClient("test-key", base_url=emulator.url, rate_guard=RateGuard(100_000)) as api:
        result = enrich_shard(dataset, output, api, "0", current_items(dataset, take_inventory(dataset, 1)))

    assert result.enriched == 5
    assert [path for method, path in s3_requests if method == "HEAD" and "/normals/" in path] == []
    assert set(emulator.stats()["charged_by_content"].values()) == {1}


class _StoredByAnotherRun(LocalStorage):
    """An output where another run, with claims in the same store, stores one content's map just after this run
    lists the maps (having claimed the content before this run's mark, or after)."""

    def __init__(self, root, claims, digest: str, claimed_before: bool) -> None:
        from normals_pipeline.enrich import claim_namespace
        from normals_pipeline.guards import ClaimGuard

        super().__init__(root)
        self.other, self.digest = ClaimGuard(claims, claim_namespace(self)), digest
        if claimed_before:
            assert self.other.acquire(digest)

    def list_prefix(self, prefix):
        listed = super().list_prefix(prefix)
        if prefix.startswith("normals"):
            self.other.acquire(self.digest)  # ours already, or taken now
            self.write_bytes(normal_map_path(self.digest), _MAP)
            self.other.release(self.digest)
        return listed


_MAP = b"\xff\xd8 another run's map"


@pytest.mark.parametrize("claimed_before", [False, True])
def test_a_map_another_run_stores_after_the_listing_is_found_after_the_claim(tmp_path, emulator, claimed_before):
    from normals_pipeline._state import MemoryClaims
    from normals_pipeline.enrich import current_items, enrich_shard
    from normals_pipeline.inventory import take_inventory

    portraits = _portraits(tmp_path, 3)
    dataset = LocalStorage(tmp_path / "portraits")
    theirs = hashlib.sha256(next(iter(portraits.values()))).hexdigest()
    claims = MemoryClaims()
    output = _StoredByAnotherRun(tmp_path / "out", claims, theirs, claimed_before)
    with ClipdropClient("test-key", base_url=emulator.url, rate_guard=RateGuard(100_000)) as api:
        result = enrich_shard(
            dataset, output, api, "0", current_items(dataset, take_inventory(dataset, 1)), claims=claims
        )

    assert result.enriched == 3
    charged = emulator.stats()["charged_by_content"]
    assert theirs not in charged and len(charged) == 2  # theirs was reused, not bought again
    assert output.read_bytes(normal_map_path(theirs)) == _MAP
