"""Synthetic "portraits" for demos and tests, and a contact sheet to look at results.

No real photos ship with the project, so these stand in: a head, neck and
shoulders on a plain or gradient backdrop. They vary in size, format and file
name (a subfolder, a space, a non-ASCII letter) to exercise the pipeline's file
handling as much as its image handling. Output is deterministic for a seed.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["contact_sheet", "make_portraits"]

_SKIN = [(241, 194, 160), (224, 172, 130), (198, 134, 96), (141, 85, 54), (92, 58, 40)]
_HAIR = [(40, 28, 22), (95, 60, 30), (20, 20, 20), (150, 110, 60)]
_CLOTH = [(40, 70, 140), (150, 30, 40), (30, 110, 70), (60, 60, 60), (200, 150, 40)]
_BACKDROP = [(235, 235, 235), (210, 225, 240), (245, 235, 215), (200, 230, 210), (120, 135, 150)]
_EXTENSIONS = [".jpg", ".png", ".webp"]
_THUMB_HEIGHT = 256
_LABEL_HEIGHT = 22
_MARGIN = 8


def make_portraits(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` portraits under ``folder`` and return their paths in order.

    File 1 goes in a subfolder and file 2's name has a space and a non-ASCII
    letter, so any count >= 3 covers the awkward cases.
    """
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        path = folder / _file_name(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(_portrait(rng), path)
        paths.append(path)
    return paths


def _file_name(index: int) -> str:
    extension = _EXTENSIONS[index % len(_EXTENSIONS)]
    if index == 1:
        return f"nested/portrait_{index:03d}{extension}"
    if index == 2:
        return f"portrait café {index:03d}{extension}"
    return f"portrait_{index:03d}{extension}"


def _portrait(rng: random.Random) -> Image.Image:
    width = rng.randrange(384, 641, 8)
    height = rng.randrange(max(width, 448), 769, 8)
    image = _backdrop(rng, width, height)
    draw = ImageDraw.Draw(image)
    skin, cloth, hair = rng.choice(_SKIN), rng.choice(_CLOTH), rng.choice(_HAIR)
    cx = width / 2 + rng.uniform(-0.08, 0.08) * width
    head_w = rng.uniform(0.30, 0.42) * width
    head_h = head_w * rng.uniform(1.2, 1.4)
    head_top = rng.uniform(0.10, 0.18) * height
    chin = head_top + head_h
    shoulder_w = head_w * rng.uniform(2.2, 2.8)
    draw.ellipse((cx - shoulder_w / 2, chin + 0.08 * height, cx + shoulder_w / 2, height * 1.6), fill=cloth)
    draw.rectangle((cx - head_w * 0.2, chin - head_h * 0.2, cx + head_w * 0.2, chin + 0.12 * height), fill=skin)
    draw.ellipse((cx - head_w * 0.55, head_top - head_h * 0.06, cx + head_w * 0.55, head_top + head_h * 0.6), fill=hair)
    draw.ellipse((cx - head_w / 2, head_top, cx + head_w / 2, chin), fill=skin)
    _face(draw, cx, head_top, head_w, head_h)
    return image


def _backdrop(rng: random.Random, width: int, height: int) -> Image.Image:
    top = rng.choice(_BACKDROP)
    if rng.random() < 0.5:
        return Image.new("RGB", (width, height), top)
    bottom = tuple(max(0, c - rng.randrange(20, 60)) for c in top)
    gradient = Image.linear_gradient("L").resize((width, height))
    return Image.composite(Image.new("RGB", (width, height), bottom), Image.new("RGB", (width, height), top), gradient)


def _face(draw: ImageDraw.ImageDraw, cx: float, top: float, width: float, height: float) -> None:
    """Eyes and mouth: detail inside the silhouette, so it must not punch holes in the mask."""
    eye_y, eye_dx, eye_r = top + 0.42 * height, 0.2 * width, 0.045 * width
    for x in (cx - eye_dx, cx + eye_dx):
        draw.ellipse((x - eye_r, eye_y - eye_r * 0.6, x + eye_r, eye_y + eye_r * 0.6), fill=(30, 30, 30))
    mouth_y = top + 0.75 * height
    draw.line(
        (cx - 0.12 * width, mouth_y, cx + 0.12 * width, mouth_y), fill=(150, 60, 60), width=max(2, int(width * 0.02))
    )


def _save(image: Image.Image, path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix == ".jpg":
        image.save(path, "JPEG", quality=92)
    elif suffix == ".webp":
        image.save(path, "WEBP", quality=90)
    else:
        image.save(path, "PNG")


def contact_sheet(
    pairs: list[tuple[Image.Image, Image.Image, str]],
    out: Path,
    columns: tuple[str, str] = ("input image", "normal map"),
) -> Path:
    """Write a PNG with the two column headings, then one labelled row ``input | normal map`` per pair."""
    if not pairs:
        raise ValueError("contact_sheet needs at least one (input, normal map, label) pair")
    rows = [(_thumbnail(source), _thumbnail(normals), label) for source, normals, label in pairs]
    left = max(row[0].width for row in rows)
    right = max(row[1].width for row in rows)
    row_height = _LABEL_HEIGHT + _THUMB_HEIGHT + _MARGIN
    top = _MARGIN + _LABEL_HEIGHT  # the headings
    sheet = Image.new("RGB", (left + right + 3 * _MARGIN, top + len(rows) * row_height + _MARGIN), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font()
    draw.text((_MARGIN, _MARGIN), columns[0], fill="black", font=_font(bold=True))
    draw.text((2 * _MARGIN + left, _MARGIN), columns[1], fill="black", font=_font(bold=True))
    for index, (source, normals, label) in enumerate(rows):
        y = top + _MARGIN + index * row_height
        draw.text((_MARGIN, y), label, fill="dimgray", font=font)
        sheet.paste(source, (_MARGIN, y + _LABEL_HEIGHT))
        sheet.paste(normals, (2 * _MARGIN + left, y + _LABEL_HEIGHT))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, "PNG")
    return out


def _font(bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu when installed: Pillow's built-in font has no glyphs for labels like "café"."""
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf", 15 if bold else 14)
    except OSError:
        return ImageFont.load_default(15 if bold else 14)


def _thumbnail(image: Image.Image) -> Image.Image:
    width = max(1, round(image.width * _THUMB_HEIGHT / image.height))
    return image.convert("RGB").resize((width, _THUMB_HEIGHT), Image.Resampling.LANCZOS)
