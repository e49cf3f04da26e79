"""Identification and verification metrics over a probe x gallery score matrix (vectorised numpy).

Conventions, shared by every function here:

- `scores` is a (P, G) similarity matrix (higher = more alike), `mate` is (P,) with the gallery
  column of each probe's own person, or -1 for a probe whose person is not in the gallery
  (open set).
- Genuine scores are probe vs its own person's gallery entry; impostor scores are probe vs every
  other gallery entry.
- A comparison *matches* at threshold `t` when its score is strictly greater than `t`, so the
  threshold for a FAR is the largest value that lets through at most `FAR * n_impostors`
  impostors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import overload

import numpy as np

__all__ = [
    "FARS",
    "eer",
    "fnir_at_fpir",
    "genuine_impostor",
    "group_rates",
    "rank_k",
    "ranks",
    "roc_curve",
    "summarise",
    "tar_at_far",
    "threshold_at_far",
]

#: The false accept rates reported by `evaluate`.
FARS: tuple[float, ...] = (1e-4, 1e-3, 1e-2)


def _check(scores: np.ndarray, mate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    mate = np.asarray(mate, dtype=np.int64)
    if scores.ndim != 2 or mate.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (P, G) and mate (P,), got {scores.shape}, {mate.shape}")
    if mate.size and mate.max() >= scores.shape[1]:
        raise ValueError("mate holds a column outside the gallery")
    return scores, mate


def ranks(scores: np.ndarray, mate: np.ndarray) -> np.ndarray:
    """1-based rank of each probe's mate: 1 + the number of gallery entries scoring strictly higher.

    Probes without a mate (mate = -1) get rank G + 1, so they never count as found.
    """
    scores, mate = _check(scores, mate)
    out = np.full(scores.shape[0], scores.shape[1] + 1, dtype=np.int64)
    has = mate >= 0
    if has.any():
        genuine = scores[has, mate[has]]
        out[has] = 1 + (scores[has] > genuine[:, None]).sum(axis=1)
    return out


@overload
def rank_k(scores: np.ndarray, mate: np.ndarray, k: int = 1) -> float: ...
@overload
def rank_k(scores: np.ndarray, mate: np.ndarray, k: Sequence[int]) -> list[float]: ...
def rank_k(scores: np.ndarray, mate: np.ndarray, k: int | Sequence[int] = 1) -> float | list[float]:
    """Fraction of mated probes whose mate ranks within the top k (a list for a list of k).

    Ties are broken at random, in expectation: a mate tied with t other entries below g higher
    ones is in the top k with probability clip((k - g) / (t + 1), 0, 1). Coarse scores (a bag
    of words) tie often; counting a tie as a win would inflate them.
    """
    scores, mate = _check(scores, mate)
    has = mate >= 0
    if not has.any():
        return float("nan") if isinstance(k, int) else [float("nan") for _ in k]
    genuine = scores[has, mate[has]][:, None]
    higher = (scores[has] > genuine).sum(axis=1)
    ties = (scores[has] == genuine).sum(axis=1) - 1

    def at(kk: int) -> float:
        return float(np.clip((kk - higher) / (ties + 1), 0.0, 1.0).mean())

    return at(k) if isinstance(k, int) else [at(kk) for kk in k]


def genuine_impostor(scores: np.ndarray, mate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split scores into genuine (probe vs own gallery entry) and impostor (every other entry)."""
    scores, mate = _check(scores, mate)
    has = mate >= 0
    genuine = scores[has, mate[has]]
    keep = np.ones(scores.shape, dtype=bool)
    keep[np.flatnonzero(has), mate[has]] = False
    return genuine, scores[keep]


def threshold_at_far(impostor: np.ndarray, far: float | Sequence[float]) -> np.ndarray | float:
    """Smallest threshold whose FAR (fraction of impostors strictly above it) is at most `far`.

    That is the impostor score at descending position floor(far * n): at most that many
    impostors lie strictly above it.
    """
    imp = np.asarray(impostor, dtype=np.float64).ravel()
    if imp.size == 0:
        raise ValueError("no impostor scores")
    fars = np.atleast_1d(np.asarray(far, dtype=np.float64))
    idx = np.clip(np.floor(fars * imp.size).astype(np.int64), 0, imp.size - 1)
    # Descending position idx is ascending position n - 1 - idx; partition beats a full sort.
    asc = imp.size - 1 - idx
    out = np.partition(imp, np.unique(asc))[asc]
    return float(out[0]) if np.ndim(far) == 0 else out


def tar_at_far(
    genuine: np.ndarray, impostor: np.ndarray, far: float | Sequence[float] = FARS
) -> dict[float, float]:
    """True accept rate (genuine strictly above the FAR threshold) at each FAR."""
    fars = [float(f) for f in np.atleast_1d(np.asarray(far, dtype=np.float64))]
    thresholds = np.atleast_1d(threshold_at_far(impostor, fars))
    gen = np.asarray(genuine, dtype=np.float64).ravel()
    return {f: float((gen > t).mean()) for f, t in zip(fars, thresholds)}


def roc_curve(
    genuine: np.ndarray, impostor: np.ndarray, n_points: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FAR, TAR and thresholds at every distinct score (descending thresholds).

    `n_points` subsamples the curve evenly on a log-FAR scale (for plots); None keeps all.
    """
    gen = np.sort(np.asarray(genuine, dtype=np.float64).ravel())
    imp = np.sort(np.asarray(impostor, dtype=np.float64).ravel())
    thr = np.unique(np.concatenate([gen, imp]))[::-1]
    # Matches are strictly above the threshold.
    far = (imp.size - np.searchsorted(imp, thr, side="right")) / max(imp.size, 1)
    tar = (gen.size - np.searchsorted(gen, thr, side="right")) / max(gen.size, 1)
    if n_points is not None and thr.size > n_points:
        grid = np.logspace(np.log10(max(1.0 / max(imp.size, 1), 1e-8)), 0, n_points)
        idx = np.unique(np.clip(np.searchsorted(far, grid, side="right") - 1, 0, thr.size - 1))
        far, tar, thr = far[idx], tar[idx], thr[idx]
    return far, tar, thr


def eer(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Equal error rate: where the false accept and false reject rates cross.

    Sweeps every distinct score as a threshold (match = score >= t here, so FRR(t) is the
    fraction of genuine strictly below t) and averages FAR and FRR at the closest crossing.
    """
    gen = np.sort(np.asarray(genuine, dtype=np.float64).ravel())
    imp = np.sort(np.asarray(impostor, dtype=np.float64).ravel())
    if gen.size == 0 or imp.size == 0:
        return float("nan")
    thr = np.unique(np.concatenate([gen, imp]))
    far = (imp.size - np.searchsorted(imp, thr, side="left")) / imp.size  # imp >= t
    frr = np.searchsorted(gen, thr, side="left") / gen.size  # gen < t
    # FAR falls and FRR rises with t: the first threshold where FRR >= FAR and the one before.
    i = int(np.searchsorted(frr - far, 0.0, side="left"))
    cands = [j for j in (i - 1, i) if 0 <= j < thr.size]
    best = min(cands, key=lambda j: abs(frr[j] - far[j]))
    return float((far[best] + frr[best]) / 2)


def fnir_at_fpir(
    scores: np.ndarray,
    mate: np.ndarray,
    fpir: float | Sequence[float] = (1e-2, 1e-3),
    rank: int = 1,
) -> dict[float, float]:
    """Open-set identification: FNIR at each FPIR, NIST FRVT style.

    Non-mated probes (mate = -1) set the threshold: FPIR(t) is the fraction whose top score is
    strictly above t. A mated probe is missed when its mate is not within `rank` or its score
    is not strictly above t.
    """
    scores, mate = _check(scores, mate)
    mated = mate >= 0
    if not (~mated).any() or not mated.any():
        raise ValueError("open-set metrics need both mated and non-mated probes")
    top = scores[~mated].max(axis=1)
    r = ranks(scores, mate)[mated]
    gen = scores[mated, mate[mated]]
    fpirs = [float(f) for f in np.atleast_1d(np.asarray(fpir, dtype=np.float64))]
    thresholds = np.atleast_1d(threshold_at_far(top, fpirs))
    return {f: float(1 - ((r <= rank) & (gen > t)).mean()) for f, t in zip(fpirs, thresholds)}


def group_rates(
    scores: np.ndarray,
    mate: np.ndarray,
    threshold: float,
    probe_group: Sequence[str | None],
    gallery_group: Sequence[str | None],
) -> dict[str, dict[str, float | int]]:
    """False match and false non-match rates per demographic group at one threshold.

    For a group g: FNMR is over genuine comparisons of probes in g; FMR is over impostor
    comparisons of probes in g against gallery entries also in g (the same-group impostors
    that drive demographic differentials, as in NIST's FRVT part 3), and `fmr_all` against
    every gallery entry. Probes with group None are left out.
    """
    scores, mate = _check(scores, mate)
    pg = np.asarray([g if g is not None else "" for g in probe_group], dtype=object)
    gg = np.asarray([g if g is not None else "" for g in gallery_group], dtype=object)
    if pg.shape != (scores.shape[0],) or gg.shape != (scores.shape[1],):
        raise ValueError("group labels must match the probes and the gallery")
    out: dict[str, dict[str, float | int]] = {}
    for g in sorted({str(x) for x in pg if x != ""}):
        rows = np.flatnonzero(pg == g)
        sub, m = scores[rows], mate[rows]
        has = m >= 0
        genuine = sub[has, m[has]]
        imp_mask = np.ones(sub.shape, dtype=bool)
        imp_mask[np.flatnonzero(has), m[has]] = False
        above = sub > threshold
        same = imp_mask & (gg == g)[None, :]
        out[g] = {
            "n_probes": int(rows.size),
            "fnmr": float((genuine <= threshold).mean()) if genuine.size else float("nan"),
            "fmr": float(above[same].mean()) if same.any() else float("nan"),
            "fmr_all": float(above[imp_mask].mean()) if imp_mask.any() else float("nan"),
            "n_impostor_same_group": int(same.sum()),
        }
    return out


def summarise(
    scores: np.ndarray, mate: np.ndarray, fars: Sequence[float] = FARS
) -> Mapping[str, object]:
    """rank1, rank5, TAR at each FAR (keys as strings, e.g. "0.001"), EER; fractions in [0, 1]."""
    r1, r5 = rank_k(scores, mate, [1, 5])
    genuine, impostor = genuine_impostor(scores, mate)
    tars = tar_at_far(genuine, impostor, fars)
    return {
        "rank1": r1,
        "rank5": r5,
        "tar_at_far": {str(f): tars[f] for f in fars},
        "eer": eer(genuine, impostor),
    }
