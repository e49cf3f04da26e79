from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tgfr_search.index import FaissFlatIndex


def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(db: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :k]]


@pytest.fixture
def data():
    db, q = unit(2000, 64, 0), unit(20, 64, 1)
    ids = np.arange(2000, dtype=np.int64) * 7 + 3
    index = FaissFlatIndex(64)
    index.add(ids, db)
    return index, db, ids, q


def test_exact_search_equals_brute_force(data) -> None:
    index, db, ids, q = data
    scores, got = index.search(q, 10)
    np.testing.assert_array_equal(got, brute_force(db, ids, q, 10))
    np.testing.assert_allclose(scores[:, 0], np.max(q @ db.T, axis=1), rtol=1e-5)


def test_filtered_search_is_the_top_k_of_the_subset(data) -> None:
    index, db, ids, q = data
    keep = np.random.default_rng(2).choice(len(ids), 150, replace=False)
    _, got = index.search(q, 10, subset=ids[keep])
    np.testing.assert_array_equal(got, brute_force(db[keep], ids[keep], q, 10))


def test_remove_and_save_roundtrip(data, tmp_path: Path) -> None:
    index, db, ids, q = data
    index.remove(ids[:100])
    assert len(index) == 1900 and not set(ids[:100]) & set(index.ids().tolist())
    index.save(tmp_path / "i.faiss")
    again = FaissFlatIndex.load(tmp_path / "i.faiss")
    np.testing.assert_array_equal(again.search(q, 5)[1], index.search(q, 5)[1])
    assert not list(tmp_path.glob("*.tmp"))


def test_empty_index_returns_no_hits() -> None:
    scores, ids = FaissFlatIndex(8).search(unit(2, 8, 0), 5)
    assert scores.shape == (2, 0) and ids.shape == (2, 0)
