"""What the engine needs beyond the weights: refine's combination and each mode's thresholds.

Both are fitted on the val protocol only (val probes against the first image of every val and
train person), over every quality level pooled, because the engine cannot know a probe's level.
Test and distractor people stay untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tgfr_search.training import metrics
from tgfr_search.training.evaluate import (
    GALLERY_CAPTION,
    PROBE_CAPTION,
    Protocol,
    _face_globals,
    aligned_captions,
    aligned_images,
    build_protocol,
    fused_vectors,
    refine_scores,
)

if TYPE_CHECKING:
    from tgfr_search.models.tgfr import TGFR
    from tgfr_search.training.features import FeatureCache

__all__ = ["FARS", "calibrate", "calibrate_thresholds", "fit_refine", "fit_text"]

FARS = (1e-2, 1e-3, 1e-4)
LEVELS = (0, 1, 2, 3)
REFINE_K = 100
REFINE_WEIGHTS = tuple(float(x) for x in np.round(np.arange(0.0, 0.61, 0.05), 2))
REFINE_SLOPES = (0.0, -0.025, -0.05, -0.1, -0.15, -0.2)
CAPTION_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


class _ValScores:
    """The val protocol's score matrices per mode and level, computed once."""

    def __init__(self, model: TGFR, cache: FeatureCache, device: str = "cpu") -> None:
        self.model, self.cache, self.device = model, cache, device
        self.protocol: Protocol = build_protocol(cache.rows, "val")
        p = self.protocol
        self.gallery_face = _face_globals(cache, "L0", p.gallery)
        g_aligned, _ = aligned_images(model, cache, "L0", p.gallery, device=device)
        probe_text = aligned_captions(model, cache, p.probes, PROBE_CAPTION, device=device)
        self.text = probe_text @ g_aligned.T
        gallery_text = aligned_captions(model, cache, p.gallery, GALLERY_CAPTION, device=device)
        self.caption_text = probe_text @ gallery_text.T
        self.gallery_fused = fused_vectors(
            model, cache, "L0", p.gallery, GALLERY_CAPTION, device=device
        )

    def face(self, level: int) -> np.ndarray:
        return _face_globals(self.cache, f"L{level}", self.protocol.probes) @ self.gallery_face.T

    def quality(self, level: int) -> np.ndarray:
        _, q = aligned_images(
            self.model, self.cache, f"L{level}", self.protocol.probes, device=self.device
        )
        return q

    def fused(self, level: int) -> np.ndarray:
        probes = fused_vectors(
            self.model,
            self.cache,
            f"L{level}",
            self.protocol.probes,
            PROBE_CAPTION,
            device=self.device,
        )
        return probes @ self.gallery_fused.T


def fit_refine(
    val: _ValScores,
    *,
    k: int = REFINE_K,
    weights: Sequence[float] = REFINE_WEIGHTS,
    slopes: Sequence[float] = REFINE_SLOPES,
) -> dict[str, Any]:
    """Grid-fit w(q) = max(0, weight + slope * q) for refine: pooled val rank-1 over all levels.

    Ties go to the higher pooled TAR at FAR 1e-3, then to the smaller weight.
    """
    mate = val.protocol.mate
    parts = [(val.face(lv), val.quality(lv)) for lv in LEVELS]
    best: dict[str, Any] = {}
    for weight in weights:
        for slope in slopes:
            if weight == 0.0 and slope == 0.0 and best:
                continue
            params = {"k": k, "weight": weight, "slope": slope}
            rank1, tar = _pooled(
                [refine_scores(face, val.text, q, params) for face, q in parts], mate
            )
            key = (rank1, tar, -weight)
            if not best or key > best["key"]:
                best = {"key": key, "params": params, "rank1": rank1, "tar@1e-3": tar}
    image_rank1, image_tar = _pooled([face for face, _ in parts], mate)
    return {
        **best["params"],
        "val_pooled": {"rank1": best["rank1"], "tar@1e-3": best["tar@1e-3"]},
        "val_pooled_image": {"rank1": image_rank1, "tar@1e-3": image_tar},
    }


def fit_text(val: _ValScores, weights: Sequence[float] = CAPTION_WEIGHTS) -> dict[str, Any]:
    """The weight of the gallery caption's score in `text` mode: best val rank-5, then rank-1."""
    mate = val.protocol.mate
    best: dict[str, Any] = {}
    for w in weights:
        r1, r5 = metrics.rank_k(val.text + w * val.caption_text, mate, [1, 5])
        if not best or (r5, r1) > (best["val"]["rank5"], best["val"]["rank1"]):
            best = {"caption_weight": float(w), "val": {"rank1": r1, "rank5": r5}}
    r1, r5 = metrics.rank_k(val.text, mate, [1, 5])
    return {**best, "val_faces_only": {"rank1": r1, "rank5": r5}}


def _pooled(matrices: Sequence[np.ndarray], mate: np.ndarray) -> tuple[float, float]:
    stacked = np.concatenate(matrices)
    mates = np.tile(mate, len(matrices))
    rank1 = metrics.rank_k(stacked, mates, [1])[0]
    genuine, impostor = metrics.genuine_impostor(stacked, mates)
    return float(rank1), float(metrics.tar_at_far(genuine, impostor, [1e-3])[1e-3])


def calibrate_thresholds(
    val: _ValScores,
    refine: dict[str, Any],
    text: dict[str, Any],
    fars: Sequence[float] = FARS,
) -> dict[str, dict[str, float]]:
    """Per mode, the score whose val impostor pairs (all levels pooled) reach each FAR."""
    mate = val.protocol.mate
    per_mode: dict[str, list[np.ndarray]] = {"image": [], "fused": [], "refine": []}
    for lv in LEVELS:
        face = val.face(lv)
        per_mode["image"].append(face)
        per_mode["fused"].append(val.fused(lv))
        per_mode["refine"].append(refine_scores(face, val.text, val.quality(lv), refine))
    # A description does not depend on the probe's quality; the threshold assumes the gallery
    # has captions at the fitted weight (a caption-less gallery scores lower: fewer accepts).
    per_mode["text"] = [val.text + text["caption_weight"] * val.caption_text]
    out: dict[str, dict[str, float]] = {}
    for mode, matrices in per_mode.items():
        impostor = np.concatenate([metrics.genuine_impostor(m, mate)[1] for m in matrices])
        thresholds = np.atleast_1d(metrics.threshold_at_far(impostor, list(fars)))
        out[mode] = {f"{far:g}": round(float(t), 6) for far, t in zip(fars, thresholds)}
    return out


def calibrate(model: TGFR, cache: FeatureCache, *, device: str = "cpu") -> dict[str, Any]:
    """{"refine": ..., "text": ..., "thresholds": {mode: {far: score}}, "calibration": ...}."""
    val = _ValScores(model, cache, device)
    refine = fit_refine(val)
    text = fit_text(val)
    thresholds = calibrate_thresholds(val, refine, text)
    p = val.protocol
    impostor_pairs = int((p.mate >= 0).sum()) * (len(p.gallery) - 1)
    return {
        "refine": refine,
        "text": text,
        "thresholds": thresholds,
        "calibration": {
            "split": "val",
            "levels": list(LEVELS),
            "n_probes": int(len(p.probes)),
            "n_gallery": int(len(p.gallery)),
            "impostor_pairs_per_level": impostor_pairs,
        },
    }
