"""A disk cache of frozen-encoder features for the LFW manifest, so TGFR heads train in minutes.

The face recogniser and the text encoder are frozen, so their outputs are computed once: for
every image the ArcFace global vector, its norm and the 7x7 region map at each protocol level
(and a few random degradations of training images), and for every caption MiniLM's token states
and sentence vector. Layout under the cache folder:

    meta.json                      written last: the build is complete when it exists
    rows.jsonl                     the manifest rows of the cached splits, in cache order
    faces/<variant>/{globals,norms,regions,image}.npy
    text/{tokens,mask,sentence,image,caption}.npy

Every array is written under a temporary name and renamed when full, and each finished part
records the build key in `done.json`, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tgfr_search.errors import TGFRError
from tgfr_search.training.lfw import DatasetError, read_manifest

if TYPE_CHECKING:
    from tgfr_search.models.regions import ArcFaceRegions
    from tgfr_search.models.text import TextEncoder

__all__ = [
    "DEFAULT_LEVELS",
    "FORMAT_VERSION",
    "FaceFeatures",
    "FeatureCache",
    "FeatureCacheError",
    "TextFeatures",
    "build_cache",
    "level_variant",
]

#: Bumped whenever the layout or the way a variant is computed changes; old caches rebuild.
FORMAT_VERSION = 1
#: Token positions kept per caption; the LFW captions are at most 39 MiniLM tokens long.
TEXT_LENGTH = 40
_LEVELS = (0, 1, 2, 3)
#: Protocol levels cached per split by default. Probes are val/test images at every level and
#: the gallery is clean, so distractors only need L0; train images get L0 plus the `augK`
#: random degradations (which span the protocol's range), not the fixed levels too: on the
#: 2-core CPU this cuts 56k crops to 33k. Splits missing from a `levels` mapping get all four.
DEFAULT_LEVELS: dict[str, tuple[int, ...]] = {
    "train": (0,),
    "val": _LEVELS,
    "test": _LEVELS,
    "distractor": (0,),
}
_FACE_FILES = ("globals", "norms", "regions", "image")
_TEXT_FILES = ("tokens", "mask", "sentence", "image", "caption")

Progress = Callable[[str, int, int], None]


class FeatureCacheError(TGFRError, FileNotFoundError):
    """A feature cache folder that is missing, incomplete, or lacks the part asked for."""


@dataclass
class FaceFeatures:
    """Frozen ArcFace features of one variant (a protocol level or an augmentation copy)."""

    globals: np.ndarray
    """(N, 512) float32, L2-normalised: the same vectors the engine stores for these crops."""
    norms: np.ndarray
    """(N,) float32 norm before normalisation (a face-quality signal)."""
    regions: np.ndarray
    """(N, R, C) float16 region features (R = 7*7 positions, channels last)."""
    image: np.ndarray
    """(N,) int32 index into `FeatureCache.rows` of the image each row came from."""


@dataclass
class TextFeatures:
    """Frozen MiniLM features of every caption of every cached image."""

    tokens: np.ndarray
    """(M, L, 384) float16 last hidden states, zero past the mask, L = meta["text_length"]."""
    mask: np.ndarray
    """(M, L) bool, True on real tokens ([CLS] and [SEP] included)."""
    sentence: np.ndarray
    """(M, 384) float32 L2-normalised sentence vectors (the engine's text vectors)."""
    image: np.ndarray
    """(M,) int32 index into `FeatureCache.rows`."""
    caption: np.ndarray
    """(M,) int16 position of the caption in its row's `captions` list."""


def level_variant(level: int) -> str:
    """The variant name of a protocol level: "L0" .. "L3"."""
    return f"L{level}"


class FeatureCache:
    """A complete feature cache on disk; arrays are memory-mapped read-only on access."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise FeatureCacheError(
                f"{self.root} is not a complete feature cache (no meta.json): run build_cache"
            ) from None
        except (OSError, ValueError) as exc:
            raise FeatureCacheError(f"cannot read {meta_path}: {exc}") from None
        if self.meta.get("format") != FORMAT_VERSION:
            raise FeatureCacheError(
                f"{self.root}: cache format {self.meta.get('format')!r}, this code reads "
                f"{FORMAT_VERSION}: rebuild it with build_cache"
            )
        self.variants: list[str] = list(self.meta["variants"])
        self.rows: list[dict] = read_manifest(self.root / "rows.jsonl")

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r}, rows={len(self.rows)}, variants={self.variants})"

    @property
    def region_shape(self) -> tuple[int, int]:
        """(R, C) of the region features."""
        regions, channels = self.meta["region_shape"]
        return int(regions), int(channels)

    def face(self, variant: str) -> FaceFeatures:
        """The face features of `variant` ("L0".."L3", "aug0", ...)."""
        if variant not in self.variants:
            raise FeatureCacheError(
                f"{self.root}: no face variant {variant!r} (have {', '.join(self.variants)})"
            )
        folder = self.root / "faces" / variant
        return FaceFeatures(**{name: _load(folder / f"{name}.npy") for name in _FACE_FILES})

    def text(self) -> TextFeatures:
        """The caption features."""
        folder = self.root / "text"
        return TextFeatures(**{name: _load(folder / f"{name}.npy") for name in _TEXT_FILES})


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise FeatureCacheError(f"cannot read {path}: {exc}") from None


def build_cache(
    manifest: str | os.PathLike[str],
    lfw_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    augment_copies: int = 2,
    seed: int = 0,
    splits: Sequence[str] = ("train", "val", "test", "distractor"),
    batch_size: int = 128,
    progress: Progress | None = None,
    levels: Mapping[str, Sequence[int]] | None = None,
    text_length: int = TEXT_LENGTH,
    workers: int | None = None,
    face: ArcFaceRegions | None = None,
    text: TextEncoder | None = None,
) -> FeatureCache:
    """Compute (or reuse) the feature cache of a manifest's images and captions.

    Variant "L<k>" holds the images of the splits whose `levels` include k, at protocol level k
    (`degrade`); `levels` defaults to `DEFAULT_LEVELS`, and a split it does not name gets all
    four (so `levels={}` caches every level of every image). "aug0".."aug{K-1}" hold the train
    images through `random_degrade`, seeded by (seed, copy, image path) so a copy never depends
    on order or threads. A complete cache with the same key (manifest sha256, model fingerprints,
    options) is returned as it is; otherwise only the parts whose own key differs are rebuilt.
    `workers` threads decode, degrade and run ONNX Runtime (one intra-op thread each) while
    MiniLM encodes the captions on one more; `progress` may be called from either thread.
    `face` and `text` default to the vectron recogniser and MiniLM.
    """
    from tgfr_search.models.registry import file_sha256

    manifest, lfw_root, out = Path(manifest), Path(lfw_root), Path(out)
    unknown = sorted(set(splits) - {"train", "val", "test", "distractor"})
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}: use train, val, test, distractor")
    if augment_copies < 0:
        raise ValueError(f"augment_copies must be >= 0, not {augment_copies}")
    per_split = {s: tuple(_LEVELS) for s in splits}
    for split, chosen in (DEFAULT_LEVELS if levels is None else levels).items():
        if split in per_split:
            bad = sorted(set(chosen) - set(_LEVELS))
            if bad:
                raise ValueError(f"levels for {split}: {bad} are not protocol levels 0..3")
            per_split[split] = tuple(sorted(set(chosen)))
    workers = max(1, workers or os.cpu_count() or 1)
    if face is None:
        from tgfr_search.models.regions import ArcFaceRegions

        face = ArcFaceRegions(batch_size=batch_size, threads=1)
    if text is None:
        from tgfr_search.models.registry import minilm_dir
        from tgfr_search.models.text import MiniLM

        # As load_models' "minilm" builds it, on one ONNX Runtime thread beside the face workers.
        text = MiniLM(minilm_dir(), name="minilm", threads=1)

    rows = [r for r in read_manifest(manifest) if r["split"] in per_split]
    if not rows:
        raise DatasetError(f"{manifest} has no images in splits {list(splits)}")
    variants = [level_variant(lv) for lv in _LEVELS if any(lv in v for v in per_split.values())]
    has_train = "train" in per_split and any(r["split"] == "train" for r in rows)
    variants += [f"aug{k}" for k in range(augment_copies if has_train else 0)]
    key_fields = {
        "format": FORMAT_VERSION,
        "manifest_sha256": file_sha256(manifest),
        "face_fingerprint": face.fingerprint,
        "face_global_fingerprint": face.global_fingerprint,
        "text_fingerprint": text.fingerprint,
        "region_shape": list(face.region_shape),
        "text_length": int(text_length),
        "splits": sorted(per_split),
        "levels": {s: list(per_split[s]) for s in sorted(per_split)},
        "augment_copies": int(augment_copies),
        "seed": int(seed),
        "variants": variants,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    meta_path = out / "meta.json"
    try:
        old = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        old = None
    if old is not None and old.get("key") == key:
        return FeatureCache(out)

    cpu_started = time.process_time()
    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # from here on the folder is not a complete cache
    _write_rows(out / "rows.jsonl", rows)
    common = {k: key_fields[k] for k in ("format", "manifest_sha256", "splits")}
    timings: dict[str, float] = {}
    counts: dict[str, int] = {"rows": len(rows)}
    stop = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="features-text") as text_pool:
        # MiniLM on one torch thread runs beside the face workers: on a small, shared CPU that
        # beats giving each stage every core in turn (torch's thread barriers stall when a core
        # is busy elsewhere).
        text_key = _part_key(common, text=text.fingerprint, length=int(text_length))
        text_job = text_pool.submit(
            _text_part, out / "text", text_key, rows, text, int(text_length), progress, stop
        )
        try:
            for variant in variants:
                if variant.startswith("L"):
                    level = int(variant[1:])
                    members = [i for i, r in enumerate(rows) if level in per_split[r["split"]]]
                    make = _level_maker(level)
                    extra: dict[str, Any] = {"level": level}
                else:
                    copy = int(variant[3:])
                    members = [i for i, r in enumerate(rows) if r["split"] == "train"]
                    make = _augment_maker(seed, copy)
                    extra = {"copy": copy, "seed": int(seed)}
                part = _part_key(common, face=face.fingerprint, members=members, **extra)
                folder = out / "faces" / variant
                started = time.perf_counter()
                if not _is_done(folder, part):
                    _build_faces(
                        folder,
                        rows,
                        members,
                        make,
                        lfw_root,
                        face,
                        batch_size,
                        workers,
                        variant,
                        progress,
                    )
                    _mark_done(folder, part)
                timings[f"faces/{variant}"] = round(time.perf_counter() - started, 1)
                counts[variant] = len(members)
        except BaseException:
            stop.set()
            raise
        timings["text"], counts["truncated_captions"] = text_job.result()
    counts["captions"] = sum(len(r["captions"]) for r in rows)
    faces_dir = out / "faces"
    for stale in sorted(faces_dir.iterdir()) if faces_dir.is_dir() else []:
        if stale.is_dir() and stale.name not in variants and (stale / "done.json").exists():
            shutil.rmtree(stale)  # a variant of an earlier configuration
    meta = {
        **key_fields,
        "key": key,
        "manifest": str(manifest.resolve()),
        "lfw_root": str(lfw_root.resolve()),
        "counts": counts,
        "seconds": timings,
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "region_dtype": "float16",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_atomic(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    return FeatureCache(out)


CropMaker = Callable[[np.ndarray, str], np.ndarray]


def _part_key(common: Mapping[str, Any], **fields: Any) -> str:
    """A hash of everything one part (a face variant, the text) depends on."""
    blob = json.dumps({**common, **fields}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _text_part(
    folder: Path,
    key: str,
    rows: list[dict],
    text: TextEncoder,
    length: int,
    progress: Progress | None,
    stop: threading.Event,
) -> tuple[float, int]:
    """Build the text part unless done; return (seconds, captions cut to `length` tokens)."""
    started = time.perf_counter()
    if not _is_done(folder, key):
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            truncated = _build_text(folder, rows, text, length, progress, stop)
        finally:
            torch.set_num_threads(threads)
        _mark_done(folder, key, truncated=truncated)
    done = json.loads((folder / "done.json").read_text())
    return round(time.perf_counter() - started, 1), int(done["truncated"])


def _level_maker(level: int) -> CropMaker:
    from tgfr_search.training.degrade import degrade

    def make(img: np.ndarray, relative: str) -> np.ndarray:
        return degrade(img, level, relative)

    return make


def _augment_maker(seed: int, copy: int) -> CropMaker:
    from tgfr_search.training.degrade import random_degrade

    def make(img: np.ndarray, relative: str) -> np.ndarray:
        # The image's own seed keeps a copy identical whatever the subset, order or threads.
        image_seed = int(hashlib.md5(relative.encode()).hexdigest()[:8], 16)
        return random_degrade(img, np.random.default_rng([seed, copy, image_seed]))

    return make


def _build_faces(
    folder: Path,
    rows: list[dict],
    members: list[int],
    make: CropMaker,
    lfw_root: Path,
    face: ArcFaceRegions,
    batch_size: int,
    workers: int,
    variant: str,
    progress: Progress | None,
) -> None:
    """Encode the crops of `members` in batches, workers in parallel, into memory-mapped files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "done.json").unlink(missing_ok=True)
    n = len(members)
    regions_n, channels = face.region_shape
    batches = [members[i : i + batch_size] for i in range(0, n, batch_size)]

    def encode(batch: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        crops = []
        for i in batch:
            relative = _relative(rows[i]["image"])
            crops.append(make(_read(lfw_root / rows[i]["image"]), relative))
        emb, norms, regions = face.embed_full(crops)
        return emb, norms, regions.astype(np.float16)

    with _Writer(folder) as writer:
        g = writer.array("globals", (n, face.dim), np.float32)
        nm = writer.array("norms", (n,), np.float32)
        rg = writer.array("regions", (n, regions_n, channels), np.float16)
        writer.array("image", (n,), np.int32)[:] = np.asarray(members, dtype=np.int32)
        done = 0
        for emb, norms, regions in _ordered_map(encode, batches, workers):
            stop = done + len(emb)
            g[done:stop], nm[done:stop], rg[done:stop] = emb, norms, regions
            done = stop
            if progress is not None:
                progress(f"faces {variant}", done, n)


def _build_text(
    folder: Path,
    rows: list[dict],
    text: TextEncoder,
    length: int,
    progress: Progress | None,
    stop: threading.Event,
    step: int = 256,
) -> int:
    """Encode every caption, shortest first so batches pad little; return how many got cut."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "done.json").unlink(missing_ok=True)
    pairs = [(i, j) for i, r in enumerate(rows) for j in range(len(r["captions"]))]
    texts = [rows[i]["captions"][j] for i, j in pairs]
    m = len(texts)
    order = sorted(range(m), key=lambda k: (len(texts[k]), k))
    truncated = 0
    with _Writer(folder) as writer:
        tokens = writer.array("tokens", (m, length, text.dim), np.float16)
        mask = writer.array("mask", (m, length), np.bool_)
        sentence = writer.array("sentence", (m, text.dim), np.float32)
        writer.array("image", (m,), np.int32)[:] = [i for i, _ in pairs]
        writer.array("caption", (m,), np.int16)[:] = [j for _, j in pairs]
        for start in range(0, m, step):
            if stop.is_set():
                raise RuntimeError("feature cache build stopped")
            idx = np.asarray(order[start : start + step])
            enc = text.encode([texts[k] for k in idx])
            width = min(length, enc.tokens.shape[1])
            truncated += int(enc.mask[:, length:].any(axis=1).sum())
            block = np.zeros((len(idx), length, text.dim), dtype=np.float16)
            block[:, :width] = enc.tokens[:, :width]
            block_mask = np.zeros((len(idx), length), dtype=bool)
            block_mask[:, :width] = enc.mask[:, :width]
            # Sorted positions are scattered back to (image, caption) order.
            tokens[idx], mask[idx], sentence[idx] = block, block_mask, enc.sentence
            if progress is not None:
                progress("text", min(start + step, m), m)
    return truncated


def _ordered_map(
    fn: Callable[[list[int]], Any], batches: list[list[int]], workers: int
) -> Iterator[Any]:
    """`map(fn, batches)` on `workers` threads, in order, at most 2 * workers batches ahead."""
    if workers == 1:
        yield from map(fn, batches)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="features") as pool:
        pending = [pool.submit(fn, b) for b in batches[: 2 * workers]]
        following = iter(batches[2 * workers :])
        while pending:
            result = pending.pop(0).result()
            nxt = next(following, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield result


class _Writer:
    """Memory-mapped .npy files under temporary names, renamed into place on a clean exit."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: list[tuple[np.ndarray, Path, Path]] = []

    def array(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        final = self.folder / f"{name}.npy"
        tmp = self.folder / f".{name}.npy.{os.getpid()}.tmp"
        if int(np.prod(shape)) == 0:
            arr: np.ndarray = np.zeros(shape, dtype=dtype)  # an empty file cannot be mapped
        else:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        self.files.append((arr, tmp, final))
        return arr

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        files, self.files = self.files, []
        for arr, tmp, final in files:
            if exc_type is not None:
                tmp.unlink(missing_ok=True)
                continue
            if isinstance(arr, np.memmap):
                arr.flush()
            else:
                with tmp.open("wb") as stream:
                    np.save(stream, arr, allow_pickle=False)
            os.replace(tmp, final)


def _is_done(folder: Path, key: str) -> bool:
    try:
        done = json.loads((folder / "done.json").read_text())
    except (OSError, ValueError):
        return False
    return done.get("key") == key


def _mark_done(folder: Path, key: str, **extra: Any) -> None:
    _write_atomic(folder / "done.json", json.dumps({"key": key, **extra}).encode())


def _write_rows(path: Path, rows: list[dict]) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    _write_atomic(path, lines.encode())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _relative(image: str) -> str:
    """`aligned112/<Person>/<file>.jpg` -> `<Person>/<file>.jpg`, the protocol's seed path."""
    parts = Path(image).parts
    if len(parts) < 2:
        raise DatasetError(f"manifest image {image!r} is not <folder>/<Person>/<file>.jpg")
    return "/".join(parts[-2:])


def _read(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"cannot read image {path}")
    return img
