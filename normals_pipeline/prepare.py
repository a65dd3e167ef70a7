"""Image preparation: decide, from the header alone, whether the API would accept a file.

A file the API would refuse is never sent. Files it accepts are sent as they are: decoding and
re-encoding would cost as much CPU as the whole rest of the client and change the pixels.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ._errors import ImageRejected

MAX_PIXELS = 25_000_000
MAX_BYTES = 30 * 1024 * 1024
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


@dataclass(frozen=True)
class PreparedImage:
    data: bytes
    content_type: str
    width: int
    height: int


def _reject(code: str, message: str) -> ImageRejected:
    return ImageRejected(message, error_code=code)


def prepare(data: bytes) -> PreparedImage:
    """Check format, pixel count and size without decoding pixels; raise `ImageRejected` with a code."""
    if not data:
        raise _reject("empty_file", "the file is empty")
    if len(data) > MAX_BYTES:
        raise _reject("file_too_large", f"{len(data)} bytes is over the API's 30 MB limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        raise _reject("too_many_pixels", "far over the API's 25 megapixel limit (decompression bomb)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise _reject("unreadable_image", f"not a readable image ({type(error).__name__})") from None
    if fmt not in CONTENT_TYPES:
        raise _reject("unsupported_format", f"{fmt} is not accepted (PNG, JPEG or WEBP only)")
    if width * height > MAX_PIXELS:
        raise _reject("too_many_pixels", f"{width}x{height} is over the API's 25 megapixel limit")
    return PreparedImage(data, CONTENT_TYPES[fmt], width, height)
