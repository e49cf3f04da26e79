"""Turn whatever the user hands us (a path, bytes, a PIL image, an array) into a BGR uint8 array."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import mmap
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from tgfr_search.errors import ImageError

if TYPE_CHECKING:
    from PIL import Image as PILImage

    ImageSource = (
        str | os.PathLike[str] | bytes | bytearray | memoryview | PILImage.Image | np.ndarray
    )
else:
    ImageSource = Any

__all__ = [
    "MAX_PIXELS",
    "MIN_SIDE",
    "Decoded",
    "ImageSource",
    "content_hash",
    "decode",
    "decode_all",
    "load_image",
]

MAX_PIXELS = 40_000_000
"""Largest image (width x height) accepted: a guard against decompression bombs."""

MIN_SIDE = 16
"""Smallest accepted width or height: nothing smaller can hold a recognisable face."""

# Modes PIL can convert to RGB itself without losing meaning (no alpha, 8 bits).
_PLAIN_MODES = {"RGB", "L", "1", "CMYK", "YCbCr", "P"}


def content_hash(data: bytes) -> str:
    """Return the SHA-256 hex digest of a file's bytes, the key for de-duplicating photos."""
    return hashlib.sha256(data).hexdigest()


class Decoded(NamedTuple):
    """An image read, hashed and decoded, or the reason it could not be (`error`)."""

    image: np.ndarray | tuple[int, ...] | None
    """The pixels (BGR uint8), or only their shape where they went to an `Arena` slot."""
    digest: str = ""
    """SHA-256 of a file's (or bytes') bytes, else of the decoded pixels."""
    error: str | None = None
    data: bytes | None = None
    """The file's bytes, when it came as a file or bytes of at most `keep_bytes`."""


def decode(src: ImageSource, name: str, keep_bytes: int = 0) -> Decoded:
    """Read, hash and decode one image; errors become a reason instead of an exception."""
    try:
        data = src
        if isinstance(data, (str, os.PathLike)):
            data = Path(data).read_bytes()
        image = load_image(data, name=name)
        # Files are keyed by their bytes; in-memory images by their pixels.
        if isinstance(data, bytes):
            kept = data if len(data) <= keep_bytes else None
            return Decoded(image, content_hash(data), data=kept)
        return Decoded(image, content_hash(image.tobytes()))
    except ImageError as e:
        return Decoded(None, error=str(e))
    except OSError as e:
        return Decoded(None, error=f"cannot read {name}: {e.strerror or e}")


class Arena:
    """Shared memory that forked decoding workers write pixels into: `slots` images of up to
    `slot_bytes` each, so that only digests, small files and shapes cross the pipe back."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        # Anonymous and shared: the forked workers write into the pages their parent reads.
        # No close(): the pages go when the last view of them does.
        self.buffer = mmap.mmap(-1, slots * slot_bytes)

    def put(self, slot: int, image: np.ndarray) -> bool:
        """Copy `image` into `slot`; False when it does not fit."""
        if image.nbytes > self.slot_bytes:
            return False
        view = np.frombuffer(self.buffer, np.uint8, image.nbytes, slot * self.slot_bytes)
        view[:] = image.reshape(-1)
        return True

    def release(self) -> None:
        """Give the pages back (they read as zeros after); the workers keep their mapping."""
        with contextlib.suppress(AttributeError, OSError):  # no MADV_REMOVE: they stay
            self.buffer.madvise(mmap.MADV_REMOVE)

    def images(self, first: int, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
        """Views (no copies) of the uint8 images of `shapes` in the slots from `first` on,
        valid until a worker writes those slots again."""
        size = self.slot_bytes
        block = np.frombuffer(self.buffer, np.uint8, len(shapes) * size, first * size)
        return [block[k * size : k * size + math.prod(s)].reshape(s) for k, s in enumerate(shapes)]


_arena: Arena | None = None  # a decoding worker's: set by `use_arena` as the worker starts


def use_arena(arena: Arena) -> None:
    """Start a decoding worker: its pixels go to `arena`; Ctrl-C is for its parent to handle.

    Nothing else: a forked worker must not reconfigure OpenCV's thread pool (as
    `cv2.setNumThreads` does), which hangs when the parent had used that pool.
    """
    import signal

    global _arena
    _arena = arena
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode_all(
    jobs: Sequence[tuple[ImageSource, str]], keep_bytes: int = 0, first_slot: int | None = None
) -> list[Decoded]:
    """`decode` for each (source, name): one task for a pool of threads or processes.

    With `first_slot`, in a worker given an arena by `use_arena`, job k's pixels go to slot
    `first_slot + k` where they fit, and its `image` is then only their shape.
    """
    out = []
    for k, (src, name) in enumerate(jobs):
        d = decode(src, name, keep_bytes)
        image = d.image
        if first_slot is not None and _arena is not None and isinstance(image, np.ndarray):
            d = d._replace(image=image.shape) if _arena.put(first_slot + k, image) else d
        out.append(d)
    return out


def load_image(src: ImageSource, *, name: str | None = None) -> np.ndarray:
    """Decode `src` into a contiguous BGR uint8 HxWx3 array, or raise ImageError saying why not.

    `name` labels the image in error messages (defaults to the path, or a description of `src`).
    EXIF orientation is applied to files and bytes; PIL images and arrays are taken as they are.
    """
    if isinstance(src, np.ndarray):
        return _from_array(src, name or "<array>")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(src), name or "<bytes>")
    if isinstance(src, (str, os.PathLike)):
        label = name or os.fspath(src)
        try:
            data = Path(src).read_bytes()
        except IsADirectoryError:
            raise ImageError(f"cannot read {label}: is a folder") from None
        except OSError as exc:
            raise ImageError(f"cannot read {label}: {exc.strerror or exc}") from None
        return _from_bytes(data, label)
    from PIL import Image

    if isinstance(src, Image.Image):
        label = name or getattr(src, "filename", "") or "<PIL image>"
        _check_size(src.size, label)
        try:
            return _pil_to_bgr(src, label)
        except ImageError:
            raise
        except Exception as exc:  # PIL raises a zoo of types for broken data
            raise ImageError(f"cannot read {label}: {_reason(exc)}") from None
    raise ImageError(
        f"cannot read {name or type(src).__name__}: unsupported source type {type(src).__name__}"
    )


def _plain_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a complete JPEG or 8-bit RGB/grey PNG that needs no EXIF turn, else None.

    Such files decode to the same pixels through OpenCV as through PIL, in one call that holds
    the GIL for microseconds, not PIL's hundreds (GPU enrollment decodes thousands a second).
    """
    if data[:2] == b"\xff\xd8" and data.endswith(b"\xff\xd9"):  # a JPEG with its end marker
        at = 2
        while at + 9 < len(data) and data[at] == 0xFF:
            marker = data[at + 1]
            length = int.from_bytes(data[at + 2 : at + 4], "big")
            if marker == 0xE1 and data[at + 4 : at + 8] == b"Exif":
                return None  # may say "rotate me": PIL's exif_transpose does that
            if marker in (0xC0, 0xC1, 0xC2):  # baseline, extended or progressive Huffman
                if data[at + 9] not in (1, 3):
                    return None  # CMYK and other component counts: PIL converts those
                height = int.from_bytes(data[at + 5 : at + 7], "big")
                return int.from_bytes(data[at + 7 : at + 9], "big"), height
            if not (0xE0 <= marker <= 0xEF or marker in (0xFE, 0xDB, 0xC4, 0xDD, 0xCC)):
                return None  # anything but APPn, COM and tables before the frame: PIL decides
            at += 2 + length
        return None
    if (
        data[:16] == b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
        and data[24] == 8  # bit depth
        and data[25] in (0, 2)  # grey or RGB, no palette, no alpha
        and data.endswith(b"IEND\xaeB`\x82")
    ):
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def _from_bytes(data: bytes, label: str) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError(f"cannot read {label}: empty file")
    if len(data) > 26 and (plain := _plain_size(data)) is not None:
        _check_size(plain, label)
        import cv2

        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is not None and image.shape[1::-1] == plain:
            return image
        # Anything OpenCV could not read goes through PIL, which says why.
    try:
        # Our own MAX_PIXELS check below gives the clearer message; PIL's warning would be noise.
        # (catch_warnings is process-wide: under threads the worst case is that this one
        # warning category stays silenced, which is what we want anyway.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(f"cannot read {label}: not an image") from None
    except Image.DecompressionBombError as exc:
        # Far beyond PIL's own limit: PIL refuses before we see the size, but names the count.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{int(found.group(1)):,} pixels" if found else "pixels"
        raise ImageError(
            f"refused {label}: image too large: {count} (limit {MAX_PIXELS:,})"
        ) from None
    except Exception as exc:
        raise ImageError(f"cannot read {label}: {_reason(exc)}") from None
    with im:
        # Checked before any pixel is decoded: only the header has been read so far.
        _check_size(im.size, label)
        try:
            im.load()
            try:
                oriented = ImageOps.exif_transpose(im)
            except Exception:  # a broken EXIF block should not cost the photo itself
                oriented = im
            return _pil_to_bgr(oriented, label)
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(f"cannot read {label}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "truncated" in text.lower():
        return "truncated"
    return text


def _check_size(size: tuple[int, int], label: str) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"refused {label}: image too large: {width}x{height} pixels (limit {MAX_PIXELS:,})"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"refused {label}: image too small: {width}x{height} pixels (minimum side {MIN_SIDE})"
        )


def _pil_to_bgr(im: PILImage.Image, label: str) -> np.ndarray:
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _PLAIN_MODES:
        rgb = np.asarray(im.convert("RGB") if mode != "RGB" else im)
        return _rgb_to_bgr(rgb)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"))
        return _rgb_to_bgr(_composite_on_black(rgba))
    if mode.startswith("I;16") or mode in ("I", "F"):
        # PIL's own convert("L") clips 16-bit values instead of scaling them: a near-white image.
        values = np.asarray(im).astype(np.float64)
        if mode == "F":
            scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0
        gray = np.clip(values * scale + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    try:
        rgb = np.asarray(im.convert("RGB"))
    except (ValueError, OSError):
        raise ImageError(f"cannot read {label}: unsupported colour mode {mode}") from None
    return _rgb_to_bgr(rgb)


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[:, :, 3:4].astype(np.uint16)
    return ((rgba[:, :, :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)


def _rgb_to_bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _from_array(arr: np.ndarray, label: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise ImageError(f"cannot read {label}: expected a uint8 array, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(
            f"cannot read {label}: expected an HxW, HxWx3 or HxWx4 array, got shape {arr.shape}"
        )
    _check_size((arr.shape[1], arr.shape[0]), label)
    if arr.ndim == 2:
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if arr.shape[2] == 4:
        arr = _composite_on_black(arr)
    return _rgb_to_bgr(arr)
