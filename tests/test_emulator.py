"""The emulator, exercised over real HTTP on loopback, as the pipeline's client will meet it."""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import numpy as np
import pytest
from _emulator_fixtures import TEST_KEY
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from normals_pipeline.emulator import (
    API_PATH,
    BACKGROUND_RGB,
    Emulator,
    EmulatorConfig,
    Faults,
    _cli,
    fingerprint,
    format_decimal,
    render_normal_map,
)

Factory = Callable[..., Emulator]


def portrait(size: tuple[int, int] = (200, 240), fmt: str = "PNG") -> bytes:
    """A head-and-shoulders silhouette on a plain grey backdrop."""
    width, height = size
    image = Image.new("RGB", size, (230, 230, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.3, height * 0.1, width * 0.7, height * 0.55), fill=(200, 150, 120))
    draw.ellipse((width * 0.05, height * 0.6, width * 0.95, height * 1.4), fill=(40, 60, 140))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


SMALL_PNG = portrait((40, 48))


def post(
    emulator: Emulator,
    data: bytes = SMALL_PNG,
    *,
    key: str | None = TEST_KEY,
    filename: str = "portrait.png",
    timeout: float = 10.0,
    client: httpx.Client | None = None,
) -> httpx.Response:
    """One request, on `client`'s kept-alive connection if given, else on a connection of its own."""
    headers = {"x-api-key": key} if key is not None else {}
    files = {"image_file": (filename, data, "application/octet-stream")}
    return (client or httpx).post(emulator.url + API_PATH, files=files, headers=headers, timeout=timeout)


def statuses(emulator: Emulator, count: int) -> list[int]:
    return [post(emulator).status_code for _ in range(count)]


def assert_error(response: httpx.Response, status: int, message: str | None = None) -> str:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    if message is not None:
        assert error == message
    return error


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(response: httpx.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)


# -- success ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_success_is_a_same_size_jpeg_with_credit_headers(emulator: Emulator, fmt: str) -> None:
    response = post(emulator, portrait((200, 240), fmt))
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-credits-consumed"] == "1"
    assert response.headers["x-remaining-credits"] == "999"
    assert emulator.credits(TEST_KEY) == Decimal(999)
    image = Image.open(io.BytesIO(response.content))
    assert (image.format, image.size) == ("JPEG", (200, 240))


def test_normal_map_follows_the_documented_convention(emulator: Emulator) -> None:
    """Background is (128,128,255); the head's left edge points left (-X), its top points up (+Y)."""
    normals = decode(post(emulator, portrait((200, 240))))
    assert np.abs(normals[5, 5] - BACKGROUND_RGB).max() <= 4
    head_left, head_right, head_top = normals[80, 63], normals[80, 137], normals[26, 100]
    assert head_left[0] < 100 and head_right[0] > 156
    assert head_top[1] > 156
    assert (np.abs(normals - BACKGROUND_RGB).max(axis=2) > 20).mean() > 0.1


def test_map_is_in_the_stored_pixel_grid_ignoring_exif_rotation(emulator: Emulator) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° on display
    buffer = io.BytesIO()
    Image.open(io.BytesIO(portrait((120, 80)))).save(buffer, "JPEG", exif=exif)
    response = post(emulator, buffer.getvalue(), filename="rotated.jpg")
    assert Image.open(io.BytesIO(response.content)).size == (120, 80)


def test_accepts_awkward_file_names_and_extra_form_fields(emulator: Emulator) -> None:
    files = {"image_file": ("portrait café 1.png", SMALL_PNG, "image/png")}
    response = httpx.post(
        emulator.url + API_PATH, files=files, data={"note": "ignored"}, headers={"x-api-key": TEST_KEY}
    )
    assert response.status_code == 200


# -- auth, routing, input --------------------------------------------------


def test_missing_and_unknown_keys(emulator: Emulator) -> None:
    assert_error(post(emulator, key=None), 401, "No api key provided")
    assert_error(post(emulator, key="stolen"), 403, "Invalid or revoked api key")


def test_unknown_paths_and_methods(emulator: Emulator) -> None:
    assert_error(httpx.post(emulator.url + "/nope", headers={"x-api-key": TEST_KEY}), 404)
    response = httpx.get(emulator.url + API_PATH)
    assert_error(response, 405)
    assert response.headers["allow"] == "POST"


def png_claiming_size(width: int, height: int) -> bytes:
    """A PNG whose header claims a size its (tiny) data cannot fill: only a decoder would notice."""
    data = bytearray(SMALL_PNG)
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(data[ihdr - 4 : ihdr + 13]))
    return bytes(data)


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(encoded("GIF"), "format GIF is not valid", id="gif"),
        pytest.param(encoded("BMP"), "format BMP is not valid", id="bmp"),
        pytest.param(encoded("TIFF"), "format TIFF is not valid", id="tiff"),
        pytest.param(b"hello, not an image", "format is not valid", id="text"),
        pytest.param(SMALL_PNG[: len(SMALL_PNG) // 2], "could not be decoded", id="truncated"),
        pytest.param(png_claiming_size(5001, 5001), "resolution is too big", id="over-25-megapixels"),
        pytest.param(b"\0" * (30 * 2**20 + 1), "maximum file size is 30 MB", id="over-30-MB"),
    ],
)
def test_invalid_images_are_400_and_not_charged(emulator: Emulator, data: bytes, expected: str) -> None:
    assert expected in assert_error(post(emulator, data), 400)
    assert emulator.credits(TEST_KEY) == Decimal(1000)


def test_real_over_25_megapixel_png_is_refused() -> None:
    """5001 x 5001 one-bit pixels compress to a few kB but are 25.01 MP."""
    buffer = io.BytesIO()
    Image.new("1", (5001, 5001)).save(buffer, "PNG")
    with Emulator(EmulatorConfig(keys={TEST_KEY: Decimal(1)})) as emulator:
        assert "25 megapixels" in assert_error(post(emulator, buffer.getvalue()), 400)


def test_requests_without_the_image_part_are_400(emulator: Emulator) -> None:
    headers = {"x-api-key": TEST_KEY}
    wrong_field = httpx.post(emulator.url + API_PATH, files={"file": ("a.png", SMALL_PNG)}, headers=headers)
    assert_error(wrong_field, 400, "Missing image_file in request")
    not_multipart = httpx.post(emulator.url + API_PATH, json={"image_file": "x"}, headers=headers)
    assert "multipart/form-data" in assert_error(not_multipart, 400)


# -- rate limits -----------------------------------------------------------


def test_rate_limit_after_rpm_requests(emulator_factory: Factory) -> None:
    emulator = emulator_factory(rpm=3)
    assert statuses(emulator, 3) == [200, 200, 200]
    response = post(emulator)
    assert "3 requests per minute" in assert_error(response, 429)
    assert "retry-after" not in response.headers
    stats = emulator.stats()
    assert stats["by_status"] == {"200": 3, "429": 1}
    assert stats["max_in_any_60s"] == 4


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("window", "after_the_minute"), [("fixed", 200), ("sliding", 429)])
def test_fixed_windows_reset_on_the_minute_sliding_ones_do_not(
    emulator_factory: Factory, window: str, after_the_minute: int
) -> None:
    clock = FakeClock(120 + 58.0)
    emulator = emulator_factory(rpm=3, window=window, clock=clock)
    assert statuses(emulator, 3) == [200, 200, 200]
    clock.now = 180 + 1.0  # next calendar minute, 3 s later
    assert post(emulator).status_code == after_the_minute
    clock.now = 180 + 58.5  # the first three have left every window
    assert post(emulator).status_code == 200


def test_max_in_any_60s_exposes_a_fixed_window_boundary_burst(emulator_factory: Factory) -> None:
    clock = FakeClock(120 + 59.0)
    emulator = emulator_factory(rpm=3, window="fixed", clock=clock)
    statuses(emulator, 3)
    clock.now = 180 + 1.0
    assert statuses(emulator, 3) == [200, 200, 200]
    assert emulator.stats()["max_in_any_60s"] == 6


@pytest.mark.parametrize(("window", "reset"), [("sliding", "58"), ("fixed", "28")])
def test_rate_limit_headers_say_the_limit_what_is_left_and_when_it_frees(
    emulator_factory: Factory, window: str, reset: str
) -> None:
    clock = FakeClock(150.0)
    emulator = emulator_factory(rpm=2, window=window, clock=clock, rate_limit_headers=True)
    limits = [post(emulator).headers for _ in range(2)]
    assert [(h["x-ratelimit-limit"], h["x-ratelimit-remaining"]) for h in limits] == [("2", "1"), ("2", "0")]
    clock.now = 152.0
    refused = post(emulator)
    assert refused.status_code == 429 and refused.headers["x-ratelimit-remaining"] == "0"
    assert refused.headers["x-ratelimit-reset"] == reset  # the oldest leaves at 210; the fixed minute ends at 180
    assert "x-ratelimit-limit" not in post(emulator_factory()).headers  # off by default, as the API documents none


def test_rate_limit_burst_with_retry_after(emulator_factory: Factory) -> None:
    emulator = emulator_factory(faults=Faults(rate_limit_burst=2, retry_after=1.2))
    first = post(emulator)
    assert_error(first, 429)
    assert first.headers["retry-after"] == "2"
    assert statuses(emulator, 2) == [429, 200]


# -- credits ---------------------------------------------------------------


def test_402_when_credits_run_out(emulator_factory: Factory) -> None:
    emulator = emulator_factory(keys={TEST_KEY: Decimal(2)})
    assert [post(emulator).headers["x-remaining-credits"] for _ in range(2)] == ["1", "0"]
    assert_error(post(emulator), 402, "Your account has no remaining credits")
    assert emulator.credits(TEST_KEY) == 0
    assert emulator.stats()["charged"] == "2"


def test_a_cached_answer_is_the_first_map_for_every_image_and_still_charged(emulator_factory: Factory) -> None:
    """The throughput bench's stand-in: one rendering, then the same bytes, so the server is never the bound."""
    emulator = emulator_factory(rpm=100, cached_answer=True)
    first, second = post(emulator, portrait((200, 240))), post(emulator, portrait((120, 90)))
    assert first.status_code == second.status_code == 200 and first.content == second.content
    assert second.headers["x-credits-consumed"] == "1" and emulator.stats()["charged"] == "2"


def test_fractional_and_unlimited_credits(emulator_factory: Factory) -> None:
    emulator = emulator_factory(keys={TEST_KEY: Decimal(1), "free": None}, credits_per_call=Decimal("0.2"))
    paid = post(emulator)
    assert (paid.headers["x-credits-consumed"], paid.headers["x-remaining-credits"]) == ("0.2", "0.8")
    free = post(emulator, key="free")
    assert free.headers["x-credits-consumed"] == "0.2"
    assert "x-remaining-credits" not in free.headers
    assert emulator.stats()["keys"][fingerprint("free")] == {"requests": 1, "charged": "0.2", "remaining": None}


def test_credit_headers_can_be_left_out(emulator_factory: Factory) -> None:
    response = post(emulator_factory(credit_headers=False))
    assert response.status_code == 200
    assert not {"x-credits-consumed", "x-remaining-credits"} & set(response.headers)


def test_credits_after_turns_into_402_mid_run(emulator_factory: Factory) -> None:
    emulator = emulator_factory(faults=Faults(credits_after=2))
    assert statuses(emulator, 4) == [200, 200, 402, 402]
    assert emulator.credits(TEST_KEY) == Decimal(998)


@given(st.decimals(min_value=0, max_value=10**6, places=3))
def test_format_decimal_round_trips_without_exponents(value: Decimal) -> None:
    text = format_decimal(value)
    assert Decimal(text) == value
    assert "E" not in text and not text.endswith(".0")


# -- faults ----------------------------------------------------------------


def test_error_rate_is_reproducible_with_a_seed(emulator_factory: Factory) -> None:
    faults = Faults(error_rate=0.5, seed=7)
    first, second = emulator_factory(faults=faults), emulator_factory(faults=faults)
    sequence = statuses(first, 12)
    assert sequence == statuses(second, 12)
    assert set(sequence) == {200, 500}
    assert first.credits(TEST_KEY) == 1000 - sequence.count(200)


def test_error_burst_then_recovery(emulator_factory: Factory) -> None:
    emulator = emulator_factory(faults=Faults(error_burst=2))
    assert_error(post(emulator), 500, "Internal server error")
    assert statuses(emulator, 2) == [500, 200]


def test_reset_closes_the_connection_without_charging(emulator_factory: Factory) -> None:
    emulator = emulator_factory(faults=Faults(reset_rate=1.0))
    with pytest.raises(httpx.TransportError):
        post(emulator)
    assert emulator.credits(TEST_KEY) == 1000
    stats = emulator.stats()
    assert (stats["by_status"], stats["charged"], stats["charged_by_content"]) == ({"reset": 1}, "0", {})


def test_drop_charges_then_resets_the_connection(emulator_factory: Factory) -> None:
    """The API charged, then the connection broke before the answer arrived."""
    emulator = emulator_factory(faults=Faults(drop_rate=1.0))
    with pytest.raises(httpx.TransportError):
        post(emulator)
    assert emulator.credits(TEST_KEY) == 999
    stats = emulator.stats()
    assert (stats["requests"], stats["by_status"], stats["charged"]) == (1, {"dropped": 1}, "1")
    assert stats["keys"][fingerprint(TEST_KEY)] == {"requests": 1, "charged": "1", "remaining": "999"}
    assert (stats["charged_by_content"], stats["charged_twice"]) == ({sha256(SMALL_PNG): 1}, 0)


def test_drops_are_reproducible_with_a_seed(emulator_factory: Factory) -> None:
    def outcomes(emulator: Emulator) -> list[int | str]:
        results: list[int | str] = []
        for _ in range(12):
            try:
                results.append(post(emulator).status_code)
            except httpx.TransportError:
                results.append("dropped")
        return results

    faults = Faults(drop_rate=0.5, seed=11)
    first, second = emulator_factory(faults=faults), emulator_factory(faults=faults)
    sequence = outcomes(first)
    assert sequence == outcomes(second)
    assert set(sequence) == {200, "dropped"}
    assert first.credits(TEST_KEY) == 1000 - 12  # every one of them was charged
    assert first.stats()["by_status"] == {"200": sequence.count(200), "dropped": sequence.count("dropped")}


def test_existing_seeds_draw_as_before_drops_existed(emulator_factory: Factory) -> None:
    """Without drop_rate, five numbers per request (reset, slow, error, truncate, corrupt), as before."""
    rng = random.Random(7)
    expected = [500 if [rng.random() for _ in range(5)][2] < 0.5 else 200 for _ in range(12)]
    assert statuses(emulator_factory(faults=Faults(error_rate=0.5, seed=7)), 12) == expected


def test_drop_ranks_after_reset_and_error(emulator_factory: Factory) -> None:
    emulator = emulator_factory(faults=Faults(error_rate=1.0, drop_rate=1.0))
    assert statuses(emulator, 2) == [500, 500]
    emulator.set_faults(Faults(reset_rate=1.0, drop_rate=1.0))
    with pytest.raises(httpx.TransportError):
        post(emulator)
    assert emulator.stats()["by_status"] == {"500": 2, "reset": 1}
    assert emulator.credits(TEST_KEY) == 1000


def test_truncated_answer_raises_but_is_charged(emulator_factory: Factory) -> None:
    emulator = emulator_factory(faults=Faults(truncate_rate=1.0))
    with pytest.raises(httpx.TransportError):
        post(emulator)
    assert emulator.credits(TEST_KEY) == 999


def test_corrupt_answer_is_not_a_jpeg_but_is_charged(emulator_factory: Factory) -> None:
    response = post(emulator_factory(faults=Faults(corrupt_rate=1.0)))
    assert (response.status_code, response.headers["content-type"]) == (200, "image/jpeg")
    assert not response.content.startswith(b"\xff\xd8")
    assert response.headers["x-remaining-credits"] == "999"


# -- charges per content ---------------------------------------------------


def test_identical_bytes_charged_twice_are_one_content(emulator: Emulator) -> None:
    assert statuses(emulator, 2) == [200, 200]
    stats = emulator.stats()
    assert (stats["charged_by_content"], stats["charged_twice"]) == ({sha256(SMALL_PNG): 2}, 1)
    assert stats == httpx.get(emulator.url + "/_emulator/stats").json()


def test_different_images_are_not_charged_twice(emulator: Emulator) -> None:
    other = portrait((48, 40))
    assert (post(emulator).status_code, post(emulator, other).status_code) == (200, 200)
    stats = emulator.stats()
    assert stats["charged_by_content"] == {sha256(SMALL_PNG): 1, sha256(other): 1}
    assert stats["charged_twice"] == 0


def test_charges_per_content_count_truncated_corrupt_and_dropped_answers(emulator_factory: Factory) -> None:
    emulator = emulator_factory()
    for faults in (Faults(truncate_rate=1.0), Faults(drop_rate=1.0)):
        emulator.set_faults(faults)
        with pytest.raises(httpx.TransportError):
            post(emulator)
    emulator.set_faults(Faults(corrupt_rate=1.0))
    assert post(emulator).status_code == 200
    stats = emulator.stats()
    assert (stats["charged"], stats["charged_by_content"], stats["charged_twice"]) == ("3", {sha256(SMALL_PNG): 3}, 2)


def test_uncharged_answers_are_not_counted_per_content(emulator_factory: Factory) -> None:
    emulator = emulator_factory(keys={TEST_KEY: Decimal(1)}, faults=Faults(error_burst=1))
    bad = b"hello, not an image"
    assert_error(post(emulator, bad), 400)
    assert_error(post(emulator), 500)
    assert post(emulator).status_code == 200
    assert_error(post(emulator, portrait((48, 40))), 402)
    stats = emulator.stats()
    assert stats["by_status"] == {"200": 1, "400": 1, "402": 1, "500": 1}
    assert (stats["charged_by_content"], stats["charged_twice"]) == ({sha256(SMALL_PNG): 1}, 0)


def test_reset_stats_clears_the_charges_per_content(emulator: Emulator) -> None:
    statuses(emulator, 2)
    assert httpx.post(emulator.url + "/_emulator/reset").status_code == 200
    stats = emulator.stats()
    assert (stats["charged_by_content"], stats["charged_twice"]) == ({}, 0)
    post(emulator)
    assert (emulator.stats()["charged_by_content"], emulator.stats()["charged_twice"]) == ({sha256(SMALL_PNG): 1}, 0)


def test_slow_requests_outlast_a_short_timeout(emulator_factory: Factory) -> None:
    emulator = emulator_factory(faults=Faults(slow_rate=1.0, slow_seconds=0.6))
    with pytest.raises(httpx.ReadTimeout):
        post(emulator, timeout=0.2)
    started = time.monotonic()
    assert post(emulator).status_code == 200
    assert time.monotonic() - started >= 0.6


def test_latency_is_per_request_and_concurrent(emulator_factory: Factory) -> None:
    emulator = emulator_factory(latency=1.0)
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: post(emulator).status_code, range(8)))
    elapsed = time.monotonic() - started
    assert codes == [200] * 8
    assert 1.0 <= elapsed < 1.9
    assert emulator.stats()["concurrent_max"] == 8


def test_latency_jitter_varies_each_answer_within_bounds(emulator_factory: Factory) -> None:
    emulator = emulator_factory(latency=0.05, latency_jitter=0.04)
    post(emulator)  # the connection and imports warm up
    durations = []
    for _ in range(8):
        started = time.monotonic()
        assert post(emulator).status_code == 200
        durations.append(time.monotonic() - started)
    assert min(durations) >= 0.01
    assert max(durations) < 0.09 + 0.3  # the bound plus generous room for a loaded machine
    assert max(durations) - min(durations) > 0.005  # eight uniform draws in ±0.04 s are not all alike


def test_a_kept_alive_connection_answers_without_waiting_for_a_delayed_ack(emulator: Emulator) -> None:
    """An answer's head and body go out at once (no Nagle): otherwise every request after a connection's first
    waits for the client's delayed ACK of the head (40 ms or more on Linux), and the emulator, not the client,
    bounds a benchmark's bare loop (it held a 16-thread loop to ~360 images/s)."""
    durations = []
    with httpx.Client() as client:
        for _ in range(9):
            started = time.monotonic()
            assert post(emulator, client=client).status_code == 200
            durations.append(time.monotonic() - started)
    assert sorted(durations[1:])[4] < 0.04  # the median of those on the kept-alive connection, stalled or not


def test_latency_jitter_never_goes_below_zero(emulator_factory: Factory) -> None:
    emulator = emulator_factory(latency=0.0, latency_jitter=0.05)
    post(emulator)  # the connection and imports warm up: the bound is on the delays, not on the first request
    started = time.monotonic()
    assert statuses(emulator, 4) == [200] * 4
    assert time.monotonic() - started < 0.05 * 4 + 0.5


# -- control endpoints, binding, CLI ---------------------------------------


def test_faults_and_reset_over_http(emulator: Emulator) -> None:
    assert httpx.post(emulator.url + "/_emulator/faults", json={"error_burst": 1}).status_code == 200
    assert statuses(emulator, 2) == [500, 200]
    stats = httpx.get(emulator.url + "/_emulator/stats").json()
    assert stats == emulator.stats()
    assert (stats["requests"], stats["by_status"], stats["charged"]) == (2, {"200": 1, "500": 1}, "1")
    assert stats["keys"][fingerprint(TEST_KEY)] == {"requests": 2, "charged": "1", "remaining": "999"}
    assert httpx.post(emulator.url + "/_emulator/reset").status_code == 200
    assert emulator.stats()["requests"] == 0
    assert emulator.credits(TEST_KEY) == 999
    assert_error(httpx.post(emulator.url + "/_emulator/faults", json={"typo": 1}), 400)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1"])
def test_non_loopback_hosts_are_refused(host: str) -> None:
    with pytest.raises(ValueError, match="allow_remote"):
        Emulator(EmulatorConfig(host=host))


def test_cli_builds_the_config() -> None:
    parser = argparse.ArgumentParser()
    _cli.add_arguments(parser)
    args = parser.parse_args(
        ["--api-key", "a:5", "--api-key", "b:unlimited", "--rpm", "3", "--error-rate", "0.1", "--drop-rate", "0.2"]
    )
    config = _cli.config_from_args(args)
    assert config.keys == {"a": Decimal(5), "b": None}
    assert (config.port, config.rpm, config.faults.error_rate, config.faults.drop_rate) == (8765, 3, 0.1, 0.2)
    assert (config.latency, config.latency_jitter) == (0.0, 0.0)
    assert not config.rate_limit_headers
    assert _cli.config_from_args(parser.parse_args(["--rate-limit-headers"])).rate_limit_headers
    jittery = _cli.config_from_args(parser.parse_args(["--latency", "0.8", "--latency-jitter", "0.2"]))
    assert (jittery.latency, jittery.latency_jitter) == (0.8, 0.2)
    assert _cli.config_from_args(parser.parse_args([])).keys == {"emulator-key": Decimal(1000)}
    assert _cli.run(parser.parse_args(["--host", "0.0.0.0"])) == 2


# -- rendering -------------------------------------------------------------


def test_large_inputs_render_at_full_size() -> None:
    """At the size sent (how fast is the benchmark's business, not a test's)."""
    source = Image.open(io.BytesIO(portrait((1024, 1024))))
    assert Image.open(io.BytesIO(render_normal_map(source))).size == (1024, 1024)
    huge = source.resize((3000, 2000))
    assert Image.open(io.BytesIO(render_normal_map(huge))).size == (3000, 2000)
