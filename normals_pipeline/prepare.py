"""Image preparation: make every image something the API accepts, before a credit is spent on it.

The API takes PNG, JPEG or WEBP, at most 25 megapixels and 30 MB. A file it accepts as it is goes out
as it is (the same bytes object, `steps == ()`): decoding and re-encoding would cost as much CPU as the
whole rest of the client and change the pixels, so that path reads headers, metadata and the file's
last bytes only. Anything else Pillow can read is decoded once, fixed and re-encoded, and `steps` says
what was done. The rest is refused with a stable `error_code`:

    empty_file          no bytes at all
    file_too_large      over MAX_INPUT_BYTES: not even opened
    unreadable_image    not an image, or Pillow cannot decode it
    truncated_image     the file stops before its image data does
    too_many_pixels     over BOMB_PIXELS (never decoded), or over MAX_PIXELS with oversize="refuse"
    unsupported_format  a format only an external program decodes (EPS runs Ghostscript)

Converted images are 8-bit RGB or RGBA: JPEG quality 92 when opaque, PNG when they have alpha; only an
RGB ICC profile is carried over, EXIF never is (its orientation has been applied to the pixels).
"""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageFile

from ._errors import ImageRejected

MAX_PIXELS = 25_000_000
MAX_BYTES = 30_000_000  # "30 Mb": the smaller reading, so no file is refused for 1 MiB of ambiguity
CONTENT_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
BOMB_PIXELS = 4 * MAX_PIXELS  # more than this in the header is refused unread, even with oversize="downscale"
MAX_INPUT_BYTES = 200_000_000
JPEG_QUALITY = 92

Oversize = Literal["downscale", "refuse"]
Ending = Literal["complete", "trailing", "truncated"]

_JPEG_START, _JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
_PNG_START, _PNG_END = b"\x89PNG\r\n\x1a\n", b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PADDING = b"\x00\t\n\r "
_UNSAFE_FORMATS = {"EPS"}  # Pillow decodes it by running Ghostscript on the file
_DEEP_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_GRAY_MODES = {"1", "L", "LA", "La"} | _DEEP_MODES
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
# ImageOps.exif_transpose's table, applied after downscaling so only the small image is turned.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@dataclass(frozen=True)
class PreparedImage:
    """What to send. `width`/`height` are those of the image sent (and of its normal map);
    `source_width`/`source_height` those in the original header. `steps == ()` means `data` is the
    caller's own bytes object."""

    data: bytes
    content_type: str
    width: int
    height: int
    steps: tuple[str, ...] = ()
    source_width: int = field(kw_only=True)
    source_height: int = field(kw_only=True)


def prepare(data: bytes, *, oversize: Oversize = "downscale") -> PreparedImage:
    """The file as the API should receive it, or `ImageRejected` with a code (see the module docstring)."""
    if not data:
        raise _reject("empty_file", "the file is empty")
    if len(data) > MAX_INPUT_BYTES:
        raise _reject("file_too_large", f"{len(data)} bytes is over the {MAX_INPUT_BYTES} accepted")
    ending = _ending(data)
    if ending == "truncated":
        raise _reject("truncated_image", "the file stops before its image data ends")
    with _pillow_errors(), _open(data) as image:
        width, height = image.size
        _check_pixels(width, height, oversize)
        orientation = _orientation(image, data)
        steps = _planned_steps(image, data, orientation)
        if steps or len(data) > MAX_BYTES:
            return _convert(image, steps, orientation)
        if ending == "trailing":
            image.load()  # bytes after the end marker: decode once to be sure the image itself is whole
        return PreparedImage(data, CONTENT_TYPES[image.format], width, height, source_width=width, source_height=height)


def _reject(code: str, message: str) -> ImageRejected:
    return ImageRejected(message, error_code=code)


def _ending(data: bytes) -> Ending | None:
    """How a JPEG, PNG or WEBP ends, from its last bytes: a cut-off copy is refused without decoding."""
    if data.startswith(_JPEG_START):
        return _marker_ending(data, _JPEG_END)
    if data.startswith(_PNG_START):
        return _marker_ending(data, _PNG_END)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        extra = len(data) - 8 - int.from_bytes(data[4:8], "little")
        return "truncated" if extra < 0 else "complete" if extra <= 1 else "trailing"  # 1: a pad byte
    return None


def _marker_ending(data: bytes, marker: bytes) -> Ending:
    """'trailing' when the end marker is followed by more than padding, as in phones' motion photos."""
    if data[-1024:].rstrip(_PADDING).endswith(marker):
        return "complete"
    return "trailing" if marker in data else "truncated"


@contextmanager
def _pillow_errors() -> Iterator[None]:
    """What Pillow raises on bad input, as the manifest's codes; anything else is a bug and propagates."""
    try:
        yield
    except Image.DecompressionBombError:
        raise _reject("too_many_pixels", "far over the API's 25 megapixel limit (decompression bomb)") from None
    except Image.UnidentifiedImageError:  # Pillow's message names the in-memory file by its address
        raise _reject("unreadable_image", f"cannot identify image file: {_NOT_AN_IMAGE}") from None
    except _PILLOW_ERRORS as error:
        code = "truncated_image" if "truncated" in str(error).lower() else "unreadable_image"
        raise _reject(code, f"not a readable image ({type(error).__name__}: {_plain(error)})") from None


_NOT_AN_IMAGE = "not a PNG, JPEG, WEBP or other image format Pillow reads"
_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")  # e.g. <_io.BytesIO object at 0x7f42e94245e0>


def _plain(error: BaseException) -> str:
    """The error's text with any object repr (which holds a memory address: different on every run, and
    meaningless to whoever reads the manifest) said as "the file"."""
    return " ".join(_OBJECT_REPR.sub("the file", str(error)).split()) or "no details"


def _open(data: bytes) -> ImageFile.ImageFile:
    """Header only. Pillow's own bomb warning is noise: BOMB_PIXELS is checked right after."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _check_pixels(width: int, height: int, oversize: Oversize) -> None:
    """From the header, before any decode: a bomb would cost gigabytes before it could be downscaled."""
    pixels = width * height
    if pixels > BOMB_PIXELS or (pixels > MAX_PIXELS and oversize == "refuse"):
        raise _reject("too_many_pixels", f"{width}x{height} is over the API's 25 megapixel limit")


def _orientation(image: ImageFile.ImageFile, data: bytes) -> int:
    """EXIF (or XMP) orientation, 1 when absent. PNG's getexif() decodes the whole image to look for an
    eXIf chunk after the pixels, so unless one is there (searched for from the last IDAT chunk on, which
    is cheap) the metadata-only base version is used. A damaged EXIF block is no reason to refuse pixels."""
    header_only = image.format == "PNG" and "exif" not in image.info
    header_only = header_only and data.find(b"eXIf", data.rfind(b"IDAT")) < 0
    try:
        exif = Image.Image.getexif(image) if header_only else image.getexif()
    except SyntaxError:  # "not a TIFF file": the block's header is broken
        return 1
    orientation = exif.get(ExifTags.Base.Orientation, 1)
    return orientation if isinstance(orientation, int) and orientation in _TRANSPOSE else 1


def _planned_steps(image: ImageFile.ImageFile, data: bytes, orientation: int) -> list[str]:
    """What must change for the API to accept the image, read from the header; [] means send as is."""
    fmt = image.format or "unknown"
    if fmt in _UNSAFE_FORMATS:
        raise _reject("unsupported_format", f"{fmt} is only decoded by running an external program")
    steps = [] if fmt in CONTENT_TYPES else [f"converted_from_{fmt.lower()}"]
    if fmt != "MPO" and getattr(image, "is_animated", False):  # MPO: a JPEG with a preview image after it
        steps.append("first_frame")
    steps += _mode_steps(image, data)
    if image.width * image.height > MAX_PIXELS:
        steps.append("downscaled")
    if orientation != 1:
        steps.append("exif_transpose")
    return steps


def _mode_steps(image: ImageFile.ImageFile, data: bytes) -> list[str]:
    """Pixel-format steps: the result is always 8-bit RGB, or RGBA when there is any transparency."""
    mode = image.mode
    deep_png = image.format == "PNG" and data[24] != 8 and mode not in {"P", "PA"}  # IHDR bit depth
    needed = {
        "cmyk_to_rgb": mode == "CMYK",
        "to_8bit": mode in _DEEP_MODES or mode == "1" or deep_png,
        "palette_to_rgb": mode in {"P", "PA"},
        "gray_to_rgb": mode in _GRAY_MODES,
        "transparency": "transparency" in image.info or mode in _ALPHA_MODES - {"RGBA"},
    }
    return [step for step, is_needed in needed.items() if is_needed]


def _convert(image: ImageFile.ImageFile, steps: list[str], orientation: int) -> PreparedImage:
    """Decode once, apply the steps, encode; re-encode smaller while over MAX_BYTES."""
    source_width, source_height = image.size
    icc = image.info.get("icc_profile")
    icc = icc if icc and icc[16:20] == b"RGB " else None  # a CMYK or gray profile would lie about RGB pixels
    pixels = _pixels(image, "downscaled" in steps, orientation)
    # No steps: the file itself was acceptable, only over MAX_BYTES, so it goes straight to _shrink.
    data, content_type = _encode(pixels, icc) if steps else (b"", "")
    if not steps or len(data) > MAX_BYTES:
        pixels, data = _shrink(pixels, icc)
        content_type = "image/jpeg"
        steps.append("reencoded")
    return PreparedImage(
        data, content_type, *pixels.size, tuple(steps), source_width=source_width, source_height=source_height
    )


def _pixels(image: ImageFile.ImageFile, downscale: bool, orientation: int) -> Image.Image:
    """The first frame as 8-bit RGB(A), within MAX_PIXELS, turned the way people see it."""
    size = _fit(*image.size) if downscale else image.size
    if downscale and image.format in {"JPEG", "MPO"}:
        image.draft(None, size)  # libjpeg decodes at 1/2, 1/4 or 1/8 scale when that still covers `size`
    pixels = _to_rgb(image)
    if pixels.size != size:
        pixels = pixels.resize(size, Image.Resampling.LANCZOS)
    return pixels.transpose(_TRANSPOSE[orientation]) if orientation != 1 else pixels


def _fit(width: int, height: int) -> tuple[int, int]:
    """The largest size with the same aspect ratio (within a pixel) and at most MAX_PIXELS."""
    scale = math.sqrt(MAX_PIXELS / (width * height))
    new_height = max(1, math.floor(height * scale))
    return min(max(1, math.floor(width * scale)), MAX_PIXELS // new_height), new_height


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, or RGBA when the image has an alpha channel or a transparent colour."""
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    if image.mode in _DEEP_MODES:
        image = _to_8bit(image)
    target = "RGBA" if image.mode in _ALPHA_MODES or "transparency" in image.info else "RGB"
    return image if image.mode == target else image.convert(target)


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Through the file's own ICC profile when it has one: Pillow's plain formula ignores how inks mix."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            return ImageCms.profileToProfile(image, ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: the plain formula is still a fair picture
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit and float gray scaled to 0-255 (Pillow's convert clips everything above 255 to white).

    Values that fit 0-65535 (integers) or 0-1 (floats) keep that scale; any others are stretched from
    their minimum to their maximum."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    nominal = 1.0 if image.mode == "F" else 65535.0
    if low >= 0 and high <= nominal:
        low, high = 0.0, nominal
    values -= low
    values *= 255 / max(high - low, 1e-12)
    return Image.fromarray(np.rint(values).astype(np.uint8))


def _encode(image: Image.Image, icc: bytes | None) -> tuple[bytes, str]:
    """Opaque images as JPEG (fast, small), images with alpha as PNG (the API takes PNG with alpha)."""
    if image.mode == "RGBA":
        return _save(image, "PNG", icc_profile=icc), "image/png"
    return _save(image, "JPEG", quality=JPEG_QUALITY, icc_profile=icc), "image/jpeg"


def _shrink(image: Image.Image, icc: bytes | None) -> tuple[Image.Image, bytes]:
    """JPEG at quality 90, 75, 60, then at 3/4 the size each round, until within MAX_BYTES.
    Alpha is dropped: JPEG has none, and the pixels under it are what an RGB decoder sees."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    quality = 90
    while len(data := _save(image, "JPEG", quality=quality, icc_profile=icc)) > MAX_BYTES:
        if quality > 60:
            quality -= 15
        else:
            smaller = (max(1, image.width * 3 // 4), max(1, image.height * 3 // 4))
            image = image.resize(smaller, Image.Resampling.LANCZOS)
    return image, data


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    """Encoded with only the options given: no EXIF, no other metadata from `image.info`."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()
