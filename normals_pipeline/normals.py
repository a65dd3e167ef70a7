"""Normal maps for training: decode a stored JPEG map into unit vectors and a person mask, in a named convention.

numpy and Pillow only (boto3 through `storage` for `load` from S3): no Dagster, no torch.

**How the maps are read (`"opengl"`).** Red is X, green Y, blue Z, ``rgb = round((n + 1) * 127.5)``; +X points
right, +Y up, +Z toward the viewer, so (128, 128, 255) faces the viewer, the colour the API documents for every
pixel that is not a person. The API's document says only "RGB = XYZ" and names that background colour: the
signs of X and Y are inferred (they match the bundled emulator), not verified against the real service. Decoding
is ``n = rgb - 127.5`` renormalised (the same as ``rgb / 127.5 - 1`` renormalised): JPEG bends the vectors.
Background pixels get exactly "facing the viewer", (0, 0, 1) in ``opengl``, converted to the convention asked for.

**The mask** (True = person). The API draws everything that is not a person as (128, 128, 255), "facing the
viewer", but a JPEG never gives back one exact colour: 4:2:0 chroma subsampling smears colour across a sharp
silhouette (on the tests' maps at quality 75, background pixels next to it are bent by up to ~60°, most by far
less), and a person can face the viewer too: the nose tip inside the face, and the emulator's torso, whose
inside is exactly (128, 128, 255) where it runs off the bottom and side edges. So:

1. *candidates*: pixels within `BACKGROUND_ANGLE` (25°) of +Z. That takes back most of the JPEG ring, and
   stays well below the least tilted silhouette seen (~36°, where the emulator's torso meets a side edge).
2. *reached*: the map in `CELL`×`CELL` (8 px) cells; the cells that are candidates throughout (so a 1 px line
   of tilted normals separates), connected (4-neighbours) to a seed: a cell on the top edge, or on the upper
   half of a side edge, whose centre is within `SEED_ANGLE` (3°) of +Z, the API's flat background. Not the
   bottom edge nor the lower sides: a portrait's torso runs off them and may face the viewer there; its
   silhouette, not the edge, divides it from the background.
3. *background*: the candidate pixels in a reached cell or next to one. A facing region enclosed by the
   person or by its silhouette and the image edge (nose tip, frontal face, torso) is never reached, so it
   stays person, whatever its size.

Everything else is person. Limits, by construction: background not joined to a seed through cells of
candidates (a pocket between an arm and the body, a gap narrower than about two cells, background only on the
lower sides) counts as person; a person's region within 25° of facing the viewer that reaches a seed edge with a
centre within 3° counts as background. Cells, because connecting a few thousand of them takes a few numpy
sweeps, where a per-pixel flood fill is a Python loop (Pillow's `ImageDraw.floodfill` is one).

**Layout.** `decode` returns normals as an H×W×3 view of a channel-planar (3, H, W) float32 array: it is
decoded a channel at a time, and ``normals.transpose(2, 0, 1)`` is then a contiguous C×H×W array (what torch
wants) at no cost. `np.ascontiguousarray(normals)` gives the interleaved layout if something needs it.
"""

from __future__ import annotations

import functools
import io
import os
import urllib.parse
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "CONVENTIONS",
    "BACKGROUND_ANGLE",
    "SEED_ANGLE",
    "CELL",
    "Convention",
    "FACING_ANGLE",
    "InvalidNormalMap",
    "MapQuality",
    "assess",
    "decode",
    "decode_rgb",
    "flip_horizontal",
    "load",
    "resize",
    "to_convention",
]

BACKGROUND_ANGLE = 25.0  # degrees from +Z: a background candidate (see the mask rule)
SEED_ANGLE = 3.0  # degrees from +Z: an edge cell where the background may start
CELL = 8  # px: the grid on which candidates are connected to the edges
FACING_ANGLE = 25.0  # degrees from the viewer: a person pixel that faces the camera (`MapQuality.facing_fraction`)

_JPEG_START, _JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
_COS_ANGLE = np.float32(np.cos(np.radians(BACKGROUND_ANGLE)))
_COS_FACING = np.float32(np.cos(np.radians(FACING_ANGLE)))
_COS_SEED = np.float32(np.cos(np.radians(SEED_ANGLE)))
_HALF = np.float32(127.5)
_BLOCK_PIXELS = 65_536  # pixels per block: their float work (3 × 4 bytes each, 768 KiB) stays in the CPU cache


@dataclass(frozen=True)
class Convention:
    """Where +X, +Y and +Z point (image axes: right, up; depth: toward the viewer), and who uses it."""

    x: str
    y: str
    z: str
    used_by: str
    signs: tuple[int, int, int]  # multiply an opengl vector by these to get this convention's


CONVENTIONS = MappingProxyType(
    {
        "opengl": Convention(
            "right", "up", "toward the viewer", "this project's reading; Marigold, diffusers", (1, 1, 1)
        ),
        "opencv": Convention("right", "down", "into the scene", "the OpenCV camera frame", (1, -1, -1)),
        "omnidata": Convention("right", "down", "into the scene", "Omnidata (OpenCV outward normals)", (1, -1, -1)),
        "dsine": Convention("left", "up", "toward the camera", "DSINE's stored ground truth", (-1, 1, 1)),
    }
)


class InvalidNormalMap(ValueError):
    """The bytes are not a whole, readable JPEG normal map.

    A ValueError and not one of `_errors`' classes: those are outcomes of an API call, recorded in the
    manifest with a code; this is raised later, by training code reading stored bytes, which decides to skip
    the sample or stop, as it would for any other bad value.
    """


def decode(data: bytes, convention: str = "opengl") -> tuple[np.ndarray, np.ndarray]:
    """A JPEG normal map's unit normals (H×W×3 float32, in `convention`) and person mask (H×W bool)."""
    signs = _signs(convention)
    image = _open_jpeg(data)
    width, height = image.size
    # one band at a time straight from Pillow's pixels: 3x faster than split() and np.asarray of each band
    bands = (np.frombuffer(image.tobytes("raw", band), np.uint8).reshape(height, width) for band in "RGB")
    return _decode_planes(tuple(bands), signs)


def decode_rgb(rgb: np.ndarray, convention: str = "opengl") -> tuple[np.ndarray, np.ndarray]:
    """`decode` for a map already decoded to an H×W×3 uint8 array (e.g. from a PNG, or a test's own pixels)."""
    signs = _signs(convention)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 uint8 array, got {rgb.dtype} {rgb.shape}")
    return _decode_planes((rgb[..., 0], rgb[..., 1], rgb[..., 2]), signs)


@dataclass(frozen=True)
class MapQuality:
    """What a trainer wants to know of a map before it trusts it.

    `person_fraction`: share of the pixels in the mask (0 for the flat map the API returns when it finds no
    person). `unit_norm_error`: mean | |n| - 1 | over the person pixels before renormalising, with
    ``n = rgb / 127.5 - 1`` (the map's own encoding): JPEG and a bad map bend vectors off the unit sphere.
    `facing_fraction`: share of the person pixels within `FACING_ANGLE` of the viewer. Both are None without a
    person pixel (the background is drawn, not predicted, so it says nothing of the map).
    """

    person_fraction: float
    unit_norm_error: float | None
    facing_fraction: float | None


def assess(data: bytes) -> MapQuality:
    """A JPEG map's `MapQuality`, from the mask and normals `decode` gives (InvalidNormalMap if unreadable)."""
    image = _open_jpeg(data)
    width, height = image.size
    bands = tuple(np.frombuffer(image.tobytes("raw", band), np.uint8).reshape(height, width) for band in "RGB")
    vectors, mask = _decode_planes(bands, _signs("opengl"))
    person = int(np.count_nonzero(mask))
    if person == 0:
        return MapQuality(0.0, None, None)
    squared = np.zeros(person, dtype=np.float32)
    for band in bands:  # the person's pixels a band at a time: three small gathers, not an N×3 copy
        values = band[mask].astype(np.float32) - _HALF
        squared += values * values
    error = np.abs(np.sqrt(squared) / _HALF - np.float32(1))
    facing = int(np.count_nonzero(vectors[..., 2][mask] > _COS_FACING))
    return MapQuality(person / mask.size, float(error.mean()), facing / person)


def load(uri: str, convention: str = "opengl", *, s3_client: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """`decode` the map at a `file://` or `s3://` URI (a manifest's `normal_map_uri`) or a local path.

    S3 is read through `storage`, as the pipeline reads it: by default one boto3 client per process, which
    takes its endpoint and credentials from the usual AWS variables (`AWS_ENDPOINT_URL`, ...).
    """
    return decode(_read(uri, s3_client), convention)


def to_convention(normals: np.ndarray, target: str, source: str = "opengl") -> np.ndarray:
    """`normals` (...×3) from convention `source` to `target`, as a new float32 array."""
    signs = np.asarray(_signs(source), dtype=np.float32) * _signs(target)
    normals = np.asarray(normals)
    if normals.shape[-1:] != (3,):
        raise ValueError(f"expected normals with a last axis of 3, got shape {normals.shape}")
    return np.multiply(normals, signs, dtype=np.float32)


def resize(normals: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Both to `size` = (width, height), as Pillow counts: normals bilinear then renormalised, mask nearest.

    Pillow's filters share one pixel-centre grid, so the two stay aligned. A resampled vector can only come
    out near zero where neighbours point in opposite directions; it is then left unnormalised, not NaN.
    """
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(normals[..., i], dtype=np.float32), "F").resize(size))
        for i in range(3)
    ]
    resized = np.stack(channels, axis=-1)
    resized /= np.maximum(np.linalg.norm(resized, axis=-1, keepdims=True), np.float32(1e-6))
    small = Image.fromarray(np.asarray(mask, dtype=np.uint8)).resize(size, Image.Resampling.NEAREST)
    return resized, np.asarray(small).astype(bool)


def flip_horizontal(normals: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right and negate X: X is the horizontal axis in every convention here, so this holds in all."""
    flipped = normals[:, ::-1] * np.array([-1, 1, 1], dtype=np.float32)
    return flipped.astype(np.float32, copy=False), mask[:, ::-1].copy()


def _signs(name: str) -> tuple[int, int, int]:
    try:
        return CONVENTIONS[name].signs
    except KeyError:
        raise ValueError(f"unknown convention {name!r}: known are {', '.join(CONVENTIONS)}") from None


def _open_jpeg(data: bytes) -> Image.Image:
    """The decoded RGB image, or InvalidNormalMap; a cut-off file is refused even if Pillow was told to
    accept truncated images (`ImageFile.LOAD_TRUNCATED_IMAGES`), since it would decode to grey."""
    if not data.startswith(_JPEG_START):
        raise InvalidNormalMap(f"not a JPEG normal map (starts with {bytes(data[:8])!r})")
    if _JPEG_END not in data:
        raise InvalidNormalMap("truncated JPEG normal map: the file stops before its end marker")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise InvalidNormalMap(f"unreadable JPEG normal map ({type(error).__name__}: {error})") from None
    if image.mode != "RGB":
        raise InvalidNormalMap(f"a normal map is RGB, this JPEG is {image.mode}")
    return image


def _decode_planes(rgb: tuple[np.ndarray, ...], signs: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals as an H×W×3 view of (3, H, W) float32, and the mask: see the module docstring."""
    planes, background = _unit_planes(rgb)
    _keep_connected(background, rgb)
    person = ~background
    rows = _block_rows(person.shape[1])
    for top in range(0, person.shape[0], rows):
        block = planes[:, top : top + rows]
        block *= person[top : top + rows]
        block[2] += background[top : top + rows]  # (0, 0, 1) on the background
        for plane, sign in zip(block, signs):
            if sign < 0:
                np.negative(plane, out=plane)
    return planes.transpose(1, 2, 0), person


def _unit_planes(rgb: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) unit vectors and the candidates (step 1 of the mask rule).

    Worked in blocks of rows that fit the CPU cache: the float work is then a few passes over a block in
    cache instead of over 12 MB (a 1024×1024 map) in memory.
    """
    height, width = rgb[0].shape
    planes = np.empty((3, height, width), dtype=np.float32)
    candidate = np.empty((height, width), dtype=bool)
    rows = _block_rows(width)
    lengths = np.empty((rows, width), dtype=np.float32)
    for top in range(0, height, rows):
        block = planes[:, top : top + rows]
        length = lengths[: block.shape[1]]
        for plane, channel in zip(block, rgb):
            np.copyto(plane, channel[top : top + rows])  # a plain cast: much faster than a mixed-type subtract
        block -= _HALF
        np.einsum("kij,kij->ij", block, block, out=length)
        np.sqrt(length, out=length)
        np.reciprocal(length, out=length)  # one division per pixel, then multiplications: faster than three
        block *= length
        np.greater(block[2], _COS_ANGLE, out=candidate[top : top + rows])
    return planes, candidate


def _block_rows(width: int) -> int:
    return max(1, _BLOCK_PIXELS // width)


def _keep_connected(candidate: np.ndarray, rgb: tuple[np.ndarray, ...]) -> None:
    """Steps 2 and 3 of the mask rule: clear the candidates that are not in or next to a reached cell."""
    cells = np.asarray(Image.fromarray(candidate.view(np.uint8) * np.uint8(255)).reduce(CELL)) == 255
    far = ~_dilate(_reach(cells, _seeds(cells, rgb)))
    if far.any():
        _clear(candidate, far)


def _seeds(cells: np.ndarray, rgb: tuple[np.ndarray, ...]) -> np.ndarray:
    """Candidate cells on the top edge and the upper half of the side edges whose centre pixel is within
    SEED_ANGLE of +Z."""
    edge = np.zeros_like(cells)
    edge[0] = True
    edge[: (cells.shape[0] + 1) // 2, [0, -1]] = True
    rows, cols = np.nonzero(edge & cells)
    height, width = rgb[0].shape
    centres = (np.minimum(rows * CELL + CELL // 2, height - 1), np.minimum(cols * CELL + CELL // 2, width - 1))
    vectors = np.stack([channel[centres] for channel in rgb], axis=-1).astype(np.float32) - _HALF
    facing = vectors[:, 2] > _COS_SEED * np.linalg.norm(vectors, axis=-1)
    seeds = np.zeros_like(cells)
    seeds[rows[facing], cols[facing]] = True
    return seeds


def _clear(pixels: np.ndarray, cells: np.ndarray) -> None:
    """Set False the pixels of the True cells, working within those cells' bounding box only."""
    rows, cols = np.nonzero(cells.any(axis=1))[0], np.nonzero(cells.any(axis=0))[0]
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    block = np.repeat(np.repeat(cells[top:bottom, left:right], CELL, axis=0), CELL, axis=1)
    window = pixels[top * CELL : bottom * CELL, left * CELL : right * CELL]
    window &= ~block[: window.shape[0], : window.shape[1]]


def _reach(candidate: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Candidate cells connected (4-neighbours) to a seed cell.

    Sweeps that spread along whole runs of candidate cells, along rows then columns, until nothing changes:
    a few sweeps over a few thousand cells, where a per-pixel flood fill would be a Python loop.
    """
    sweeps = [(runs, np.zeros(int(runs.max()) + 1, dtype=bool)) for runs in (_runs(candidate), _runs(candidate.T).T)]
    reached = seed
    count = -1
    while count != (count := int(np.count_nonzero(reached))):
        for runs, hit in sweeps:
            hit[runs[reached]] = True
            hit[0] = False  # 0: not a candidate
            reached = hit[runs]
    return reached


def _runs(candidate: np.ndarray) -> np.ndarray:
    """A number per run of candidate cells within a row (1, 2, ...), 0 for the other cells."""
    starts = candidate.copy()
    starts[:, 1:] &= ~candidate[:, :-1]
    return np.where(candidate, np.cumsum(starts).reshape(candidate.shape), 0)


def _dilate(cells: np.ndarray) -> np.ndarray:
    """The cells and their 8 neighbours."""
    rows = cells.copy()
    rows[1:] |= cells[:-1]
    rows[:-1] |= cells[1:]
    grown = rows.copy()
    grown[:, 1:] |= rows[:, :-1]
    grown[:, :-1] |= rows[:, 1:]
    return grown


def _read(uri: str, s3_client: Any) -> bytes:
    """The bytes at a file:// or s3:// URI (or a local path), read through `storage`."""
    from .storage import open_storage  # boto3 is imported only by code that reads files

    parent, _, name = uri.rpartition("/")
    scheme = urllib.parse.urlsplit(uri).scheme.lower() if "://" in uri else ""
    if not name or not parent:
        raise ValueError(f"expected the URI of a file, got {uri!r}")
    if scheme == "file":
        name = urllib.parse.unquote(name)  # as Path.as_uri() wrote it
    if scheme == "s3" and s3_client is None:
        s3_client = _default_s3_client(os.getpid())
    return open_storage(parent, s3_client=s3_client).read_bytes(name)


@functools.cache
def _default_s3_client(pid: int) -> Any:
    """One client per process: creating one costs tens of ms, and a client must not cross a fork."""
    import boto3

    from .storage import s3_config

    return boto3.client("s3", config=s3_config())
