"""The enrichment loop's in-flight window: by default it follows the key's rate and the observed latency."""

import io
from types import SimpleNamespace

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
