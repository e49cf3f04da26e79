"""Index by size: recall of the approximate indexes against brute force on face-like vectors,
filtered search, deletes, save/load, the torch backend, and the factory's choices."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tgfr_search.index import (
    FaissFlatIndex,
    FaissHNSWIndex,
    FaissIVFIndex,
    FaissPQIndex,
    build_index,
    choose_kind,
    load_index,
    make_index,
    needs_rebuild,
)
from tgfr_search.index import factory as factory_mod

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from facelike import FaceLike  # noqa: E402

K = 10


def brute(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    return ids[np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]]


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(got, truth)]))


@pytest.fixture(scope="module")
def faces() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """20k face-like 512-d gallery rows (ids unlike positions) and 100 probes."""
    data = FaceLike(seed=7).generate(20_000, 100)
    ids = np.arange(len(data.gallery), dtype=np.int64) * 3 + 11
    return data.gallery, ids, data.probes


@pytest.fixture(scope="module")
def pq(faces) -> FaissPQIndex:
    x, ids, _ = faces
    index = build_index(512, ids, x, kind="pq")
    assert isinstance(index, FaissPQIndex)
    return index


def test_pq_recall_at_10_against_brute_force(faces, pq) -> None:
    x, ids, q = faces
    scores, got = pq.search(q, K)
    assert recall(got, brute(x, ids, q)) >= 0.99
    # Scores are exact (re-ranked on float32 vectors) and best first.
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    pos = (got - 11) // 3
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", x[pos], q), atol=1e-5)


@pytest.mark.parametrize("fraction", [0.01, 0.3])
def test_pq_filtered_search_recall(faces, pq, fraction: float) -> None:
    x, ids, q = faces
    keep = np.sort(np.random.default_rng(1).choice(len(ids), int(fraction * len(ids)), False))
    _, got = pq.search(q, K, subset=ids[keep])
    assert np.isin(got, ids[keep]).all()
    want = 1.0 if fraction <= pq.exact_fraction else 0.99
    assert recall(got, brute(x[keep], ids[keep], q)) >= want


def test_pq_long_result_lists_are_exact(faces, pq) -> None:
    x, ids, q = faces
    _, got = pq.search(q[:3], 12_000)  # the engine widens k until it sees k identities
    np.testing.assert_array_equal(got[:, :200], brute(x, ids, q[:3], 200))
    half = ids[::2]
    _, got = pq.search(q[:3], 4000, subset=half)
    np.testing.assert_array_equal(got[:, :200], brute(x[::2], half, q[:3], 200))


def test_subset_smaller_than_k_is_padded(pq, faces) -> None:
    _, ids, q = faces
    scores, got = pq.search(q[:2], K, subset=ids[[5, 9, 400]])
    assert set(got[0][:3]) == {ids[5], ids[9], ids[400]} and (got[:, 3:] == -1).all()


def test_pq_deletes_save_load_and_rebuild_hint(faces, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(factory_mod, "FLAT_MAX", 1000)  # so size alone asks for no change
    x, ids, q = faces
    index = build_index(512, ids[:8000], x[:8000], kind="pq")
    gone = ids[:8000][::3]
    index.remove(gone)
    index.remove(gone[:10])  # removing twice is a no-op
    assert len(index) == 8000 - len(gone) and index.tombstones == len(gone)
    assert not np.isin(index.ids(), gone).any()
    for subset in (None, ids[:8000][::2], ids[:8000][:40]):
        _, got = index.search(q, 50, subset=subset)
        assert not np.isin(got, gone).any()
    live = ~np.isin(ids[:8000], gone)
    assert recall(index.search(q, K)[1], brute(x[:8000][live], ids[:8000][live], q)) >= 0.99
    assert "tombstones" in (needs_rebuild(index, use_gpu=False) or "")

    index.save(tmp_path / "pq.faiss")
    again = load_index(tmp_path / "pq.faiss", use_gpu=False)
    assert isinstance(again, FaissPQIndex) and len(again) == len(index)
    np.testing.assert_array_equal(again.search(q, K)[1], index.search(q, K)[1])
    assert not list(tmp_path.glob("*.tmp"))


def test_hnsw_recall_tombstones_and_round_trip(faces, tmp_path: Path) -> None:
    x, ids, q = faces
    x, ids = x[:3000], ids[:3000]
    index = build_index(512, ids, x, kind="hnsw", ef_search=256)
    assert isinstance(index, FaissHNSWIndex)
    assert recall(index.search(q, K)[1], brute(x, ids, q)) >= 0.99
    index.remove(ids[:500])
    _, got = index.search(q, 100)
    assert not np.isin(got, ids[:500]).any() and len(index) == 2500
    small = ids[1000:1020]  # exact scan over the subset
    np.testing.assert_array_equal(
        index.search(q, 5, subset=small)[1], brute(x[1000:1020], small, q, 5)
    )
    index.save(tmp_path / "h.faiss")
    again = load_index(tmp_path / "h.faiss")
    assert isinstance(again, FaissHNSWIndex) and again.tombstones == 500
    np.testing.assert_array_equal(again.search(q, K)[1], index.search(q, K)[1])


def test_ivf_removes_filters_exactly_and_keeps_nprobe(faces, tmp_path: Path) -> None:
    x, ids, q = faces
    index = build_index(512, ids, x, kind="ivf", use_gpu=False, nlist=64, nprobe=32)
    assert isinstance(index, FaissIVFIndex) and index.nlist == 64
    index.remove(ids[:1000])
    assert len(index) == 19_000 and not np.isin(index.ids(), ids[:1000]).any()
    small = ids[5000:5500]  # below exact_fraction: every list probed, so exact
    np.testing.assert_array_equal(
        index.search(q, K, subset=small)[1], brute(x[5000:5500], small, q)
    )
    index.save(tmp_path / "ivf.faiss")
    again = load_index(tmp_path / "ivf.faiss", use_gpu=False)
    assert isinstance(again, FaissIVFIndex) and again.nprobe == 32
    np.testing.assert_array_equal(again.search(q, K)[1], index.search(q, K)[1])


def test_torch_index_is_exact_against_numpy_on_cpu(faces, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from tgfr_search.index import TorchIndex

    x, ids, q = faces
    x, ids = x[:6000], ids[:6000]
    one = TorchIndex(512, devices=["cpu"], dtype=torch.float32)
    two = TorchIndex(512, devices=["cpu", "cpu"], dtype=torch.float32, chunk_rows=1000)
    for index in (one, two):
        index.add(ids[:2500], x[:2500])
        index.add(ids[2500:], x[2500:])
        scores, got = index.search(q, K)
        np.testing.assert_array_equal(got, brute(x, ids, q))
        np.testing.assert_allclose(scores[:, 0], np.max(q @ x.T, axis=1), rtol=1e-5)
        sub = ids[::7]
        np.testing.assert_array_equal(index.search(q, K, subset=sub)[1], brute(x[::7], sub, q))
    assert [s.n for s in two._shards] == [3000, 3000]
    two.remove(ids[:100])
    assert len(two) == 5900 and not np.isin(two.search(q, 50)[1], ids[:100]).any()
    two.save(tmp_path / "t.faiss")
    flat = load_index(tmp_path / "t.faiss", use_gpu=False)
    assert isinstance(flat, FaissFlatIndex)
    np.testing.assert_array_equal(flat.search(q, K)[1], two.search(q, K)[1])
    back = TorchIndex.load(tmp_path / "t.faiss", devices=["cpu"], dtype=torch.float32)
    np.testing.assert_array_equal(back.search(q, K)[1], two.search(q, K)[1])


def test_torch_fp16_file_holds_the_rows_bytes(faces, tmp_path: Path) -> None:
    """An fp16 TorchIndex (as on CUDA) saves its rows as they are, in half the bytes, and the
    file opens as either exact index with the same vectors and ids."""
    torch = pytest.importorskip("torch")
    from tgfr_search.index import TorchIndex
    from tgfr_search.index.faiss_index import read_exact

    x, ids, q = faces
    x16, ids = x[:3000].astype(np.float16), ids[:3000]
    half = TorchIndex(512, devices=["cpu", "cpu"], dtype=torch.float16)
    half.add(ids, x16)
    half.save(tmp_path / "h.faiss")
    dim, got_ids, got = read_exact(tmp_path / "h.faiss")
    assert dim == 512 and got.dtype == np.float16
    order = np.argsort(got_ids)
    np.testing.assert_array_equal(got_ids[order], np.sort(ids))
    np.testing.assert_array_equal(got[order], x16[np.argsort(ids)])
    full = TorchIndex(512, devices=["cpu"], dtype=torch.float32)
    full.add(ids, x16)
    full.save(tmp_path / "f.faiss")
    assert (tmp_path / "h.faiss").stat().st_size < 0.55 * (tmp_path / "f.faiss").stat().st_size
    flat = load_index(tmp_path / "h.faiss", use_gpu=False)
    assert isinstance(flat, FaissFlatIndex) and len(flat) == 3000
    want = brute(x16.astype(np.float32), ids, q)
    np.testing.assert_array_equal(flat.search(q, K)[1], want)
    back = TorchIndex.load(tmp_path / "h.faiss", devices=["cpu"], dtype=torch.float32)
    np.testing.assert_array_equal(back.search(q, K)[1], want)


@pytest.mark.gpu
def test_torch_fp16_on_cuda_matches_fp32(faces) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from tgfr_search.index import TorchIndex

    x, ids, q = faces
    index = TorchIndex(512)  # every CUDA device, fp16
    index.add(ids, x)
    assert recall(index.search(q, K)[1], brute(x, ids, q)) >= 0.99


def test_factory_picks_flat_below_the_threshold_and_pq_above(monkeypatch) -> None:
    assert choose_kind(1000, use_gpu=False) == "flat"
    assert choose_kind(factory_mod.FLAT_MAX, use_gpu=False) == "flat"
    assert choose_kind(factory_mod.FLAT_MAX + 1, use_gpu=False) == "pq"
    assert isinstance(make_index(64, 10, use_gpu=False), FaissFlatIndex)
    assert isinstance(make_index(512, 10**6, use_gpu=False), FaissPQIndex)
    with pytest.raises(ValueError):
        make_index(64, kind="lsh")

    monkeypatch.setattr(factory_mod, "FLAT_MAX", 500)
    data = FaceLike(seed=2).generate(1200, 5)
    ids = np.arange(1200)
    flat = make_index(512, 400, use_gpu=False)
    flat.add(ids[:400], data.gallery[:400])
    assert needs_rebuild(flat, use_gpu=False) is None
    flat.add(ids[400:], data.gallery[400:])
    assert "pq" in (needs_rebuild(flat, use_gpu=False) or "")
    ann = build_index(512, ids, data.gallery, use_gpu=False)
    assert isinstance(ann, FaissPQIndex) and needs_rebuild(ann, use_gpu=False) is None
    np.testing.assert_array_equal(
        ann.search(data.probes, 5)[1], brute(data.gallery, ids, data.probes, 5)
    )
