import importlib
import io
import struct
import zlib
from dataclasses import dataclass
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image, ImageCms, ImageFile, ImageOps

from normals_pipeline._errors import ImageRejected
from normals_pipeline.prepare import CONTENT_TYPES, MAX_BYTES, MAX_PIXELS, prepare

prepare_module = importlib.import_module("normals_pipeline.prepare")  # the package re-exports the function
CODES = {"empty_file", "unreadable_image", "truncated_image", "too_many_pixels", "file_too_large", "unsupported_format"}
API_FORMATS = {"JPEG", "PNG", "WEBP"}
# (format, mode) pairs Pillow writes; "+t" adds a transparent colour.
CASES = [
    *[("JPEG", mode) for mode in ("RGB", "L", "CMYK")],
    *[("PNG", mode) for mode in ("RGB", "RGBA", "L", "LA", "P", "P+t", "RGB+t", "I;16", "1")],
    *[("WEBP", mode) for mode in ("RGB", "RGBA")],
    *[("GIF", mode) for mode in ("P", "P+t", "L")],
    *[("BMP", mode) for mode in ("RGB", "L", "P", "1")],
    *[("TIFF", mode) for mode in ("RGB", "RGBA", "CMYK", "L", "I;16", "F", "1")],
]
AS_IS = {("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "RGBA"), ("WEBP", "RGB"), ("WEBP", "RGBA")}
ANIMATED = {("GIF", "P"), ("GIF", "L"), ("PNG", "RGB"), ("PNG", "RGBA"), ("WEBP", "RGB"), ("WEBP", "RGBA")}
RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """Random pixels in `mode`: nothing compresses away, every step has real data to get wrong."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        return Image.frombytes("I;16", size, rng.integers(0, 65536, (height, width), dtype="<u2").tobytes())
    if mode == "F":
        return Image.frombytes("F", size, rng.random((height, width), dtype=np.float32).tobytes())
    bands = {"1": 1, "L": 1, "P": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    image = Image.frombytes("L" if mode == "1" else mode, size, rng.integers(0, 256, width * height * bands, np.uint8))
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, np.uint8).tobytes())
    return image.convert("1") if mode == "1" else image


def exif_with(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif


def no_decoding():
    """Any pixel decode fails the test: the paths under it may read headers only."""
    return mock.patch.object(ImageFile.ImageFile, "load", side_effect=AssertionError("decoded"))


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG claiming `width`x`height` with no pixel data: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def assert_sendable(prepared, source: bytes) -> Image.Image:
    """What the API accepts: PNG/JPEG/WEBP, one 8-bit RGB(A) frame, <= 25 MP, <= 30 MB, dims as said."""
    assert len(prepared.data) <= MAX_BYTES
    assert (prepared.data is source) == (prepared.steps == ())
    with Image.open(io.BytesIO(prepared.data)) as sent:
        assert sent.format in API_FORMATS
        assert prepared.content_type == CONTENT_TYPES[sent.format]
        assert not getattr(sent, "is_animated", False)
        assert sent.getexif().get(ExifTags.Base.Orientation, 1) == 1
        sent.load()
        assert sent.mode in {"RGB", "RGBA"}
        assert sent.size == (prepared.width, prepared.height)
        assert sent.width * sent.height <= MAX_PIXELS
        return sent.copy()


def code_of(data: bytes, **options) -> str:
    with pytest.raises(ImageRejected) as raised:
        prepare(data, **options)
    assert raised.value.error_code in CODES
    return raised.value.error_code


@dataclass(frozen=True)
class Generated:
    data: bytes
    fmt: str
    mode: str
    size: tuple[int, int]
    frames: int
    orientation: int | None


@st.composite
def generated_images(draw, fmt: str, mode: str) -> Generated:
    size = (draw(st.integers(1, 300)), draw(st.integers(1, 300)))
    seed = draw(st.integers(0, 2**32 - 1))
    frames = draw(st.integers(2, 3)) if (fmt, mode) in ANIMATED and draw(st.booleans()) else 1
    tagged = fmt in API_FORMATS and frames == 1 and draw(st.booleans())
    orientation = draw(st.integers(1, 8)) if tagged else None
    base = mode.removesuffix("+t")
    images = [noise(base, size, seed + frame) for frame in range(frames)]
    options = {"exif": exif_with(orientation)} if orientation else {}
    if mode.endswith("+t"):
        options["transparency"] = 0 if base == "P" else (0, 0, 0)
    if frames > 1:
        options |= {"save_all": True, "append_images": images[1:]}
    return Generated(encode(images[0], fmt, **options), fmt, mode, size, frames, orientation)


@pytest.mark.parametrize(("fmt", "mode"), CASES)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_every_generated_image_comes_out_sendable(fmt, mode, data):
    image = data.draw(generated_images(fmt, mode))
    prepared = prepare(image.data)
    as_is = (image.fmt, image.mode) in AS_IS and image.frames == 1 and image.orientation in (None, 1)
    assert (prepared.steps == ()) == as_is
    sent = assert_sendable(prepared, image.data)
    turned = image.orientation in (5, 6, 7, 8)
    assert sent.size == (image.size[::-1] if turned else image.size)
    assert (prepared.source_width, prepared.source_height) == image.size
    assert ("first_frame" in prepared.steps) == (image.frames > 1)
    assert ("exif_transpose" in prepared.steps) == ((image.orientation or 1) > 1)
    assert ("cmyk_to_rgb" in prepared.steps) == (image.mode == "CMYK")
    assert (f"converted_from_{image.fmt.lower()}" in prepared.steps) == (image.fmt not in API_FORMATS)
    assert set(prepared.steps) <= {
        f"converted_from_{image.fmt.lower()}",
        *("first_frame", "cmyk_to_rgb", "to_8bit", "palette_to_rgb", "gray_to_rgb", "transparency"),
        *("exif_transpose", "downscaled", "reencoded"),
    }


@settings(max_examples=40, deadline=None)
@given(
    size=st.tuples(st.integers(1, 300), st.integers(1, 300)),
    case=st.sampled_from([("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "RGBA"), ("WEBP", "RGB"), ("WEBP", "RGBA")]),
    seed=st.integers(0, 2**32 - 1),
)
def test_accepted_files_are_sent_as_they_are_without_decoding(size, case, seed):
    fmt, mode = case
    data = encode(noise(mode, size, seed), fmt)
    with no_decoding():
        prepared = prepare(data)
    assert prepared.data is data
    assert prepared.steps == ()
    assert (prepared.width, prepared.height) == (prepared.source_width, prepared.source_height) == size
    assert prepared.content_type == f"image/{fmt.lower()}"


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # about the cut tag directory
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "APNG", "AWEBP", "GIF", "BMP", "TIFF"])
@settings(max_examples=25, deadline=None)
@given(
    size=st.tuples(st.integers(8, 120), st.integers(8, 120)),
    cut=st.floats(0, 1, exclude_max=True),
)
def test_truncated_files_are_refused_or_come_out_whole(fmt, size, cut):
    frames = [noise("RGB", size, seed) for seed in range(3)]
    if fmt.startswith("A"):
        data = encode(frames[0], fmt.removeprefix("A"), save_all=True, append_images=frames[1:])
    else:
        data = encode(frames[0], fmt)
    truncated = data[: max(1, int(len(data) * cut))]
    try:
        prepared = prepare(truncated)
    except ImageRejected as rejected:
        assert rejected.error_code in {"truncated_image", "unreadable_image"}
        if fmt in {"JPEG", "PNG", "WEBP", "APNG", "AWEBP"}:
            assert rejected.error_code == "truncated_image" or len(truncated) < 12  # magic incomplete
    else:
        assert fmt not in {"JPEG", "PNG", "WEBP", "APNG", "AWEBP"}  # their endings give a cut away
        assert_sendable(prepared, truncated)


@pytest.mark.parametrize(
    ("data", "trailer"),
    [
        (encode(noise("RGB", (40, 30), 1), "JPEG"), b"\0" * 3000),  # padding
        (encode(noise("RGB", (40, 30), 2), "JPEG"), bytes(range(256)) * 40),  # e.g. a motion photo's video
        (encode(noise("RGB", (40, 30), 3), "PNG"), b"trailing garbage"),
        (encode(noise("RGB", (40, 30), 4), "WEBP"), b"\0"),  # a RIFF pad byte
    ],
)
def test_bytes_after_the_end_marker_are_not_a_truncation(data, trailer):
    data += trailer
    prepared = prepare(data)
    assert prepared.data is data
    assert prepared.steps == ()


def test_a_cut_jpeg_with_an_end_marker_in_its_header_is_decoded_and_refused():
    data = encode(noise("RGB", (64, 48), 1), "JPEG", comment=b"\xff\xd9 in a comment, as in a thumbnail")
    assert code_of(data[: len(data) // 2]) == "truncated_image"


def test_a_jpeg_with_a_preview_image_mpo_is_a_jpeg():
    data = encode(noise("RGB", (40, 30), 1), "MPO", save_all=True, append_images=[noise("RGB", (20, 15), 2)])
    with no_decoding():
        prepared = prepare(data)
    assert prepared.data is data
    assert prepared.content_type == "image/jpeg"


# The stored pixels for each orientation: the seen image turned back (EXIF 2.32, tag 274).
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # seen = stored turned 90° clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_is_applied_as_people_see_it(orientation, fmt):
    seen = Image.new("RGB", (64, 48), BLUE)
    seen.paste(RED, (0, 0, 32, 24))  # the top-left quadrant
    data = encode(seen.transpose(STORED[orientation]), fmt, exif=exif_with(orientation))
    prepared = prepare(data)
    assert prepared.steps == ("exif_transpose",)
    assert (prepared.source_width, prepared.source_height) == ((48, 64) if orientation >= 5 else (64, 48))
    sent = assert_sendable(prepared, data)
    assert sent.size == (64, 48)
    assert max(map(abs, np.subtract(sent.getpixel((16, 12)), RED))) < 30
    assert max(map(abs, np.subtract(sent.getpixel((48, 36)), BLUE))) < 30
    oracle = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.abs(np.asarray(sent, np.int16) - np.asarray(oracle, np.int16)).mean() < 3


def test_a_png_orientation_after_the_pixels_is_found():
    data = encode(Image.new("RGB", (30, 20)), "PNG", exif=exif_with(6))
    start = data.index(b"eXIf") - 4  # Pillow writes the chunk before IDAT; move it just before IEND
    chunk = data[start : start + 12 + int.from_bytes(data[start : start + 4], "big")]
    data = data.replace(chunk, b"")
    data = data[:-12] + chunk + data[-12:]
    with Image.open(io.BytesIO(data)) as opened:
        assert "exif" not in opened.info  # not seen from the header alone
    prepared = prepare(data)
    assert prepared.steps == ("exif_transpose",)
    assert (prepared.width, prepared.height) == (20, 30)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_a_damaged_exif_block_is_ignored(fmt):
    data = encode(Image.new("RGB", (30, 20)), fmt, exif=b"Exif\x00\x00XX\x00*" + bytes(20))
    assert prepare(data).data is data


def test_animations_are_sent_as_their_first_frame():
    frames = [Image.new("RGB", (30, 20), color) for color in (RED, BLUE, BLUE)]
    for fmt in ("GIF", "PNG", "WEBP"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
        prepared = prepare(data)
        assert "first_frame" in prepared.steps
        assert max(map(abs, np.subtract(assert_sendable(prepared, data).getpixel((15, 10)), RED))) < 30


def test_16_bit_and_float_gray_are_scaled_not_clipped():
    levels = np.repeat(np.array([[0, 32768, 49152]], "<u2"), 16, axis=1).repeat(16, axis=0)  # not stretched
    as_16_bit = Image.frombytes("I;16", (48, 16), levels.tobytes())
    as_float = Image.frombytes("F", (48, 16), (levels / 65535).astype(np.float32).tobytes())
    for data in (encode(as_16_bit, "PNG"), encode(as_16_bit, "TIFF"), encode(as_float, "TIFF")):
        prepared = prepare(data)
        assert "to_8bit" in prepared.steps
        sent = assert_sendable(prepared, data)
        assert [sent.getpixel((x, 8))[0] for x in (8, 24, 40)] == pytest.approx([0, 128, 191], abs=3)


def test_cmyk_becomes_the_same_colour_in_rgb():
    data = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")  # red ink
    prepared = prepare(data)
    assert prepared.steps == ("cmyk_to_rgb",)
    red, green, blue = assert_sendable(prepared, data).getpixel((16, 16))
    assert red > 220 and green < 40 and blue < 40


def test_transparency_is_kept_as_an_rgba_png():
    image = Image.new("P", (20, 20), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] * 128)
    image.paste(0, (0, 0, 10, 20))  # left half: the transparent index
    data = encode(image, "PNG", transparency=0)
    prepared = prepare(data)
    assert prepared.steps == ("palette_to_rgb", "transparency")
    assert prepared.content_type == "image/png"
    sent = assert_sendable(prepared, data)
    assert (sent.getpixel((5, 5))[3], sent.getpixel((15, 5))) == (0, (255, 0, 0, 255))


def test_only_an_rgb_colour_profile_is_carried_over():
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    gray = bytes(16) + b"GRAY" + bytes(108)  # a profile header saying "gray": wrong once the pixels are RGB
    turned = prepare(encode(noise("RGB", (20, 10), 1), "JPEG", icc_profile=srgb, exif=exif_with(3)))
    grayed = prepare(encode(noise("L", (20, 10), 1), "JPEG", icc_profile=gray))
    assert Image.open(io.BytesIO(turned.data)).info.get("icc_profile") == srgb
    assert "icc_profile" not in Image.open(io.BytesIO(grayed.data)).info


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"hello, not an image", "unreadable_image"),
        (encode(Image.new("RGB", (8, 8)), "EPS"), "unsupported_format"),  # decoding it runs Ghostscript
    ],
)
def test_refused_files_get_a_code(data, code):
    with no_decoding():
        assert code_of(data) == code


def test_broken_data_inside_a_file_to_convert_is_unreadable():
    # Only files that are decoded anyway can be caught: the as-is path reads headers and endings only.
    data = bytearray(encode(noise("P", (64, 64), 1), "PNG"))
    data[1000:1060] = bytes(60)  # inside IDAT
    assert code_of(bytes(data)) == "unreadable_image"


def test_huge_files_are_refused_unread(monkeypatch):
    monkeypatch.setattr(prepare_module, "MAX_INPUT_BYTES", 1000)
    with no_decoding():
        assert code_of(encode(noise("RGB", (40, 40), 1), "PNG")) == "file_too_large"


@pytest.mark.parametrize("size", [(10_500, 10_000), (20_000, 20_000)])  # over 4x25 MP; over Pillow's own bomb limit
def test_decompression_bombs_are_refused_without_decoding(size):
    with no_decoding():
        assert code_of(png_header_only(*size)) == "too_many_pixels"


def test_over_25_megapixels_can_be_refused_from_the_header():
    with no_decoding():
        assert code_of(png_header_only(6500, 4000), oversize="refuse") == "too_many_pixels"


def test_over_25_megapixels_is_downscaled_keeping_the_aspect_ratio():
    data = encode(Image.new("L", (6500, 4000), 100), "PNG")  # 26 MP
    prepared = prepare(data)
    assert prepared.steps == ("gray_to_rgb", "downscaled")
    assert (prepared.source_width, prepared.source_height) == (6500, 4000)
    sent = assert_sendable(prepared, data)
    assert 0.99 * MAX_PIXELS < sent.width * sent.height <= MAX_PIXELS
    assert abs(sent.width * 4000 / 6500 - sent.height) <= 1


def test_jpegs_to_downscale_are_decoded_at_a_reduced_scale(monkeypatch):
    monkeypatch.setattr(prepare_module, "MAX_PIXELS", 10_000)
    decoded, load = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image.size) or load(image))
    prepared = prepare(encode(noise("RGB", (400, 400), 1), "JPEG"))
    assert prepared.steps == ("downscaled",)
    assert set(decoded) == {(100, 100)} == {(prepared.width, prepared.height)}  # libjpeg's 1/4 scale


def test_over_30_mb_is_reencoded_under_the_limit():
    pixels = np.random.default_rng(0).integers(0, 256, (3500, 3500, 3), np.uint8)
    data = encode(Image.frombytes("RGB", (3500, 3500), pixels), "PNG", compress_level=1)
    del pixels
    assert len(data) > MAX_BYTES
    prepared = prepare(data)
    assert prepared.steps == ("reencoded",)
    assert prepared.content_type == "image/jpeg"
    assert assert_sendable(prepared, data).size == (3500, 3500)


def test_reencoding_lowers_quality_then_size_until_it_fits(monkeypatch):
    monkeypatch.setattr(prepare_module, "MAX_BYTES", 20_000)
    data = encode(noise("RGBA", (300, 200), 1), "PNG")
    prepared = prepare(data)
    assert prepared.steps == ("reencoded",)
    assert len(prepared.data) <= 20_000
    assert prepared.width < 300 and abs(prepared.width * 200 / 300 - prepared.height) <= 1


def _bad_inputs() -> dict[str, bytes]:
    jpeg, png, gif = (encode(noise("RGB", (64, 48), 3), fmt) for fmt in ("JPEG", "PNG", "GIF"))
    webp = encode(noise("RGB", (64, 48), 3), "WEBP")
    return {
        "text": b"this file is text, not a JPEG",
        "zeros": bytes(100),
        "html": b"<html><body>not an image</body></html>",
        "pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
        "png-broken-header": png[:30] + b"xx" + png[32:],
        "gif-cut": gif[:20],
        "tiff-garbage": b"II*\x00" + b"\xff" * 100,
        "webp-garbage": webp[:20] + b"\xff" * (len(webp) - 20),
        "bmp-cut": encode(noise("RGB", (64, 48), 3), "BMP")[:30],
        "jpeg-cut": jpeg[: len(jpeg) // 2],
    }


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow, reading the garbage TIFF
@pytest.mark.parametrize("name", sorted(_bad_inputs()))
def test_rejection_messages_hold_no_memory_address(name):
    """Pillow names an in-memory file by its repr (`<_io.BytesIO object at 0x7f...>`): a manifest's
    error_message must not carry it."""
    with pytest.raises(ImageRejected) as rejected:
        prepare(_bad_inputs()[name])
    message = str(rejected.value)
    assert rejected.value.error_code in CODES
    assert "0x" not in message and " object at " not in message, message
    assert message.strip() and "\n" not in message


def test_a_file_pillow_cannot_identify_says_so_plainly():
    with pytest.raises(ImageRejected) as rejected:
        prepare(b"this file is text, not a JPEG")
    assert rejected.value.error_code == "unreadable_image"
    assert str(rejected.value) == (
        "cannot identify image file: not a PNG, JPEG, WEBP or other image format Pillow reads"
    )
