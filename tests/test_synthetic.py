"""Synthetic portraits: deterministic, varied in the ways the pipeline must handle, and segmentable."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normals_pipeline.emulator import BACKGROUND_RGB, render_normal_map
from normals_pipeline.synthetic import contact_sheet, make_portraits


def test_portraits_are_deterministic(tmp_path: Path) -> None:
    first = make_portraits(tmp_path / "a", 4, seed=3)
    second = make_portraits(tmp_path / "b", 4, seed=3)
    assert [p.relative_to(tmp_path / "a") for p in first] == [p.relative_to(tmp_path / "b") for p in second]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert [p.read_bytes() for p in make_portraits(tmp_path / "c", 4, seed=4)] != [p.read_bytes() for p in first]


def test_portraits_cover_formats_sizes_and_awkward_names(tmp_path: Path) -> None:
    paths = make_portraits(tmp_path, 6)
    formats = {Image.open(path).format for path in paths}
    assert formats == {"JPEG", "PNG", "WEBP"}
    assert any(path.parent != tmp_path for path in paths)
    assert any(" " in path.name and not path.name.isascii() for path in paths)
    for path in paths:
        assert all(384 <= side <= 768 for side in Image.open(path).size)


def test_emulator_separates_the_person_from_the_backdrop(tmp_path: Path) -> None:
    for path in make_portraits(tmp_path, 6, seed=1):
        source = Image.open(path)
        normals = np.asarray(Image.open(io.BytesIO(render_normal_map(source))), dtype=np.int16)
        assert np.abs(normals[2, 2] - BACKGROUND_RGB).max() <= 4, path.name
        tilted = np.abs(normals - BACKGROUND_RGB).max(axis=2) > 20
        assert 0.1 < tilted.mean() < 0.7, path.name


def test_contact_sheet_has_one_labelled_row_per_pair(tmp_path: Path) -> None:
    image = Image.new("RGB", (300, 600), "white")
    out = contact_sheet([(image, image, "one"), (image, image, "café")], tmp_path / "sheets" / "sheet.png")
    sheet = Image.open(out)
    assert sheet.format == "PNG"
    assert 2 * 256 < sheet.height < 2 * 320
    assert sheet.width >= 2 * 128
    with pytest.raises(ValueError):
        contact_sheet([], tmp_path / "empty.png")
