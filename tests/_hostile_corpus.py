"""Hostile image files made from one real LFW photo: each writer returns the path it wrote."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def _upright(photo: Path) -> Image.Image:
    return Image.open(photo).convert("RGB")


def truncated(photo: Path, dst: Path, keep: float = 0.4) -> Path:
    """The first `keep` of a JPEG's bytes, as an interrupted download leaves it."""
    data = photo.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def zero_bytes(dst: Path) -> Path:
    dst.write_bytes(b"")
    return dst


def not_an_image(dst: Path) -> Path:
    """Text wearing an image extension (a saved error page, say)."""
    dst.write_text("<html><body>404 Not Found</body></html>\n")
    return dst


def png_with_alpha(photo: Path, dst: Path) -> Path:
    """RGBA: the face opaque, a transparent frame around it."""
    rgba = np.array(_upright(photo).convert("RGBA"))
    rgba[:20, :, 3] = 0
    rgba[-20:, :, 3] = 0
    rgba[:, :20, 3] = 0
    rgba[:, -20:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(dst)
    return dst


def grayscale(photo: Path, dst: Path) -> Path:
    _upright(photo).convert("L").save(dst, quality=95)
    return dst


def cmyk(photo: Path, dst: Path) -> Path:
    im = _upright(photo).convert("CMYK")
    assert im.mode == "CMYK"
    im.save(dst, quality=95)
    return dst


def png16_gray(photo: Path, dst: Path) -> Path:
    """A 16-bit grayscale PNG using the whole 0..65535 range."""
    gray = cv2.imread(str(photo), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 257
    assert cv2.imwrite(str(dst), gray)
    return dst


def png16_color(photo: Path, dst: Path) -> Path:
    """A 16-bit-per-channel colour PNG (48 bits a pixel)."""
    bgr = cv2.imread(str(photo)).astype(np.uint16) * 257
    assert cv2.imwrite(str(dst), bgr)
    return dst


def exif_rotated(photo: Path, dst: Path) -> tuple[Path, tuple[int, int]]:
    """The photo stored lying on its side, upright only once EXIF orientation 6 is applied.

    The photo is first cropped to a non-square shape, so that whether the orientation was
    honoured shows in the decoded size. Returns the path and the upright (height, width).
    """
    im = _upright(photo)
    w, h = im.size
    upright = im.crop((0, 15, w, h - 15))  # wider than tall
    # Orientation 6 means "rotate 90 degrees clockwise to display": store it turned the other way.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored.save(dst, quality=95, exif=exif)
    return dst, (upright.size[1], upright.size[0])


def _chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body))
        + kind
        + body
        + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def bomb_png(dst: Path, width: int, height: int, *, header_only: bool = False) -> Path:
    """A tiny grayscale PNG that decodes to width x height pixels of black.

    With `header_only`, the pixel data stops after the first row: the header alone must be
    enough to refuse the file (compressing a whole 400-megapixel image takes half a minute).
    """
    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    parts = []
    rows_per_step = max(1, (4 << 20) // len(row))
    for start in range(0, 1 if header_only else height, rows_per_step):
        parts.append(z.compress(row * min(rows_per_step, height - start)))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    dst.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )
    return dst


def tiny(dst: Path, side: int = 8) -> Path:
    assert cv2.imwrite(str(dst), np.full((side, side, 3), 128, np.uint8))
    return dst


def no_face(dst: Path) -> Path:
    """A smooth gradient: a real image, nothing like a face."""
    ramp = np.linspace(0, 255, 240, dtype=np.uint8)
    img = np.stack([np.tile(ramp, (200, 1))] * 3, axis=2)
    assert cv2.imwrite(str(dst), img)
    return dst
