"""The feature cache, built from a tiny manifest of real LFW faces."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

LFW = Path(
    os.environ.get("TGFR_LFW", Path(__file__).resolve().parents[1].parent / "shared/datasets/lfw")
)

CAPTIONS = [
    "A man with short dark hair.",
    "A smiling middle-aged man with grey hair, a moustache and glasses.",
    "She is a young woman.",
]


@pytest.fixture(scope="module")
def lfw_aligned() -> Path:
    if not (LFW / "aligned112").is_dir() or not (LFW / "splits.json").is_file():
        pytest.skip(f"LFW not found at {LFW} (set TGFR_LFW)")
    return LFW


@pytest.fixture(scope="module")
def rows(lfw_aligned: Path) -> list[dict]:
    """12 real images of 5 people: 3+3 train, 2 val, 3 test, 1 distractor."""
    splits = json.loads((lfw_aligned / "splits.json").read_text())
    wanted = [("train", 3), ("train", 3), ("val", 2), ("test", 3), ("distractors", 1)]
    used: set[str] = set()
    out = []
    for key, count in wanted:
        for person in sorted(splits[key]):
            files = sorted((lfw_aligned / "aligned112" / person).glob("*.jpg"))
            if person not in used and len(files) >= count:
                used.add(person)
                break
        split = "distractor" if key == "distractors" else key
        for f in files[:count]:
            n = len(out)
            # Varied caption counts, including an image without any.
            captions = [CAPTIONS[(n + k) % 3] for k in range(n % 3)]
            out.append(
                {
                    "image": f"aligned112/{person}/{f.name}",
                    "identity": person,
                    "split": split,
                    "captions": captions,
                }
            )
    assert len(out) == 12
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def encoders():
    from tgfr_search.models.regions import ArcFaceRegions
    from tgfr_search.models.registry import minilm_dir
    from tgfr_search.models.text import MiniLM

    return ArcFaceRegions(batch_size=5, threads=1), MiniLM(minilm_dir(), name="minilm")


@pytest.fixture(scope="module")
def built(tmp_path_factory, rows, lfw_aligned, encoders):
    from tgfr_search.training.features import build_cache

    tmp = tmp_path_factory.mktemp("features")
    manifest = _write(tmp / "manifest.jsonl", rows)
    calls: Counter[str] = Counter()

    def progress(stage: str, done: int, total: int) -> None:
        calls[stage] += 1

    face, text = encoders
    cache = build_cache(
        manifest,
        lfw_aligned,
        tmp / "cache",
        batch_size=5,
        workers=2,
        progress=progress,
        face=face,
        text=text,
    )
    return cache, manifest, calls


def _build(manifest, lfw, out, encoders, **kw):
    from tgfr_search.training.features import build_cache

    face, text = encoders
    return build_cache(manifest, lfw, out, batch_size=5, face=face, text=text, **kw)


def _crop(lfw: Path, row: dict, level: int) -> np.ndarray:
    import cv2

    from tgfr_search.training.degrade import degrade

    img = cv2.imread(str(lfw / row["image"]))
    return degrade(img, level, row["image"].split("/", 1)[1])


def test_layout_shapes_and_dtypes(built, rows):
    cache, _, calls = built
    assert cache.rows == rows
    assert cache.variants == ["L0", "L1", "L2", "L3", "aug0", "aug1"]
    assert cache.region_shape == (49, 512)
    assert calls["faces L0"] >= 3  # 12 crops in batches of 5
    for variant in cache.variants:
        f = cache.face(variant)
        n = len(f.image)
        assert f.globals.shape == (n, 512) and f.globals.dtype == np.float32
        assert f.norms.shape == (n,) and f.norms.dtype == np.float32
        assert f.regions.shape == (n, 49, 512) and f.regions.dtype == np.float16
        assert f.image.dtype == np.int32
        np.testing.assert_allclose(np.linalg.norm(f.globals, axis=1), 1.0, atol=1e-5)
        assert np.isfinite(f.regions).all() and np.all(f.norms > 0)
    t = cache.text()
    m = sum(len(r["captions"]) for r in rows)
    assert t.tokens.shape == (m, 40, 384) and t.tokens.dtype == np.float16
    assert t.mask.shape == (m, 40) and t.mask.dtype == np.bool_
    assert t.sentence.shape == (m, 384) and t.sentence.dtype == np.float32
    assert t.image.dtype == np.int32 and t.caption.dtype == np.int16
    assert cache.meta["counts"]["captions"] == m
    assert cache.meta["counts"]["truncated_captions"] == 0


def test_image_index_mapping(built, rows):
    cache, _, _ = built
    split = np.array([r["split"] for r in rows])
    np.testing.assert_array_equal(cache.face("L0").image, np.arange(len(rows)))
    # Degraded levels are probes: val and test only (DEFAULT_LEVELS); augmentations: train only.
    probes = np.flatnonzero((split == "val") | (split == "test"))
    np.testing.assert_array_equal(cache.face("L3").image, probes)
    np.testing.assert_array_equal(cache.face("aug1").image, np.flatnonzero(split == "train"))
    t = cache.text()
    pairs = [(i, j) for i, r in enumerate(rows) for j in range(len(r["captions"]))]
    assert list(zip(t.image.tolist(), t.caption.tolist())) == pairs


def test_globals_match_the_engine(built, rows, lfw_aligned):
    from tgfr_search.models.registry import load_models

    cache, _, _ = built
    engine_face = load_models("vectron", text=None).face
    l0 = cache.face("L0")
    reference = engine_face.embed([_crop(lfw_aligned, r, 0) for r in rows])
    assert ((reference * l0.globals).sum(axis=1) > 0.9999).all()
    l3 = cache.face("L3")
    reference3 = engine_face.embed([_crop(lfw_aligned, rows[i], 3) for i in l3.image])
    assert ((reference3 * l3.globals).sum(axis=1) > 0.9999).all()
    # Level 3 moves every face, and lowers the norm (a quality signal) on average.
    assert ((l0.globals[l3.image] * l3.globals).sum(axis=1) < 0.95).all()
    assert l3.norms.mean() < l0.norms[l3.image].mean()
    assert not np.array_equal(cache.face("aug0").globals, cache.face("aug1").globals)


def test_text_matches_the_encoder(built, rows, encoders):
    cache, _, _ = built
    t = cache.text()
    texts = [rows[i]["captions"][j] for i, j in zip(t.image, t.caption)]
    enc = encoders[1].encode(texts)
    assert ((enc.sentence * t.sentence).sum(axis=1) > 0.9999).all()
    lengths = enc.mask.sum(axis=1)
    np.testing.assert_array_equal(t.mask.sum(axis=1), lengths)
    for k, n in enumerate(lengths):
        np.testing.assert_allclose(t.tokens[k, :n], enc.tokens[k, :n], atol=2e-2, rtol=1e-2)
        assert not t.tokens[k, n:].any()


def test_second_build_reuses(built, lfw_aligned, encoders):
    cache, manifest, _ = built
    meta = cache.root / "meta.json"
    regions = cache.root / "faces" / "L0" / "regions.npy"
    before = (meta.stat().st_mtime_ns, regions.stat().st_mtime_ns)
    calls: list[str] = []
    again = _build(
        manifest, lfw_aligned, cache.root, encoders, progress=lambda s, d, t: calls.append(s)
    )
    assert calls == []
    assert (meta.stat().st_mtime_ns, regions.stat().st_mtime_ns) == before
    assert again.meta == cache.meta


def test_changed_manifest_rebuilds(tmp_path, rows, lfw_aligned, encoders):
    out = tmp_path / "cache"
    manifest = _write(tmp_path / "m.jsonl", rows)
    first = _build(manifest, lfw_aligned, out, encoders)
    changed = [dict(r) for r in rows]
    changed[0] = {**changed[0], "captions": ["A bald man with a beard."]}
    _write(manifest, changed)
    calls: Counter[str] = Counter()
    second = _build(
        manifest,
        lfw_aligned,
        out,
        encoders,
        progress=lambda s, d, t: calls.update([s]),
    )
    assert second.meta["manifest_sha256"] != first.meta["manifest_sha256"]
    assert calls["text"] > 0 and calls["faces L0"] > 0
    assert second.rows == changed
    t = second.text()
    assert t.image[0] == 0 and t.caption[0] == 0
    assert len(t.image) == sum(len(r["captions"]) for r in changed)


def test_interrupted_build_resumes_missing_parts(tmp_path, rows, lfw_aligned, encoders):
    out = tmp_path / "cache"
    manifest = _write(tmp_path / "m.jsonl", rows)
    _build(manifest, lfw_aligned, out, encoders, augment_copies=1)
    # As if the build had stopped while computing L2: its part and the meta are missing.
    (out / "meta.json").unlink()
    (out / "faces" / "L2" / "done.json").unlink()
    calls: Counter[str] = Counter()
    cache = _build(
        manifest,
        lfw_aligned,
        out,
        encoders,
        augment_copies=1,
        progress=lambda s, d, t: calls.update([s]),
    )
    assert set(calls) == {"faces L2"}
    assert cache.variants == ["L0", "L1", "L2", "L3", "aug0"]


def test_levels_and_splits_select_variants(tmp_path, rows, lfw_aligned, encoders):
    manifest = _write(tmp_path / "m.jsonl", rows)
    cache = _build(
        manifest,
        lfw_aligned,
        tmp_path / "cache",
        encoders,
        splits=("test", "distractor"),
        levels={"test": (0, 3)},
        augment_copies=2,
    )
    assert [r["split"] for r in cache.rows] == ["test"] * 3 + ["distractor"]
    assert cache.variants == ["L0", "L1", "L2", "L3"]  # distractor gets all four; no train
    np.testing.assert_array_equal(cache.face("L3").image, [0, 1, 2, 3])
    np.testing.assert_array_equal(cache.face("L1").image, [3])


def test_missing_cache_is_an_error(tmp_path):
    from tgfr_search.errors import TGFRError
    from tgfr_search.training.features import FeatureCache

    with pytest.raises(TGFRError, match="not a complete feature cache"):
        FeatureCache(tmp_path)
