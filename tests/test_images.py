"""load_image on tiny synthetic files: every colour mode, EXIF rotation, and every way to fail."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
from PIL import Image

from tgfr_search.errors import ImageError
from tgfr_search.images import MAX_PIXELS, MIN_SIDE, content_hash, load_image

LFW = Path(
    os.environ.get("TGFR_LFW", Path(__file__).resolve().parents[1].parent / "shared/datasets/lfw")
)


def _rgb(h: int = 24, w: int = 32) -> np.ndarray:
    """An RGB image whose corners differ, so a rotation or channel swap shows."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)  # top-left red
    img[: h // 2, w // 2 :] = (0, 255, 0)  # top-right green
    img[h // 2 :, : w // 2] = (0, 0, 255)  # bottom-left blue
    img[h // 2 :, w // 2 :] = (255, 255, 255)
    return img


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims a size; the pixel data is a few bytes (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_png_rgb_becomes_bgr(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.fromarray(_rgb()).save(path)
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3) and out.flags.c_contiguous
    assert tuple(out[0, 0]) == (0, 0, 255)  # red in BGR
    assert np.array_equal(out, _rgb()[:, :, ::-1])
    assert np.array_equal(load_image(str(path)), out)
    assert np.array_equal(load_image(path.read_bytes()), out)


def test_png_alpha_composited_on_black(tmp_path: Path) -> None:
    rgba = np.dstack([_rgb(), np.full((24, 32), 255, dtype=np.uint8)])
    rgba[:, :8, 3] = 0  # transparent left strip
    rgba[:, 8:16, 3] = 128
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = load_image(path)
    assert out.shape == (24, 32, 3)
    assert out[:, :8].max() == 0
    assert tuple(out[0, 10]) == (0, 0, 128)  # half-transparent red
    assert tuple(out[0, 20]) == (0, 255, 0)


def test_grayscale(tmp_path: Path) -> None:
    gray = np.tile(np.arange(32, dtype=np.uint8) * 8, (20, 1))
    path = tmp_path / "gray.png"
    Image.fromarray(gray, "L").save(path)
    out = load_image(path)
    assert out.shape == (20, 32, 3)
    assert np.array_equal(out[:, :, 0], gray) and np.array_equal(out[:, :, 2], gray)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(_rgb(32, 32)).convert("CMYK").save(path, quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    out = load_image(path).astype(int)
    assert out.shape == (32, 32, 3)
    assert np.abs(out[4, 4] - (0, 0, 255)).max() < 40  # still red, not inverted
    assert np.abs(out[28, 28] - (255, 255, 255)).max() < 40


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    gray16 = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (20, 1))
    path = tmp_path / "gray16.png"
    Image.fromarray(gray16).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    out = load_image(path)
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    assert 100 < out[0, 16, 0] < 160  # mid-grey stays mid-grey


def test_16bit_rgb_png(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    rgb16 = _rgb().astype(np.uint16) * 257
    path = tmp_path / "rgb16.png"
    cv2.imwrite(str(path), rgb16[:, :, ::-1].copy())
    assert np.array_equal(load_image(path), _rgb()[:, :, ::-1])


def test_palette_with_transparency(tmp_path: Path) -> None:
    im = Image.fromarray(_rgb()).convert("P")
    im.info["transparency"] = int(np.asarray(im)[0, 0])  # the red quarter becomes transparent
    path = tmp_path / "palette.png"
    im.save(path, transparency=im.info["transparency"])
    out = load_image(path)
    assert out[0, 0].max() == 0 and tuple(out[-1, 0]) == (255, 0, 0)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(_rgb(24, 40)).save(path, quality=95, exif=exif)
    out = load_image(path)
    assert out.shape == (40, 24, 3)  # width and height swapped
    # After a 90 degree clockwise turn, the old bottom-left (blue) is the top-left.
    assert np.abs(out[2, 2].astype(int) - (255, 0, 0)).max() < 40


def test_arrays_and_pil_images() -> None:
    rgb = _rgb()
    assert np.array_equal(load_image(rgb), rgb[:, :, ::-1])
    assert np.array_equal(load_image(Image.fromarray(rgb)), rgb[:, :, ::-1])
    gray = load_image(rgb[:, :, 0])
    assert gray.shape == (24, 32, 3)
    rgba = np.dstack([rgb, np.full((24, 32), 255, dtype=np.uint8)])
    assert np.array_equal(load_image(rgba), rgb[:, :, ::-1])
    with pytest.raises(ImageError, match="uint8"):
        load_image(rgb.astype(np.float32))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((20, 20, 2), dtype=np.uint8))


def test_truncated_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "JPEG"
    )
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cannot read .*cut\.jpg: truncated"):
        load_image(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.jpg: empty file"):
        load_image(path)
    with pytest.raises(ImageError, match="empty file"):
        load_image(b"")


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_text("not a picture at all\n")
    with pytest.raises(ImageError, match=r"cannot read .*photo\.jpg: not an image$"):
        load_image(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


def test_bomb_header_refused_without_decoding() -> None:
    too_large = r"bomb.png: image too large: (600,000,000 pixels|20000x30000 pixels)"
    with pytest.raises(ImageError, match=too_large):
        load_image(_png_header_only(20000, 30000), name="bomb.png")
    # Between our limit and PIL's: our own check, before decoding, names the size.
    with pytest.raises(ImageError, match=r"image too large: 9000x9000 pixels"):
        load_image(_png_header_only(9000, 9000))


def test_big_blank_image_refused(tmp_path: Path) -> None:
    # 48 megapixels of black compress to a few tens of kilobytes.
    side_w, side_h = 8000, 6000
    assert side_w * side_h > MAX_PIXELS
    path = tmp_path / "blank.png"
    Image.new("L", (side_w, side_h)).save(path, optimize=False, compress_level=9)
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError, match=r"image too large: 8000x6000 pixels \(limit 40,000,000\)"):
        load_image(path)


def test_too_small(tmp_path: Path) -> None:
    path = tmp_path / "tiny.png"
    Image.fromarray(_rgb(MIN_SIDE - 1, 40)).save(path)
    with pytest.raises(ImageError, match="image too small: 40x15"):
        load_image(path)
    load_image(_rgb(MIN_SIDE, MIN_SIDE))


def test_errors_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "junk.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert "\n" not in str(info.value) and "junk.png" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_content_hash() -> None:
    assert content_hash(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert content_hash(b"a") != content_hash(b"b")


def test_plain_files_decode_as_pil_does() -> None:
    """The OpenCV fast path for plain JPEG and PNG files gives PIL's pixels exactly."""
    import tgfr_search.images as images

    files = sorted((LFW / "aligned112").glob("*/*.jpg"))[:200] + sorted(LFW.glob("raw/*/*.jpg"))
    if not files:
        pytest.skip(f"no LFW under {LFW}")
    pngs = [cv2.imencode(".png", load_image(f))[1].tobytes() for f in files[:20]]
    for data in [f.read_bytes() for f in files] + pngs:
        assert images._plain_size(data) is not None
        fast = images._from_bytes(data, "fast")
        with mock.patch.object(images, "_plain_size", lambda _: None):
            slow = images._from_bytes(data, "pil")
        assert fast.shape == slow.shape and np.array_equal(fast, slow)
