"""Metrics against brute force and hand-computed tiny cases; the protocol on a tiny manifest."""

from __future__ import annotations

import numpy as np
import pytest

from tgfr_search.training import metrics
from tgfr_search.training.evaluate import build_protocol


def test_ranks_hand_case():
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # mate 0, top
            [0.5, 0.4, 0.6],  # mate 1, two above -> rank 3
            [0.3, 0.8, 0.7],  # mate 2, one above -> rank 2
            [0.3, 0.8, 0.7],  # no mate
        ]
    )
    mate = np.array([0, 1, 2, -1])
    assert metrics.ranks(scores, mate).tolist() == [1, 3, 2, 4]
    assert metrics.rank_k(scores, mate, 1) == pytest.approx(1 / 3)
    assert metrics.rank_k(scores, mate, [2, 3]) == pytest.approx([2 / 3, 1.0])


def test_ranks_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 25)).round(1)  # ties on purpose
    mate = rng.integers(0, 25, size=40)
    brute = [1 + sum(scores[p, j] > scores[p, mate[p]] for j in range(25)) for p in range(40)]
    assert metrics.ranks(scores, mate).tolist() == brute


def test_genuine_impostor_split():
    scores = np.arange(12, dtype=float).reshape(3, 4)
    mate = np.array([1, 3, -1])
    gen, imp = metrics.genuine_impostor(scores, mate)
    assert gen.tolist() == [1.0, 7.0]
    assert sorted(imp.tolist()) == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 9.0, 10.0, 11.0]


def test_threshold_and_tar_hand_case():
    impostor = np.arange(1000) / 1000  # 0.000 .. 0.999
    # FAR 1e-2: at most 10 impostors strictly above -> threshold 0.989.
    assert metrics.threshold_at_far(impostor, 1e-2) == pytest.approx(0.989)
    assert metrics.threshold_at_far(impostor, 1e-3) == pytest.approx(0.998)
    genuine = np.array([0.5, 0.99, 0.995, 0.9985, 1.0])
    tars = metrics.tar_at_far(genuine, impostor, [1e-3, 1e-2])
    assert tars[1e-2] == pytest.approx(4 / 5)
    assert tars[1e-3] == pytest.approx(2 / 5)


def test_tar_at_far_brute_force():
    rng = np.random.default_rng(1)
    gen = rng.normal(2, 1, 300)
    imp = rng.normal(0, 1, 20000)
    for far, tar in metrics.tar_at_far(gen, imp, metrics.FARS).items():
        # Brute force: the lowest candidate threshold whose FAR is within bounds.
        cands = np.sort(imp)
        ok = [t for t in cands if (imp > t).mean() <= far]
        t = min(ok)
        assert (imp > t).mean() <= far
        assert tar == pytest.approx((gen > t).mean())


def test_eer():
    # Perfect separation: EER 0.
    assert metrics.eer(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    # Identical distributions: EER about 0.5.
    rng = np.random.default_rng(2)
    x = rng.normal(size=20000)
    assert metrics.eer(x[:10000], x[10000:]) == pytest.approx(0.5, abs=0.02)
    # Two unit Gaussians 2 apart cross at 1: EER = Phi(-1) ~ 0.1587.
    gen, imp = rng.normal(2, 1, 200000), rng.normal(0, 1, 200000)
    assert metrics.eer(gen, imp) == pytest.approx(0.1587, abs=0.005)
    # Hand case: gen {0.4, 0.8}, imp {0.2, 0.6}; at t=0.6 FAR=1/2 (imp>=t) FRR=1/2.
    assert metrics.eer(np.array([0.4, 0.8]), np.array([0.2, 0.6])) == pytest.approx(0.5)


def test_roc_curve_monotone():
    rng = np.random.default_rng(3)
    far, tar, thr = metrics.roc_curve(rng.normal(1, 1, 500), rng.normal(0, 1, 5000))
    assert np.all(np.diff(thr) < 0) and np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)
    far2, tar2, _ = metrics.roc_curve(rng.normal(1, 1, 500), rng.normal(0, 1, 5000), 50)
    assert len(far2) <= 50


def test_fnir_at_fpir_hand_case():
    # Non-mated top scores 0.1..1.0; at FPIR 0.1 the threshold is 0.9.
    nonmated = np.linspace(0.1, 1.0, 10)[:, None] * np.ones((1, 3))
    mated = np.array([[0.95, 0.2, 0.1], [0.85, 0.2, 0.1], [0.99, 0.999, 0.1]])
    scores = np.vstack([mated, nonmated])
    mate = np.array([0, 0, 0] + [-1] * 10)
    out = metrics.fnir_at_fpir(scores, mate, [0.1])
    # Probe 0 found at rank 1 above 0.9; probe 1 below the threshold; probe 2 at rank 2.
    assert out[0.1] == pytest.approx(2 / 3)


def test_group_rates_hand_case():
    scores = np.array([[0.9, 0.6, 0.2], [0.4, 0.7, 0.8]])
    mate = np.array([0, 1])
    res = metrics.group_rates(scores, mate, 0.5, ["a", "b"], ["a", "b", "a"])
    assert res["a"]["fnmr"] == 0.0 and res["b"]["fnmr"] == 0.0
    assert res["a"]["fmr"] == 0.0  # probe 0 vs gallery 2 (group a): 0.2
    assert res["a"]["fmr_all"] == pytest.approx(1 / 2)  # 0.6 above, 0.2 not
    assert np.isnan(res["b"]["fmr"])  # no same-group impostor for probe 1
    assert res["b"]["fmr_all"] == pytest.approx(1 / 2)


def test_summarise_keys():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(30, 50))
    mate = np.arange(30)
    scores[np.arange(30), mate] += 5
    out = metrics.summarise(scores, mate)
    assert set(out["tar_at_far"]) == {"0.0001", "0.001", "0.01"}
    assert 0.9 <= out["rank1"] <= 1 and 0 <= out["eer"] <= 0.1


def _row(person, n, split):
    return {
        "image": f"aligned112/{person}/{person}_{n:04d}.jpg",
        "identity": person,
        "split": split,
    }


def test_protocol_test_and_val():
    rows = [
        _row("B", 2, "test"),
        _row("B", 1, "test"),
        _row("B", 3, "test"),
        _row("A", 1, "test"),
        _row("A", 2, "test"),
        _row("D", 1, "distractor"),
        _row("T", 2, "train"),
        _row("T", 1, "train"),
        _row("V", 1, "val"),
        _row("V", 2, "val"),
    ]
    p = build_protocol(rows, "test")
    # Gallery: A_0001, B_0001, then the distractor; probes: A_0002, B_0002, B_0003.
    assert p.gallery.tolist() == [3, 1, 5]
    assert sorted(p.probes.tolist()) == [0, 2, 4]
    assert {int(i): int(m) for i, m in zip(p.probes, p.mate)} == {4: 0, 0: 1, 2: 1}
    v = build_protocol(rows, "val")
    assert v.gallery.tolist() == [8, 7] and v.probes.tolist() == [9] and v.mate.tolist() == [0]
    o = build_protocol(rows, "test", open_set=1.0)
    assert (o.mate == -1).all() and o.gallery.tolist() == [5]


def test_rank_k_breaks_ties_in_expectation() -> None:
    # The mate ties with three others: in the top 1 with probability 1/4, top 2 with 1/2.
    scores = np.array([[0.5, 0.5, 0.5, 0.5, 0.1]])
    assert metrics.rank_k(scores, np.array([0]), [1, 2, 4, 5]) == [0.25, 0.5, 1.0, 1.0]
    # A mate that scores like every entry (an empty caption) is not "found at rank 1".
    flat = np.zeros((1, 100))
    assert metrics.rank_k(flat, np.array([3]), 1) == pytest.approx(0.01)
