"""The fault matrix: each fault the emulator injects has one defined outcome, and in every case no image
is lost and none is charged twice. The README's fault matrix points at these tests."""

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest

from normals_pipeline import ClipdropClient, Enricher, LocalStorage, RateGuard, RetryPolicy
from normals_pipeline.emulator import Faults
from normals_pipeline.enrich import current_items
from normals_pipeline.inventory import take_inventory
from normals_pipeline.manifest import empty_manifest
from normals_pipeline.synthetic import make_portraits

IMAGES = 10
FAST = RetryPolicy(attempts=8, timeout_s=30, wait_initial_s=0.01, wait_max_s=0.05, wait_jitter_s=0.0)


@pytest.fixture
def dataset(tmp_path):
    make_portraits(tmp_path / "in", IMAGES)
    storage = LocalStorage(tmp_path / "in")
    return storage, current_items(storage, take_inventory(storage, 1))


def enrich(emulator, dataset, tmp_path, previous=None, timeout_s=10.0):
    storage, items = dataset
    client = ClipdropClient(
        "test-key", base_url=emulator.url, rate_guard=RateGuard(100_000), retry=FAST, timeout_s=timeout_s
    )
    with client:
        result = Enricher(storage, LocalStorage(tmp_path / "out"), client, concurrency=4).run(
            items, empty_manifest() if previous is None else previous
        )
    return result, dict(client.retries_by_code)


def charged(emulator) -> Decimal:
    return Decimal(emulator.stats()["charged"])


def settled(emulator) -> dict:
    """Stats once the emulator has answered everything, including requests the client gave up on."""
    deadline = time.monotonic() + 10
    while (stats := emulator.stats())["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return stats


def recorded(result) -> Decimal:
    return Decimal(str(result.manifest["credits_consumed"].sum()))


@pytest.mark.parametrize(
    ("faults", "retried_as"),
    [
        (Faults(error_rate=0.3, seed=1), "server_error"),
        (Faults(error_burst=5), "server_error"),
        (Faults(rate_limit_burst=4, retry_after=0.2), "rate_limited"),
    ],
    ids=["500-rate", "500-burst", "429-burst"],
)
def test_transient_faults_are_retried_until_every_image_is_enriched_once(
    faults, retried_as, emulator_factory, dataset, tmp_path
):
    emulator = emulator_factory(faults=faults)
    result, retries = enrich(emulator, dataset, tmp_path)
    assert result.enriched == IMAGES and result.stopped is None
    assert retries.get(retried_as, 0) > 0
    assert charged(emulator) == IMAGES == recorded(result)


@pytest.mark.parametrize("fault", ["truncate_rate", "corrupt_rate"])
def test_a_broken_200_is_recorded_with_its_charge_and_resent_only_by_the_next_run(
    fault, emulator_factory, dataset, tmp_path
):
    emulator = emulator_factory(faults=Faults(**{fault: 0.4, "seed": 3}))
    result, _ = enrich(emulator, dataset, tmp_path)
    broken = result.manifest[result.manifest["error_code"] == "invalid_response"]
    assert len(broken) > 0 and (broken["credits_consumed"] == 1).all()
    assert charged(emulator) == IMAGES == recorded(result)  # each image sent exactly once in this run

    emulator.set_faults(Faults())
    again, _ = enrich(emulator, dataset, tmp_path, previous=result.manifest)
    assert again.enriched == IMAGES and again.new_rows == len(broken)
    assert charged(emulator) == IMAGES + len(broken) == recorded(again)  # a retried row keeps its first charge


def test_an_answer_slower_than_the_timeout_is_not_resent_in_the_same_run(emulator_factory, dataset, tmp_path):
    emulator = emulator_factory(faults=Faults(slow_rate=0.3, slow_seconds=1.5, seed=4))
    result, retries = enrich(emulator, dataset, tmp_path, timeout_s=0.5)
    late = result.manifest[result.manifest["error_code"] == "timeout"]
    assert len(late) > 0 and "timeout" not in retries
    assert settled(emulator)["requests"] == IMAGES  # none sent twice: the API may have charged them

    emulator.set_faults(Faults())
    again, _ = enrich(emulator, dataset, tmp_path, previous=result.manifest, timeout_s=5)
    assert again.enriched == IMAGES and again.new_rows == len(late)


@pytest.mark.parametrize("fault", ["reset_rate", "drop_rate"], ids=["reset-uncharged", "dropped-after-charge"])
def test_a_connection_broken_after_sending_is_recorded_and_only_the_next_run_resends_it(
    fault, emulator_factory, dataset, tmp_path
):
    # From the client, a reset before the charge and a drop after it look the same: either may have cost.
    emulator = emulator_factory(faults=Faults(**{fault: 0.3, "seed": 5}))
    result, retries = enrich(emulator, dataset, tmp_path)
    lost = result.manifest[result.manifest["error_code"] == "connection_lost"]
    assert len(lost) > 0 and result.stopped is None and "connection_lost" not in retries
    assert settled(emulator)["requests"] == IMAGES  # none sent twice in the run

    emulator.set_faults(Faults())
    again, _ = enrich(emulator, dataset, tmp_path, previous=result.manifest)
    assert again.enriched == IMAGES and again.new_rows == len(lost)
    stats = emulator.stats()
    assert charged(emulator) == IMAGES + stats["by_status"].get("dropped", 0)
    assert stats["charged_twice"] == stats["by_status"].get("dropped", 0)  # only what the next run resent


def test_402_in_mid_run_stops_sending_and_keeps_every_finished_row(emulator_factory, dataset, tmp_path):
    emulator = emulator_factory(faults=Faults(credits_after=4))
    result, _ = enrich(emulator, dataset, tmp_path)
    assert result.stopped is not None and result.stopped.error_code == "out_of_credits"
    assert result.enriched == 4 == charged(emulator) == recorded(result)
    assert emulator.stats()["by_status"].get("402", 0) <= 4  # in-flight ones at most, then nothing is sent


@pytest.mark.parametrize(("key", "code"), [("", "missing_api_key"), ("sk-unknown", "invalid_api_key")])
def test_a_refused_key_stops_at_the_first_answer(key, code, emulator, dataset, tmp_path):
    storage, items = dataset
    client = ClipdropClient(key, base_url=emulator.url, rate_guard=RateGuard(60), retry=FAST)
    with client:
        result = Enricher(storage, LocalStorage(tmp_path / "out"), client, concurrency=4).run(items, empty_manifest())
    assert result.stopped.error_code == code and result.new_rows == 0
    assert emulator.stats()["requests"] == 1  # paced: the refusal lands before a second request is due


def test_an_answer_that_trickles_ends_as_a_timeout_row_with_its_cost_and_the_run_ends(fault_server, dataset, tmp_path):
    """200 with a Content-Length, then one byte at a time: httpx's per-read timeouts never trip, the exchange's
    deadline does. Each image is sent once in the run, and its row keeps what the 200 said it cost."""
    server = fault_server("trickle", interval=0.3)
    progress = []
    storage, items = dataset
    client = ClipdropClient("test-key", base_url=server.url, rate_guard=RateGuard(100_000), retry=FAST, timeout_s=1.0)
    started = time.monotonic()
    with client:
        result = Enricher(storage, LocalStorage(tmp_path / "out"), client, concurrency=4).run(
            items, empty_manifest(), progress=progress.append
        )
    assert time.monotonic() - started < 60  # ends, not after the ~300 s each body would take
    assert (result.manifest["error_code"] == "timeout").all() and result.stopped is None
    assert set(server.charged_by_content.values()) == {1}  # each content charged once: none resent in the run
    assert recorded(result) == server.charged == len(server.charged_by_content)
    assert result.requests == server.requests == progress[-1].requests == IMAGES


def test_every_attempt_is_counted_as_a_request(emulator_factory, dataset, tmp_path):
    """500s are retried: each attempt is a request, in the shard's figures and in the progress."""
    emulator = emulator_factory(faults=Faults(error_rate=1.0))
    storage, items = dataset
    retry = RetryPolicy(attempts=3, timeout_s=30, wait_initial_s=0.01, wait_max_s=0.05, wait_jitter_s=0.0)
    client = ClipdropClient("test-key", base_url=emulator.url, rate_guard=RateGuard(100_000), retry=retry)
    progress = []
    with client:
        result = Enricher(storage, LocalStorage(tmp_path / "out"), client, concurrency=4).run(
            items, empty_manifest(), progress=progress.append
        )
    assert result.errors == {"server_error": IMAGES}
    assert result.requests == progress[-1].requests == emulator.stats()["requests"] == IMAGES * 3


def test_requests_waiting_for_their_answer_are_counted_as_sent_and_abort_ends_them(fault_server, dataset, tmp_path):
    """A server that never answers: the progress counts the requests as they go out, with no image done; once
    the run is aborted they end at once as `interrupted` rows (sent, maybe charged) and nothing more is sent."""
    server = fault_server("silent")
    storage, items = dataset
    client = ClipdropClient("test-key", base_url=server.url, rate_guard=RateGuard(100_000), retry=FAST, timeout_s=600)
    progress = []
    with client, ThreadPoolExecutor(1) as pool:
        enricher = Enricher(storage, LocalStorage(tmp_path / "out"), client, concurrency=4)
        run = pool.submit(enricher.run, items, empty_manifest(), progress=progress.append)
        deadline = time.monotonic() + 15
        while not (progress and progress[-1].requests == 4):
            assert time.monotonic() < deadline and not run.done()
            time.sleep(0.05)
        assert progress[-1].done == 0 and server.requests == 4
        client.abort()
        result = run.result(timeout=15)
    assert (result.manifest["error_code"] == "interrupted").all() and len(result.manifest) == 4
    assert result.requests == server.requests == progress[-1].requests == 4  # nothing sent after the abort


@pytest.mark.parametrize("fault", ["reset_rate", "drop_rate"], ids=["reset-uncharged", "dropped-after-charge"])
def test_an_ambiguous_end_is_final_in_the_run_for_every_duplicate_of_the_content(fault, emulator_factory, tmp_path):
    """Each content under three names, in flight together: when its request's connection breaks, the
    duplicates waiting on it get the same row without a request, so no content is sent twice in the run."""
    emulator = emulator_factory(latency=0.2, faults=Faults(**{fault: 0.4, "seed": 5}))
    sources = make_portraits(tmp_path / "portraits", IMAGES)
    for copy in range(3):
        for source in sources:
            target = tmp_path / "in" / f"copy{copy}" / source.relative_to(tmp_path / "portraits")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    storage = LocalStorage(tmp_path / "in")
    result, _ = enrich(emulator, (storage, current_items(storage, take_inventory(storage, 1))), tmp_path)

    stats = settled(emulator)
    table = result.manifest
    assert len(table) == 3 * IMAGES and (table["error_code"] == "connection_lost").sum() >= 3
    assert stats["requests"] == IMAGES  # one request per content, whatever its fate
    assert stats["charged_twice"] == 0 and set(stats["charged_by_content"].values()) <= {1}
    assert (table.groupby("content_hash")["error_code"].nunique(dropna=False) == 1).all()  # one outcome a content
    assert recorded(result) == Decimal(stats["charged"]) - stats["by_status"].get("dropped", 0)  # drops: unknown
