"""A deterministic stand-in for Clipdrop's portrait surface-normals model.

It is no neural network: it finds the person as "whatever differs from the
background", inflates that silhouette into a smooth dome and differentiates it.
The output has the right size, format and encoding, which is what clients and
tests need.

Convention (OpenGL style, camera frame): +X points right, +Y points up, +Z points
toward the viewer. Pixels are encoded ``rgb = round((n + 1) * 127.5)``, so a
normal facing the viewer is (128, 128, 255), the value the API documents for
every non-person pixel; decode with ``n = rgb / 127.5 - 1``. Image rows grow
downwards, so the Y component is the *negated* row derivative of the surface.

The map is in the stored pixel grid of the input: no EXIF transpose.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["BACKGROUND_RGB", "render_normal_map"]

BACKGROUND_RGB = (128, 128, 255)
_TOLERANCE = 30.0  # RGB (Euclidean) distance from the background model
_MASK_MAX_PIXELS = 2_000_000  # above this the mask is computed on a reduced copy
_SURFACE_MAX_SIDE = 256  # the height field is smooth: a small grid is enough
_RELIEF = 0.35  # dome height as a fraction of the image's short side
_JPEG_QUALITY = 90


def render_normal_map(image: Image.Image) -> bytes:
    """Return a JPEG normal map with the same width x height as ``image``."""
    size = image.size
    work = _working_copy(image)
    mask = _foreground_mask(work)
    encoded = np.where(mask[..., None], _encode(_normals(mask)), np.uint8(BACKGROUND_RGB))
    result = Image.fromarray(encoded.astype(np.uint8), "RGB")
    if result.size != size:
        result = result.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    result.save(buffer, "JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def _working_copy(image: Image.Image) -> Image.Image:
    """Reduce huge inputs (up to 25 MP) so the server answers quickly."""
    factor = int(np.ceil(np.sqrt(image.width * image.height / _MASK_MAX_PIXELS)))
    if factor > 1:
        image = image.reduce(factor)
    return image


def _foreground_mask(image: Image.Image) -> np.ndarray:
    """Pixels far from a background model fitted to the border, de-speckled."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    distance = np.linalg.norm(rgb - _background_model(rgb), axis=2)
    mask = distance > _TOLERANCE
    if "A" in image.getbands():
        mask &= np.asarray(image.getchannel("A")) >= 128
    radius = max(1.0, 0.004 * min(image.size))
    smoothed = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(smoothed) >= 128


def _background_model(rgb: np.ndarray) -> np.ndarray:
    """Fit colour = a + b*x + c*y to the border pixels, ignoring outliers.

    A plane rather than one median colour, so gradient backdrops work too; the
    median seeds the fit so shoulders touching the border do not skew it.
    """
    height, width, _ = rgb.shape
    border = np.zeros((height, width), dtype=bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    rows, cols = np.nonzero(border)
    colours = rgb[border]
    design = np.column_stack([np.ones(len(rows)), cols / width, rows / height])
    coefficients = np.vstack([np.median(colours, axis=0), np.zeros((2, 3))])
    for _ in range(2):
        inliers = np.linalg.norm(colours - design @ coefficients, axis=1) <= _TOLERANCE
        if inliers.sum() >= 3:
            coefficients, *_ = np.linalg.lstsq(design[inliers], colours[inliers], rcond=None)
    x = (np.arange(width) / width)[None, :, None]
    y = (np.arange(height) / height)[:, None, None]
    return (coefficients[0] + coefficients[1] * x + coefficients[2] * y).astype(np.float32)


def _normals(mask: np.ndarray) -> np.ndarray:
    """Unit normals (H x W x 3) of a dome inflated from the silhouette."""
    height, width = mask.shape
    surface = _height_field(mask) * _RELIEF * min(height, width)
    d_row, d_col = np.gradient(surface)
    # z = H(x, Y) with Y = -row: n ∝ (-dH/dx, -dH/dY, 1) = (-dH/dcol, +dH/drow, 1).
    normals = np.stack([-d_col, d_row, np.ones_like(surface)], axis=2)
    return normals / np.linalg.norm(normals, axis=2, keepdims=True)


def _height_field(mask: np.ndarray) -> np.ndarray:
    """Blurred silhouette at two scales, on a small grid, upscaled bicubically."""
    height, width = mask.shape
    scale = min(1.0, _SURFACE_MAX_SIDE / max(height, width))
    small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    coverage = Image.fromarray(mask.astype(np.uint8) * 255).resize(small_size, Image.Resampling.BOX)
    m = np.asarray(coverage, dtype=np.float64) / 255.0
    short = min(m.shape)
    h = 0.5 * _blur(m, 0.03 * short) + 0.5 * _blur(m, 0.12 * short)
    h = np.sqrt(np.clip(h, 0.0, 1.0)).astype(np.float32)
    return np.asarray(Image.fromarray(h, "F").resize((width, height), Image.Resampling.BICUBIC))


def _blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur as two small matrix products, renormalised at the edges.

    Pillow cannot blur float images and 8-bit blurs leave steps that show up in
    the derivative; on a grid this small the dense kernels are cheap.
    """
    return _kernel(values.shape[0], sigma) @ values @ _kernel(values.shape[1], sigma).T


def _kernel(n: int, sigma: float) -> np.ndarray:
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    weights = np.exp(-0.5 * (offsets / max(sigma, 0.5)) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


def _encode(normals: np.ndarray) -> np.ndarray:
    return np.clip(np.round((normals + 1.0) * 127.5), 0, 255).astype(np.uint8)
