"""normals: decode and mask on JPEG-compressed synthetic maps with known normals, conventions, resize, flip, load."""

from __future__ import annotations

import io
import random
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageFile

from normals_pipeline.emulator._normals import _foreground_mask, render_normal_map
from normals_pipeline.normals import (
    CONVENTIONS,
    FACING_ANGLE,
    InvalidNormalMap,
    MapQuality,
    assess,
    decode,
    decode_rgb,
    flip_horizontal,
    load,
    resize,
    to_convention,
)
from normals_pipeline.synthetic import _portrait as _synthetic_portrait

SIZE = 512
QUALITIES = (75, 90, 95)  # Pillow's default subsampling for RGB JPEG is 4:2:0, as the API's output
MAX_MEAN_ERROR_DEG = {75: 2.0, 90: 1.5, 95: 1.5}  # measured 1.42, 1.07, 0.96 (see the README)


def _ellipsoid(size: tuple[int, int], centre: tuple[float, float], axes: tuple[float, float, float]) -> tuple:
    """Unit normals (opengl: +X right, +Y up, +Z toward the viewer) of an ellipsoid's front, and its silhouette."""
    width, height = size
    (cx, cy), (a, b, c) = centre, axes
    x = (np.arange(width) - cx)[None, :] / a
    y = -(np.arange(height) - cy)[:, None] / b  # image rows grow downwards, +Y is up
    inside = x**2 + y**2 < 1
    z = np.sqrt(np.clip(1 - x**2 - y**2, 0, None))
    normals = np.stack(np.broadcast_arrays(x / a, y / b, z / c), axis=-1)
    return normals / np.linalg.norm(normals, axis=-1, keepdims=True), inside


def _portrait(width: int = SIZE, height: int = SIZE, nose: float = 0.025) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A head on a neck in front of a torso that runs off the bottom edge (and faces the viewer there), on the
    API's background; the nose tip (a disc of radius `nose` × width) faces the viewer exactly.
    Normals, mask, nose tip."""
    normals = np.zeros((height, width, 3))
    normals[..., 2] = 1
    torso, torso_mask = _ellipsoid(
        (width, height), (width * 0.5, height - 1), (width * 0.42, height * 0.35, width * 0.3)
    )
    head, head_mask = _ellipsoid(
        (width, height), (width * 0.5, height * 0.38), (width * 0.19, height * 0.25, width * 0.2)
    )
    neck, neck_mask = _cylinder((width, height), width * 0.5, width * 0.08, (height * 0.5, height * 0.8))
    for part, mask in ((torso, torso_mask), (neck, neck_mask), (head, head_mask)):  # back to front
        normals[mask] = part[mask]
    rows, cols = np.mgrid[:height, :width]
    tip = (cols - width * 0.5) ** 2 + (rows - height * 0.45) ** 2 <= max(1.0, width * nose) ** 2
    normals[tip] = (0, 0, 1)
    return normals.astype(np.float32), torso_mask | neck_mask | head_mask, tip


def _cylinder(size: tuple[int, int], centre: float, radius: float, rows: tuple[float, float]) -> tuple:
    """A vertical cylinder's front between two rows: normals (x, 0, sqrt(1 - x²)), and its silhouette."""
    width, height = size
    x = np.broadcast_to(((np.arange(width) - centre) / radius)[None, :], (height, width))
    row = np.arange(height)[:, None]
    inside = (np.abs(x) < 1) & (row >= rows[0]) & (row < rows[1])
    normals = np.stack([x, np.zeros_like(x), np.sqrt(np.clip(1 - x**2, 0, None))], axis=-1)
    return normals, inside


def _rgb(normals: np.ndarray) -> np.ndarray:
    """The API's encoding, as the emulator does it."""
    return np.clip(np.round((normals + 1) * 127.5), 0, 255).astype(np.uint8)


def _jpeg(normals: np.ndarray, quality: int = 90, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_rgb(normals)).convert(mode).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip((a * b).sum(axis=-1), -1.0, 1.0)))


# --- decode and mask on JPEG maps --------------------------------------------------------------------


@pytest.mark.parametrize("quality", QUALITIES)
def test_mask_and_normals_survive_jpeg(quality: int, record_property: Any) -> None:
    truth, true_mask, tip = _portrait()
    normals, mask = decode(_jpeg(truth, quality))
    iou = _iou(mask, true_mask)
    error = float(_angles(normals, truth)[true_mask].mean())
    record_property("mask_iou", round(iou, 4))
    record_property("mean_angular_error_deg", round(error, 2))
    print(f"\nq{quality}: mask IoU {iou:.4f}, mean angular error over person pixels {error:.2f}°")
    assert iou >= 0.98
    assert mask[tip].all(), "the nose tip faces the viewer, but it is the person's"
    assert mask[-1, SIZE // 2], "the torso faces the viewer at the bottom edge, but it is the person's"
    assert error <= MAX_MEAN_ERROR_DEG[quality]


@pytest.mark.parametrize("seed", range(6))
def test_mask_of_the_emulators_maps(seed: int) -> None:
    """The emulator's torso faces the viewer exactly where it runs off the bottom and side edges (seeds 0 and 1
    touch a side): only its silhouette divides it from the background, and the mask must follow that."""
    portrait = _synthetic_portrait(random.Random(seed)).convert("RGB")
    _, mask = decode(render_normal_map(portrait))
    assert _iou(mask, _foreground_mask(portrait)) >= 0.98


# --- quality figures ---------------------------------------------------------------------------------


def test_assess_measures_a_portrait_by_its_own_definitions() -> None:
    truth, true_mask, _ = _portrait()
    data = _jpeg(truth, 90)
    quality = assess(data)
    normals, mask = decode(data)
    rgb = np.asarray(Image.open(io.BytesIO(data))).astype(np.float64)[mask]
    assert quality.person_fraction == pytest.approx(mask.mean())
    assert quality.person_fraction == pytest.approx(true_mask.mean(), abs=0.01)
    expected_error = np.abs(np.linalg.norm(rgb / 127.5 - 1, axis=-1) - 1).mean()
    assert quality.unit_norm_error == pytest.approx(expected_error, rel=1e-4)
    assert 0 < quality.unit_norm_error < 0.05  # JPEG only bends the vectors a little
    facing = (normals[mask][:, 2] > np.cos(np.radians(FACING_ANGLE))).mean()
    assert quality.facing_fraction == pytest.approx(facing)
    truth_facing = (truth[true_mask][:, 2] > np.cos(np.radians(FACING_ANGLE))).mean()
    assert quality.facing_fraction == pytest.approx(truth_facing, abs=0.03)


def test_assess_a_flat_map_and_one_off_the_unit_sphere() -> None:
    flat = np.zeros((96, 64, 3))
    flat[..., 2] = 1
    assert assess(_jpeg(flat)) == MapQuality(0.0, None, None)
    truth, _, _ = _portrait(128, 128)
    short = Image.fromarray((_rgb(truth).astype(np.float64) * 0.5 + 64).astype(np.uint8))  # |n| about 0.5
    buffer = io.BytesIO()
    short.save(buffer, "JPEG", quality=95)
    quality = assess(buffer.getvalue())
    assert quality.person_fraction > 0.1 and quality.unit_norm_error > 0.4


def test_a_close_up_whose_head_covers_the_top_edge() -> None:
    """No background on the top edge: it is reached from the upper half of the side edges."""
    truth = np.zeros((SIZE, SIZE, 3))
    truth[..., 2] = 1
    head, mask = _ellipsoid((SIZE, SIZE), (SIZE * 0.5, SIZE * 0.1), (SIZE * 0.6, SIZE * 0.5, SIZE * 0.4))
    truth[mask] = head[mask]
    assert mask[0].all() and not mask[SIZE // 2, 0]
    _, decoded = decode(_jpeg(truth.astype(np.float32), 75))
    assert _iou(decoded, mask) >= 0.98


def test_a_facing_spot_of_any_size_inside_the_person_is_person() -> None:
    truth, _, tip = _portrait(nose=0.004)  # a 2 px radius
    _, mask = decode(_jpeg(truth, 75))
    assert mask[tip].all()


def test_output_is_unit_float32_with_a_free_channel_first_view() -> None:
    normals, mask = decode(_jpeg(_portrait(320, 240)[0]))
    assert normals.shape == (240, 320, 3) and normals.dtype == np.float32
    assert mask.shape == (240, 320) and mask.dtype == bool
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-5)
    assert normals.transpose(2, 0, 1).flags.c_contiguous


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_background_is_exactly_facing_the_viewer_in_each_convention(convention: str) -> None:
    blank = np.zeros((64, 96, 3), dtype=np.float32)
    blank[..., 2] = 1
    normals, mask = decode(_jpeg(blank, 75), convention)
    assert not mask.any()
    expected = to_convention(np.array([0, 0, 1], dtype=np.float32), convention)
    assert (normals == expected).all()


def test_decode_rgb_matches_decode_of_the_same_pixels() -> None:
    data = _jpeg(_portrait(256, 256)[0], 90)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for got, want in zip(decode_rgb(rgb, "opencv"), decode(data, "opencv")):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="uint8"):
        decode_rgb(rgb.astype(np.float32))


# --- conventions -------------------------------------------------------------------------------------


def _sphere(size: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """A sphere filling the map, as the API would encode it (lossless here): its opengl normals and mask."""
    normals, inside = _ellipsoid((size, size), (size // 2, size // 2), (size / 2, size / 2, size / 2))
    normals[~inside] = (0, 0, 1)
    return normals.astype(np.float32), inside


@pytest.mark.parametrize(
    ("convention", "right", "top", "centre"),
    [
        ("opengl", (1, 0, 0), (0, 1, 0), (0, 0, 1)),
        ("opencv", (1, 0, 0), (0, -1, 0), (0, 0, -1)),
        ("omnidata", (1, 0, 0), (0, -1, 0), (0, 0, -1)),
        ("dsine", (-1, 0, 0), (0, 1, 0), (0, 0, 1)),
    ],
)
def test_each_convention_on_a_sphere(convention: str, right: tuple, top: tuple, centre: tuple) -> None:
    """The sphere's rightmost point is +X in opengl, -X in dsine; its top is -Y in opencv; its centre faces us."""
    truth, _ = _sphere()
    normals, _ = decode_rgb(_rgb(truth), convention)
    middle, last = truth.shape[0] // 2, truth.shape[0] - 1
    for (row, col), expected in (((middle, last), right), ((0, middle), top), ((middle, middle), centre)):
        assert normals[row, col] @ expected > 0.98  # within 12°: the outermost pixel is not exactly on the rim
        assert to_convention(truth[row, col], convention) @ expected > 0.98


@given(
    hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=1, max_dims=3).map(lambda s: (*s, 3)), elements=st.floats(-1, 1, width=32)
    ),
    st.sampled_from(list(CONVENTIONS)),
    st.sampled_from(list(CONVENTIONS)),
    st.sampled_from(list(CONVENTIONS)),
)
def test_conversions_round_trip_and_compose(vectors: np.ndarray, a: str, b: str, c: str) -> None:
    there = to_convention(vectors, b, source=a)
    assert there.dtype == np.float32 and there.shape == vectors.shape
    np.testing.assert_array_equal(to_convention(there, a, source=b), vectors)
    np.testing.assert_array_equal(to_convention(there, c, source=b), to_convention(vectors, c, source=a))


def test_every_pair_of_conventions_round_trips_the_sphere() -> None:
    truth, _ = _sphere()
    for a, b in product(CONVENTIONS, repeat=2):
        np.testing.assert_array_equal(to_convention(to_convention(truth, b, a), a, b), truth)


def test_unknown_convention_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="opengl, opencv, omnidata, dsine"):
        to_convention(np.zeros(3), "blender")
    with pytest.raises(ValueError, match="known are"):
        decode(_jpeg(_sphere()[0]), "y-up")


# --- resize and flip ---------------------------------------------------------------------------------


def test_resize_keeps_unit_length_and_alignment() -> None:
    normals, mask = decode(_jpeg(_portrait()[0], 95))
    small_normals, small_mask = resize(normals, mask, (256, 256))
    truth, true_mask, _ = _portrait(256, 256)  # the same portrait drawn at the new size
    np.testing.assert_allclose(np.linalg.norm(small_normals, axis=-1), 1.0, atol=1e-5)
    assert _iou(small_mask, true_mask) >= 0.97
    assert _angles(small_normals, truth)[true_mask].mean() < 3.0  # a misaligned resize would be far off here


def test_resize_takes_width_then_height_as_pillow_does() -> None:
    normals, mask = decode(_jpeg(_portrait(200, 100)[0]))
    small_normals, small_mask = resize(normals, mask, (60, 40))
    assert small_normals.shape == (40, 60, 3) and small_normals.dtype == np.float32
    assert small_mask.shape == (40, 60) and small_mask.dtype == bool


def test_flip_mirrors_and_negates_x() -> None:
    normals, mask = decode(_jpeg(_portrait(128, 96)[0]))
    flipped, flipped_mask = flip_horizontal(normals, mask)
    np.testing.assert_array_equal(flipped_mask, mask[:, ::-1])
    np.testing.assert_array_equal(flipped[..., 0], -normals[:, ::-1, 0])
    np.testing.assert_array_equal(flipped[..., 1:], normals[:, ::-1, 1:])
    assert flipped.dtype == np.float32
    # a mirrored sphere has the same shape: its flipped normals are its own normals
    truth, _ = _sphere()
    np.testing.assert_allclose(flip_horizontal(truth, mask[:101, :101])[0], truth, atol=1e-6)


# --- load --------------------------------------------------------------------------------------------


def test_load_from_a_file_uri(tmp_path: Path) -> None:
    path = tmp_path / "a map é.jpg"  # as_uri() percent-encodes this name
    data = _jpeg(_portrait(128, 128)[0])
    path.write_bytes(data)
    for got, want in zip(load(path.as_uri(), "dsine"), decode(data, "dsine")):
        np.testing.assert_array_equal(got, want)


def test_load_refuses_what_is_not_a_stored_map(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load((tmp_path / "missing.jpg").as_uri())
    with pytest.raises(ValueError, match="unsupported storage URI scheme"):
        load("https://example.com/map.jpg")
    (tmp_path / "error.jpg").write_bytes(b'{"error": "Invalid api key"}')
    with pytest.raises(InvalidNormalMap):
        load(str(tmp_path / "error.jpg"))


def test_load_from_s3(s3_client: Any, s3_bucket: str) -> None:
    data = _jpeg(_portrait(128, 128)[0])
    s3_client.put_object(Bucket=s3_bucket, Key="normals/ab/abc.jpg", Body=data)
    uri = f"s3://{s3_bucket}/normals/ab/abc.jpg"
    expected = decode(data)
    for got, want in zip(load(uri), expected):  # the default client: endpoint from AWS_ENDPOINT_URL
        np.testing.assert_array_equal(got, want)
    for got, want in zip(load(uri, s3_client=s3_client), expected):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(FileNotFoundError):
        load(f"s3://{s3_bucket}/normals/missing.jpg", s3_client=s3_client)


# --- bad input ---------------------------------------------------------------------------------------


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_rgb(_sphere()[0])).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a JPEG"),
        (b'{"error": "No api key provided"}', "not a JPEG"),
        (_png(), "not a JPEG"),
        (_jpeg(_sphere()[0])[:-400], "truncated"),
        (_jpeg(_sphere()[0])[:300] + b"\xff\xd9", "unreadable"),
        (_jpeg(_sphere()[0], mode="L"), "is L"),
    ],
    ids=["empty", "json", "png", "truncated", "corrupt", "grey"],
)
def test_bad_bytes_raise_invalid_normal_map(data: bytes, message: str) -> None:
    with pytest.raises(InvalidNormalMap, match=message) as caught:
        decode(data)
    assert isinstance(caught.value, ValueError)


def test_truncated_map_is_refused_even_when_pillow_accepts_truncated_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(InvalidNormalMap, match="truncated"):
        decode(_jpeg(_sphere()[0])[:-400])
