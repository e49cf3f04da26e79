"""The face-like vector generator: seeded, chunk-independent, and matched to real ArcFace pairs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from facelike import FITTED, REAL, FaceLike, pair_cosines, simulate  # noqa: E402


def test_rows_are_unit_vectors_and_generation_is_seeded() -> None:
    a = FaceLike(seed=3).generate(5000, 40)
    b = FaceLike(seed=3).generate(5000, 40)
    assert a.gallery.shape == (5000, 512) and a.gallery.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a.gallery, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(a.gallery, b.gallery)
    np.testing.assert_array_equal(a.probes, b.probes)
    assert not np.array_equal(a.gallery, FaceLike(seed=4).generate(5000).gallery)


def test_chunks_equal_the_whole_gallery() -> None:
    gen = FaceLike(seed=1)
    whole = gen.generate(40_000)
    parts = list(gen.iter_gallery(40_000, chunk=15_000))
    assert len(parts) > 1
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole.gallery)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole.labels)


def test_identities_and_probes() -> None:
    data = FaceLike(seed=0, photos_per_identity=3.0).generate(30_000, 200)
    counts = np.bincount(data.labels)
    assert counts.sum() == 30_000 and counts.min() >= 1
    assert 2.7 < counts.mean() < 3.3
    assert np.isin(data.probe_labels, data.labels).all()
    # A probe's best gallery match is its own identity far more often than not.
    best = data.labels[np.argmax(data.probes @ data.gallery.T, axis=1)]
    assert np.mean(best == data.probe_labels) > 0.9


def test_pair_cosines_match_the_real_lfw_pairs() -> None:
    stats = simulate(FITTED, identities=4000)
    for kind, tol_mean, tol_std in (("genuine", 0.01, 0.01), ("impostor", 0.005, 0.006)):
        got, real = stats[kind], REAL[kind]
        assert abs(got["mean"] - real["mean"]) < tol_mean, kind
        assert abs(got["std"] - real["std"]) < tol_std, kind
        np.testing.assert_allclose(got["quantiles"], real["quantiles"], atol=0.025)


def test_torch_device_path_has_the_same_distribution() -> None:
    torch = pytest.importorskip("torch")
    data = FaceLike(seed=0).generate(9000, 10, dtype=np.float16, device="cpu")
    assert isinstance(data.gallery, torch.Tensor) and data.gallery.dtype == torch.float16
    x = data.gallery.float().numpy()
    genuine, impostor = pair_cosines(x, data.labels)
    assert abs(genuine.mean() - REAL["genuine"]["mean"]) < 0.02
    assert abs(impostor.std() - REAL["impostor"]["std"]) < 0.01
