"""ArcFaceRegions on real aligned LFW crops: same global vectors as the engine, plus regions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

LFW = Path(
    os.environ.get("TGFR_LFW", Path(__file__).resolve().parents[1].parent / "shared/datasets/lfw")
)


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    import cv2

    aligned = LFW / "aligned112"
    if not aligned.is_dir():
        pytest.skip(f"LFW aligned crops not found at {aligned} (set TGFR_LFW)")
    # Two faces each of 16 people: different identities and repeated ones.
    people = sorted(p for p in aligned.iterdir() if p.is_dir() and len(list(p.glob("*.jpg"))) >= 2)
    paths = [f for p in people[:16] for f in sorted(p.glob("*.jpg"))[:2]]
    return np.stack([cv2.imread(str(f)) for f in paths])


@pytest.fixture(scope="module")
def regions_model():
    from tgfr_search.models.regions import ArcFaceRegions

    return ArcFaceRegions(batch_size=8)


@pytest.fixture(scope="module")
def engine_face():
    from tgfr_search.models.registry import load_models

    return load_models("vectron", text=None).face


def test_global_matches_the_engine_encoder(crops, regions_model, engine_face):
    emb, norms, _ = regions_model.embed_full(crops)
    reference = engine_face.embed(crops)
    assert emb.shape == (len(crops), 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    cosine = (emb * reference).sum(axis=1)
    assert cosine.min() > 0.9999, cosine.min()
    assert norms.shape == (len(crops),) and norms.dtype == np.float32
    assert np.all(norms > 1.0)
    np.testing.assert_array_equal(regions_model.embed(crops), emb)


def test_regions_shape_and_values(crops, regions_model):
    _, _, regions = regions_model.embed_full(crops)
    assert regions_model.region_shape == (49, 512)
    assert regions.shape == (len(crops), 49, 512) and regions.dtype == np.float32
    assert np.isfinite(regions).all()
    # A PReLU output of a real face: signed values, and not a constant map.
    assert regions.min() < 0 < regions.max()
    assert regions.std(axis=1).mean() > 0.01


def test_batch_equals_one_by_one(crops, regions_model):
    emb, norms, regions = regions_model.embed_full(crops)
    for i in (0, 7, 8, len(crops) - 1):
        e1, n1, r1 = regions_model.embed_full(crops[i : i + 1])
        np.testing.assert_allclose(e1[0], emb[i], atol=1e-5)
        np.testing.assert_allclose(n1[0], norms[i], rtol=1e-5)
        np.testing.assert_allclose(r1[0], regions[i], atol=1e-4)


def test_plain_prelu_graph_agrees(crops, regions_model):
    from tgfr_search.models.regions import ArcFaceRegions

    plain = ArcFaceRegions(fast_prelu=False)
    e0, n0, r0 = plain.embed_full(crops[:4])
    e1, n1, r1 = regions_model.embed_full(crops[:4])
    np.testing.assert_allclose(e1, e0, atol=1e-5)
    np.testing.assert_allclose(n1, n0, rtol=1e-5)
    np.testing.assert_allclose(r1, r0, atol=1e-4)


def test_fingerprint_extends_the_engine_one(regions_model, engine_face):
    assert regions_model.global_fingerprint == engine_face.fingerprint
    assert regions_model.fingerprint == f"{engine_face.fingerprint}+regions:509:512x7x7"


def test_empty_batch_and_bad_crop(regions_model):
    emb, norms, regions = regions_model.embed_full([])
    assert emb.shape == (0, 512) and norms.shape == (0,) and regions.shape == (0, 49, 512)
    with pytest.raises(ValueError, match="112x112x3"):
        regions_model.embed_full([np.zeros((64, 64, 3), np.uint8)])


def test_unknown_region_tensor_is_refused():
    from tgfr_search.models.regions import ArcFaceRegions

    with pytest.raises(ValueError, match="no intermediate tensor"):
        ArcFaceRegions(region_tensor="no-such-tensor")
