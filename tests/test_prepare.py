import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from normals_pipeline._errors import ImageRejected
from normals_pipeline.prepare import MAX_BYTES, prepare


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@settings(max_examples=30, deadline=None)
@given(
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    fmt=st.sampled_from(["JPEG", "PNG", "WEBP"]),
    mode=st.sampled_from(["RGB", "L"]),
)
def test_accepted_formats_are_sent_as_they_are(width, height, fmt, mode):
    data = encode(Image.new(mode, (width, height), 128), fmt)
    prepared = prepare(data)
    assert prepared.data is data  # no decode, no re-encode
    assert (prepared.width, prepared.height) == (width, height)
    assert prepared.content_type == f"image/{fmt.lower()}"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"hello, not an image", "unreadable_image"),
        (encode(Image.new("RGB", (8, 8)), "GIF"), "unsupported_format"),
        (encode(Image.new("RGB", (8, 8)), "BMP"), "unsupported_format"),
        (b"\0" * (MAX_BYTES + 1), "file_too_large"),
    ],
)
def test_refused_files_get_a_code(data, code):
    with pytest.raises(ImageRejected) as raised:
        prepare(data)
    assert raised.value.error_code == code


def test_over_25_megapixels_is_refused_from_the_header():
    data = encode(Image.new("1", (5001, 5001)), "PNG")  # 25.01 MP, a few kB
    with pytest.raises(ImageRejected) as raised:
        prepare(data)
    assert raised.value.error_code == "too_many_pixels"


def test_decompression_bomb_is_refused_without_decoding():
    data = encode(Image.new("1", (20000, 20000)), "PNG")  # 400 MP
    with pytest.raises(ImageRejected) as raised:
        prepare(data)
    assert raised.value.error_code == "too_many_pixels"
