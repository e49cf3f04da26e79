"""Train the TGFR heads on cached frozen features, with model selection on `val` only.

Training rows are the `train` people only. Each step samples P people x K images; every image
gives a clean "gallery" view (L0) and a degraded "probe" view (L1..L3 or a random
augmentation copy), each with a different caption of that image, so intra-modal positives and
probe/gallery pairs like the protocol's exist in every batch.

Stage "align" (FCAM) trains CICL + WRCL + intra-modal SupCon + an ArcFace margin on the
aligned image vector; stage "fuse" (FCFM) trains the ArcFace margin on fused vectors plus a
probe-vs-gallery supervised contrastive term (degraded+caption vs clean+caption of another
image of the same person). `stages="two"` runs them in sequence, as the paper does;
`stages="joint"` sums them from the start.

After every epoch the fused model is scored on the val protocol (val people's first images +
the first image of every train person as impostors; the other val images as probes) at L0 and
L3; the best epoch by L3 rank-1 + TAR@FAR=1e-3, among those whose L0 rank-1 stays within
`l0_tolerance` of image-only, is kept.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tgfr_search.errors import TGFRError
from tgfr_search.training import metrics
from tgfr_search.training.calibrate import calibrate
from tgfr_search.training.evaluate import (
    build_protocol,
    caption_positions,
    evaluate,
    fused_vectors,
    fusion_parts,
    score_matrix,
)

if TYPE_CHECKING:
    import torch

    from tgfr_search.models.tgfr import TGFR, TGFRConfig
    from tgfr_search.training.features import FeatureCache

__all__ = [
    "ABLATIONS",
    "RECIPES",
    "TrainOptions",
    "ablation_table",
    "train",
    "tune_score_fusion",
    "val_metrics",
]

ABLATIONS = (None, "no_wrcl", "global_only")
DEGRADED = ("L1", "L2", "L3")


class TrainingError(TGFRError, ValueError):
    """Training data or options that cannot produce a model."""


@dataclass
class TrainOptions:
    """Optimisation settings; every field is recorded in the checkpoint summary."""

    epochs_align: int = 3
    epochs_fuse: int = 4
    people_per_batch: int = 32
    images_per_person: int = 2
    steps_per_epoch: int | None = 40  # None: one pass over the train images
    lr: float = 1e-3
    lr_fuse: float = 5e-4
    weight_decay: float = 1e-2
    # loss weights
    w_cicl: float = 1.0
    w_wrcl: float = 0.5
    w_intra: float = 0.5
    # The ArcFace margin terms measured worse on val than none (experiments.md: g3 vs g4,
    # f3 vs f4): the heads then memorise the 986 train people. They stay available.
    w_id_image: float = 0.0
    w_id_fused: float = 0.0
    w_pair_fused: float = 1.0
    freeze_align: bool = True  # fuse stage: FCAM frozen (paper's second stage), only FCFM learns
    align_in_fuse: float = 0.2  # weight of the align losses in a fuse stage that is not frozen
    wrcl_max: int = 48  # WRCL over at most this many caption/image pairs per batch (cost ~ n^2)
    arc_s: float = 30.0
    arc_m: float = 0.5
    pair_temperature: float = 0.05
    # probe view mix: weights of L1, L2, L3 and each augmentation copy (sum normalised)
    level_weights: tuple[float, float, float] = (1.0, 1.0, 2.0)
    aug_weight: float = 1.0
    hard_people: float = 0.0  # share (<= 0.5) of batch people drawn as face-nearest neighbours
    clean_probe_prob: float = 0.1  # sometimes the probe view is clean too (L0 behaviour)
    l0_tolerance: float = 0.003
    eval_every: int = 1
    calibrate_theta: bool = True  # refit theta(q)'s bias and slope on val after each epoch
    threads: int | None = None


#: What `tgfr-search train --variant` runs: (ablation, config overrides, options). "banded" is
#: the shipped checkpoint's recipe (experiment p1x10, EXPERIMENTS.md): the global-only fusion,
#: whose aligned image head also reads the region map pooled in bands, with a longer align
#: stage. It measured best on val (fused, text and refine together) and on test above the full
#: model (benchmarks/README.md), at a fraction of its training time. "global" is the ablation
#: without any region input.
RECIPES: dict[str, tuple[str | None, dict[str, Any], TrainOptions]] = {
    "banded": (
        "global_only",
        {"pooled_regions": True},
        TrainOptions(epochs_align=10, people_per_batch=48, steps_per_epoch=None, threads=1),
    ),
    "global": (
        "global_only",
        {},
        TrainOptions(people_per_batch=48, steps_per_epoch=None, threads=1),
    ),
    "full": (None, {}, TrainOptions(threads=1)),
    "no-wrcl": ("no_wrcl", {}, TrainOptions(threads=1)),
}


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def torch_index(idx: np.ndarray) -> torch.Tensor:
    import torch

    return torch.as_tensor(np.asarray(idx, dtype=np.int64))


class _TrainData:
    """Train-row features of every variant, held in memory as tensors for fast batching."""

    def __init__(self, cache: FeatureCache, use_regions: bool, device: str) -> None:
        import torch

        rows = cache.rows
        self.rows_idx = np.array(
            [i for i, r in enumerate(rows) if r["split"] == "train"], dtype=np.int64
        )
        if self.rows_idx.size == 0:
            raise TrainingError("the cache has no train rows")
        n = self.rows_idx.size
        text = cache.text()
        caps = np.stack(
            [caption_positions(cache, self.rows_idx, c) for c in range(5)], axis=1
        )  # (n, 5); -1 absent
        self.n_caps = (caps >= 0).sum(1)
        self.caps = caps
        ids = [rows[i]["identity"] for i in self.rows_idx]
        names = sorted(set(ids))
        self.n_classes = len(names)
        cls = {p: k for k, p in enumerate(names)}
        self.labels = np.array([cls[p] for p in ids], dtype=np.int64)
        # People with at least two captioned images can form probe/gallery pairs.
        by_person: dict[int, list[int]] = defaultdict(list)
        for j in range(n):
            if self.n_caps[j] >= 2:
                by_person[int(self.labels[j])].append(j)
        self.people = {k: v for k, v in by_person.items() if len(v) >= 2}
        if not self.people:
            raise TrainingError("no train person has two captioned images")
        self.person_keys = np.array(sorted(self.people), dtype=np.int64)
        self.neighbours: dict[int, np.ndarray] | None = None

        variants = [v for v in cache.variants if v == "L0" or v in DEGRADED or v.startswith("aug")]
        self.globals: dict[str, torch.Tensor] = {}
        self.norms: dict[str, torch.Tensor] = {}
        self.regions: dict[str, torch.Tensor] = {}
        self.present: dict[str, np.ndarray] = {}
        for v in variants:
            face = cache.face(v)
            image = np.asarray(face.image, dtype=np.int64)
            lookup = np.full(max(int(image.max(initial=-1)), int(self.rows_idx.max())) + 1, -1)
            lookup[image] = np.arange(image.size)
            pos = lookup[self.rows_idx]
            ok = pos >= 0
            if not ok.any():  # e.g. fixed levels cached for val/test only
                continue
            self.present[v] = ok
            safe = np.where(ok, pos, 0)
            self.globals[v] = torch.as_tensor(np.asarray(face.globals[safe], np.float32))
            self.norms[v] = torch.as_tensor(np.asarray(face.norms[safe], np.float32))
            if use_regions:
                self.regions[v] = torch.as_tensor(np.asarray(face.regions[safe], np.float16))
        # Text: only captions of train rows, re-indexed.
        used = np.unique(caps[caps >= 0])
        remap = np.full(int(used.max()) + 1 if used.size else 1, -1, dtype=np.int64)
        remap[used] = np.arange(used.size)
        self.caps = np.where(caps >= 0, remap[np.maximum(caps, 0)], -1)
        mask = np.asarray(text.mask[used], dtype=bool)
        length = max(int(mask.sum(1).max()), 1)
        self.mask = torch.as_tensor(mask[:, :length])
        self.tokens = (
            torch.as_tensor(np.asarray(text.tokens[used][:, :length], np.float16))
            if use_regions
            else None
        )
        self.sentence = torch.as_tensor(np.asarray(text.sentence[used], np.float32))
        self.variants = [v for v in variants if v in self.present]
        # Each person's 10 nearest people by mean clean ArcFace embedding (for hard batches).
        g0 = self.globals["L0"].numpy()
        keys = self.person_keys
        cent = np.stack([g0[self.people[int(k)]].mean(0) for k in keys])
        cent /= np.linalg.norm(cent, axis=1, keepdims=True)
        sim = cent @ cent.T
        np.fill_diagonal(sim, -np.inf)
        near = np.argsort(-sim, axis=1)[:, :10]
        self.neighbours = {int(k): keys[near[i]] for i, k in enumerate(keys)}
        self.device = device
        norms_all = torch.cat(
            [self.norms[v][torch.as_tensor(self.present[v])] for v in self.variants]
        )
        self.norm_mean = float(norms_all.mean())
        self.norm_std = float(norms_all.std().clamp_min(1e-3))

    def sample(self, rng: np.random.Generator, opts: TrainOptions) -> dict[str, Any]:
        """One P x K batch: image index, label, clean + probe variant, two captions each."""
        p = min(opts.people_per_batch, len(self.person_keys))
        n_hard = min(int(round(p * opts.hard_people)), p // 2) if self.neighbours else 0
        seeds = rng.choice(self.person_keys, size=p - n_hard, replace=False)
        chosen = list(dict.fromkeys(int(k) for k in seeds))
        # Face-confusable people: text has to separate exactly these at low quality.
        for k in seeds[:n_hard]:
            if len(chosen) >= p or self.neighbours is None:
                break
            for nb in rng.permutation(self.neighbours[int(k)]):
                if int(nb) not in chosen:
                    chosen.append(int(nb))
                    break
        if len(chosen) < p:
            taken = set(chosen)
            rest = [int(k) for k in self.person_keys if int(k) not in taken]
            chosen += rng.choice(rest, size=p - len(chosen), replace=False).tolist()
        people = np.array(chosen[:p], dtype=np.int64)
        imgs: list[int] = []
        for k in people:
            pool = self.people[int(k)]
            kk = min(opts.images_per_person, len(pool))
            imgs.extend(rng.choice(pool, size=kk, replace=False).tolist())
        idx = np.array(imgs, dtype=np.int64)
        # Probe variants: L1..L3 and the augmentation copies the row has.
        probe_v = []
        for j in idx:
            if rng.random() < opts.clean_probe_prob:
                probe_v.append("L0")
                continue
            names, w = [], []
            for lvl, wt in zip(DEGRADED, opts.level_weights):
                if lvl in self.present and self.present[lvl][j]:
                    names.append(lvl)
                    w.append(wt)
            for v in self.variants:
                if v.startswith("aug") and self.present[v][j]:
                    names.append(v)
                    w.append(opts.aug_weight)
            ww = np.asarray(w, dtype=np.float64)
            probe_v.append(names[int(rng.choice(len(names), p=ww / ww.sum()))] if names else "L0")
        cap_g, cap_p = [], []
        for j in idx:
            avail = self.caps[j][self.caps[j] >= 0]
            a, b = rng.choice(avail, size=2, replace=False)
            cap_g.append(int(a))
            cap_p.append(int(b))
        return {
            "idx": idx,
            "labels": self.labels[idx],
            "probe_v": probe_v,
            "cap_g": np.array(cap_g),
            "cap_p": np.array(cap_p),
        }

    def image_batch(self, idx: np.ndarray, variants: Sequence[str], with_regions: bool):
        import torch

        g = torch.empty(len(idx), self.globals["L0"].shape[1])
        nr = torch.empty(len(idx))
        r = (
            torch.empty(len(idx), *self.regions["L0"].shape[1:], dtype=torch.float16)
            if with_regions
            else None
        )
        groups: dict[str, list[int]] = defaultdict(list)
        for i, v in enumerate(variants):
            groups[v].append(i)
        for v, where in groups.items():
            w = torch.as_tensor(where)
            src = torch.as_tensor(idx[where])
            g[w] = self.globals[v][src]
            nr[w] = self.norms[v][src]
            if r is not None:
                r[w] = self.regions[v][src]
        d = self.device
        return g.to(d), nr.to(d), (r.to(d) if r is not None else None)

    def text_batch(self, cap: np.ndarray, with_words: bool):
        c = torch_index(cap)
        d = self.device
        mask = self.mask[c]
        # Positions past the batch's longest caption are padding everywhere: drop them.
        length = max(int(mask.sum(1).max()), 1)
        mask = mask[:, :length]
        tok = self.tokens[c, :length].to(d) if (with_words and self.tokens is not None) else None
        return tok, mask.to(d), self.sentence[c].to(d)


def val_metrics(
    model: TGFR,
    cache: FeatureCache,
    levels: Sequence[int] = (0, 3),
    *,
    device: str = "cpu",
    protocol=None,
) -> dict[str, dict[str, float]]:
    """Fused rank-1 and TAR@FAR=1e-3 on the val protocol at each level (fractions)."""
    protocol = protocol or build_protocol(cache.rows, "val")
    out = {}
    gallery = fused_vectors(model, cache, "L0", protocol.gallery, 0, device=device)
    for lvl in levels:
        probes = fused_vectors(model, cache, f"L{lvl}", protocol.probes, 1, device=device)
        s = probes @ gallery.T
        out[f"L{lvl}"] = _rank1_tar(s, protocol.mate)
    return out


THETA_BIAS = tuple(float(x) for x in np.arange(-6.0, 0.01, 0.5))
THETA_SLOPE = tuple(float(x) for x in np.arange(-4.0, 0.01, 0.5))


def calibrate_mixing(
    model: TGFR,
    cache: FeatureCache,
    protocol,
    image_l0_rank1: float,
    *,
    l0_tolerance: float = 0.003,
    device: str = "cpu",
    bias_grid: Sequence[float] = THETA_BIAS,
    slope_grid: Sequence[float] = THETA_SLOPE,
) -> dict[str, Any]:
    """Fit theta(q) = pi/2 * sigmoid(bias + slope * q) on the val protocol; set it in `model`.

    The fused score of a probe p and gallery entry g is
    (cos_p cos_g face_p.face_g + sin_p sin_g cross_p.cross_g) / (n_p n_g), so the face and cross
    similarity matrices are computed once and every (bias, slope) costs elementwise work only.
    The objective is L3 rank-1 + TAR@FAR=1e-3 among settings whose L0 rank-1 stays within
    `l0_tolerance` of image-only (ties: the higher L0 rank-1).
    """
    import torch

    fg, cg, qg = fusion_parts(model, cache, "L0", protocol.gallery, 0, device=device)
    probes = {
        lvl: fusion_parts(model, cache, f"L{lvl}", protocol.probes, 1, device=device)
        for lvl in (0, 3)
    }
    sims = {lvl: (fp @ fg.T, cp @ cg.T) for lvl, (fp, cp, _) in probes.items()}
    has_g = (np.abs(cg).sum(1) > 0).astype(np.float64)

    def trig(q: np.ndarray, has: np.ndarray, b: float, a: float):
        th = (np.pi / 2) / (1 + np.exp(-(b + a * q)))
        c, s = np.cos(th), np.sin(th)
        n = np.sqrt(c * c + s * s * has)
        return c / n, s * has / n

    def measure(b: float, a: float) -> dict[str, dict[str, float]]:
        cgw, sgw = trig(qg, has_g, b, a)
        out = {}
        for lvl, (_, cp, qp) in probes.items():
            has_p = (np.abs(cp).sum(1) > 0).astype(np.float64)
            cpw, spw = trig(qp, has_p, b, a)
            face_s, cross_s = sims[lvl]
            sc = np.outer(cpw, cgw) * face_s + np.outer(spw, sgw) * cross_s
            out[f"L{lvl}"] = _rank1_tar(sc, protocol.mate)
        return out

    learned = (float(model.theta[0].detach()), float(model.theta[1].detach()))
    cands = [learned] + [(b, a) for b in bias_grid for a in slope_grid]
    best: dict[str, Any] | None = None
    for b, a in cands:
        m = measure(b, a)
        ok = m["L0"]["rank1"] >= image_l0_rank1 - l0_tolerance
        key = (ok, round(_objective(m), 6), m["L0"]["rank1"])
        if best is None or key > best["key"]:
            best = {"key": key, "theta": (b, a), "val": m}
    assert best is not None
    with torch.no_grad():
        model.theta.copy_(torch.tensor(best["theta"], dtype=model.theta.dtype))
    return {"theta": list(best["theta"]), "learned_theta": list(learned), "val": best["val"]}


def _rank1_tar(scores: np.ndarray, mate: np.ndarray) -> dict[str, float]:
    gen, imp = metrics.genuine_impostor(scores, mate)
    return {
        "rank1": float(metrics.rank_k(scores, mate, 1)),
        "tar@1e-3": float(metrics.tar_at_far(gen, imp, [1e-3])[1e-3]),
    }


def _image_val(cache: FeatureCache, protocol, levels=(0, 3)) -> dict[str, dict[str, float]]:
    return {
        f"L{lvl}": _rank1_tar(score_matrix(cache, protocol, lvl, "image"), protocol.mate)
        for lvl in levels
    }


def _objective(m: dict[str, dict[str, float]]) -> float:
    return m["L3"]["rank1"] + m["L3"]["tar@1e-3"]


def train(
    cache: FeatureCache,
    out: Path | str | None,
    *,
    config: TGFRConfig | None = None,
    epochs: int | None = None,
    device: str = "auto",
    seed: int = 0,
    stages: str = "two",
    ablation: str | None = None,
    options: TrainOptions | None = None,
    fingerprints: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train TGFR heads on the cache's train rows; keep the best val epoch; save it to `out`.

    `epochs` (if given) is the total, split between the align and fuse stages in the default
    proportion (joint: all joint). `ablation`: None (full model), "no_wrcl" (no word-region
    loss) or "global_only" (no regions, no words, no cross-attention). Returns the summary
    written to the checkpoint: options, val metrics of image-only and the chosen epoch, the
    epoch history, the val-tuned weight of the score-level fusion baseline, and the training
    time. `fingerprints` default to the cache's encoder fingerprints. `out=None` trains
    without saving (the model is in the returned dict under "model").
    """
    import torch

    from tgfr_search.models.tgfr import TGFR, TGFRConfig
    from tgfr_search.training import losses

    if stages not in ("two", "joint"):
        raise TrainingError(f"stages must be 'two' or 'joint', not {stages!r}")
    if ablation not in ABLATIONS:
        raise TrainingError(f"ablation must be one of {ABLATIONS}, not {ablation!r}")
    opts = replace(options) if options is not None else TrainOptions()
    if epochs is not None:
        if stages == "two":
            total = opts.epochs_align + opts.epochs_fuse
            opts.epochs_align = max(1, round(epochs * opts.epochs_align / total))
            opts.epochs_fuse = max(1, epochs - opts.epochs_align)
        else:
            opts.epochs_align, opts.epochs_fuse = 0, epochs
    if stages == "joint":
        opts.epochs_fuse += opts.epochs_align
        opts.epochs_align = 0
    say = progress or (lambda _msg: None)
    dev = _device(device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()

    cfg = replace(config) if config is not None else TGFRConfig()
    if ablation == "global_only":
        cfg = replace(cfg, use_regions=False)
    use_wrcl = cfg.use_regions and ablation != "no_wrcl" and opts.w_wrcl > 0
    data = _TrainData(cache, cfg.needs_regions, dev)
    face0 = cache.face("L0")
    cfg = replace(
        cfg,
        face_dim=int(face0.globals.shape[1]),
        region_dim=int(face0.regions.shape[2]),
        n_regions=int(face0.regions.shape[1]),
        text_dim=int(data.sentence.shape[1]),
        quality_mean=data.norm_mean,
        quality_std=data.norm_std,
    )
    say(
        f"train: {len(data.rows_idx)} images of {data.n_classes} people, variants "
        f"{data.variants}, device {dev}, loaded in {time.perf_counter() - t0:.0f}s"
    )
    model = TGFR(cfg).to(dev)
    head_img = losses.ArcMarginLoss(cfg.embed_dim, data.n_classes, opts.arc_s, opts.arc_m).to(dev)
    head_fused = losses.ArcMarginLoss(cfg.fused_dim, data.n_classes, opts.arc_s, opts.arc_m).to(dev)
    protocol = build_protocol(cache.rows, "val")
    image_val = _image_val(cache, protocol)
    say(f"val image-only: {json.dumps(image_val)}")

    steps = opts.steps_per_epoch or max(
        1, math.ceil(len(data.rows_idx) / (opts.people_per_batch * opts.images_per_person))
    )
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"objective": -1.0}
    epoch_no = 0

    def run_stage(name: str, n_epochs: int, lr: float) -> None:
        nonlocal epoch_no, best
        if n_epochs <= 0:
            return
        align = name in ("align", "joint")
        fuse = name in ("fuse", "joint")
        frozen = name == "fuse" and opts.freeze_align
        if frozen:
            params = model.fusion_parameters() + list(head_fused.parameters())
        else:
            params = list(model.parameters()) + list(head_img.parameters())
            if fuse:
                params += list(head_fused.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=opts.weight_decay)
        total = n_epochs * steps
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=total, pct_start=0.1, anneal_strategy="cos"
        )
        w_align = 1.0 if align else (0.0 if frozen else opts.align_in_fuse)
        for _ in range(n_epochs):
            epoch_no += 1
            model.train()
            te = time.perf_counter()
            agg: dict[str, float] = defaultdict(float)
            for _step in range(steps):
                b = data.sample(rng, opts)
                n = len(b["idx"])
                labels = torch.as_tensor(b["labels"], device=dev)
                lab2 = torch.cat([labels, labels])
                g, nr, r = data.image_batch(
                    np.concatenate([b["idx"], b["idx"]]),
                    ["L0"] * n + list(b["probe_v"]),
                    cfg.needs_regions,
                )
                tok, mask, sent = data.text_batch(
                    np.concatenate([b["cap_g"], b["cap_p"]]), cfg.use_regions
                )
                with torch.set_grad_enabled(not frozen):
                    img = model.encode_image(g, nr, r)
                    txt = model.encode_text(tok, mask, sent)
                if frozen and cfg.face_residual:
                    # The residual is FCFM: recompute the face part with gradients.
                    img = {**img, "face": model.face_part(img["arcface"], img["q"])}
                parts: dict[str, torch.Tensor] = {}
                if w_align > 0:
                    scale = model.logit_scale.exp().clamp(max=100)
                    parts["cicl"] = opts.w_cicl * losses.cicl(
                        txt["sentence"], img["global"], lab2, scale
                    )
                    parts["intra"] = opts.w_intra * (
                        losses.supcon(img["global"], lab2) + losses.supcon(txt["sentence"], lab2)
                    )
                    if opts.w_id_image > 0:
                        parts["id_img"] = opts.w_id_image * head_img(img["global"], lab2)
                    if use_wrcl:
                        kw = min(n, opts.wrcl_max)
                        parts["wrcl"] = opts.w_wrcl * losses.wrcl(
                            txt["words"][:kw],
                            txt["mask"][:kw],
                            img["regions"][:kw],
                            labels[:kw],
                            cfg.gamma1,
                            cfg.gamma2,
                            cfg.gamma3,
                        )
                    for k in list(parts):
                        parts[k] = w_align * parts[k]
                if fuse:
                    fused = model.fuse(img, txt)
                    if opts.w_id_fused > 0:
                        parts["id_fused"] = opts.w_id_fused * head_fused(fused, lab2)
                    gal, prb = fused[:n], fused[n:]
                    logits = prb @ gal.T / opts.pair_temperature
                    idx_t = torch.as_tensor(b["idx"], device=dev)
                    same_img = idx_t[:, None] == idx_t[None, :]
                    pos = (labels[:, None] == labels[None, :]) & ~same_img
                    logits = logits.masked_fill(same_img, float("-inf"))
                    logp = logits - torch.logsumexp(logits, 1, keepdim=True)
                    npos = pos.sum(1)
                    ok = npos > 0
                    if ok.any():
                        pair = -(logp.masked_fill(~pos, 0).sum(1)[ok] / npos[ok]).mean()
                        parts["pair"] = opts.w_pair_fused * pair
                if not parts:
                    continue
                loss = torch.stack(list(parts.values())).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 5.0)
                opt.step()
                sched.step()
                for k, v in parts.items():
                    agg[k] += float(v.detach()) / steps
            rec: dict[str, Any] = {
                "epoch": epoch_no,
                "stage": name,
                "seconds": round(time.perf_counter() - te, 1),
                "loss": {k: round(v, 4) for k, v in agg.items()},
            }
            if fuse and epoch_no % opts.eval_every == 0:
                learned = model.theta.detach().clone()
                if opts.calibrate_theta:
                    cal = calibrate_mixing(
                        model,
                        cache,
                        protocol,
                        image_val["L0"]["rank1"],
                        l0_tolerance=opts.l0_tolerance,
                        device=dev,
                    )
                    vm = cal["val"]
                    rec["theta"] = [round(x, 3) for x in cal["theta"]]
                else:
                    vm = val_metrics(model, cache, device=dev, protocol=protocol)
                rec["val"] = vm
                ok_l0 = vm["L0"]["rank1"] >= image_val["L0"]["rank1"] - opts.l0_tolerance
                obj = _objective(vm)
                rec["objective"] = round(obj, 4)
                rec["l0_ok"] = bool(ok_l0)
                if ok_l0 and obj > best["objective"]:
                    best = {
                        "objective": obj,
                        "epoch": epoch_no,
                        "val": vm,
                        "state": {
                            k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                        },
                    }
                with torch.no_grad():  # training goes on from the learned angle
                    model.theta.copy_(learned)
            history.append(rec)
            say(json.dumps({k: v for k, v in rec.items()}))

    run_stage("align", opts.epochs_align, opts.lr)
    run_stage(
        "fuse" if stages == "two" else "joint",
        opts.epochs_fuse,
        opts.lr_fuse if stages == "two" else opts.lr,
    )
    if "state" not in best:
        # No epoch kept L0 within tolerance: keep the last one, and say so in the summary.
        vm = val_metrics(model, cache, device=dev, protocol=protocol)
        best = {
            "objective": _objective(vm),
            "epoch": epoch_no,
            "val": vm,
            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "l0_violated": True,
        }
    model.load_state_dict(best.pop("state"))
    model = model.cpu().eval()
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "stages": stages,
        "ablation": ablation,
        "seed": seed,
        "device": dev,
        "options": asdict(opts),
        "train_images": int(len(data.rows_idx)),
        "train_people": int(data.n_classes),
        "val_image_only": image_val,
        "best": best,
        "history": history,
        "train_seconds": round(seconds, 1),
    }
    summary["score_fusion"] = tune_score_fusion(cache)["best"]
    # What the engine needs beyond the weights: refine's and text's weights, mode thresholds.
    summary.update(calibrate(model, cache))
    if fingerprints is None:
        meta = getattr(cache, "meta", {}) or {}
        fingerprints = {
            key: str(meta[src])
            for key, src in (
                ("face", "face_fingerprint"),
                ("face_global", "face_global_fingerprint"),
                ("text", "text_fingerprint"),
                ("manifest_sha256", "manifest_sha256"),
            )
            if src in meta
        }
    if out is not None:
        model.save(Path(out), fingerprints=fingerprints, summary=summary)
    say(f"done in {seconds:.0f}s; best epoch {best['epoch']}: {json.dumps(best['val'])}")
    return {**summary, "model": model}


def tune_score_fusion(
    cache: FeatureCache,
    grid: Sequence[float] = tuple(np.round(np.arange(0.0, 0.51, 0.025), 3)),
    *,
    l0_tolerance: float = 0.003,
) -> dict[str, Any]:
    """Pick w for face cosine + w * sentence cosine on val (L3 rank-1 + TAR@1e-3, L0 kept)."""
    protocol = build_protocol(cache.rows, "val")
    base = _rank1_tar(score_matrix(cache, protocol, 0, "image"), protocol.mate)["rank1"]
    best: dict[str, Any] = {"w": 0.0, "objective": -1.0}
    rows = []
    for w in grid:
        l0 = _rank1_tar(score_matrix(cache, protocol, 0, "score", text_weight=w), protocol.mate)
        l3 = _rank1_tar(score_matrix(cache, protocol, 3, "score", text_weight=w), protocol.mate)
        obj = l3["rank1"] + l3["tar@1e-3"]
        rows.append({"w": float(w), "L0": l0, "L3": l3})
        if l0["rank1"] >= base - l0_tolerance and obj > best["objective"]:
            best = {"w": float(w), "objective": obj, "L0": l0, "L3": l3}
    return {"best": best, "grid": rows}


def ablation_table(
    cache: FeatureCache,
    models: dict[str, TGFR | Path | str],
    *,
    split: str = "test",
    levels: Sequence[int] = (0, 1, 2, 3),
    score_weight: float | None = None,
) -> list[dict[str, Any]]:
    """Evaluate image-only, score-level fusion (w from val) and each named model at each level."""
    if score_weight is None:
        score_weight = tune_score_fusion(cache)["best"]["w"]
    from tgfr_search.models.tgfr import TGFR

    loaded = {k: TGFR.load(Path(m)) if isinstance(m, (str, Path)) else m for k, m in models.items()}
    table: list[dict[str, Any]] = []
    for lvl in levels:
        table.append({"row": "image only", **evaluate(cache, split=split, level=lvl, mode="image")})
        table.append(
            {
                "row": f"score fusion (w={score_weight:g})",
                **evaluate(cache, split=split, level=lvl, mode="score", text_weight=score_weight),
            }
        )
        for name, m in loaded.items():
            table.append(
                {"row": name, **evaluate(cache, split=split, level=lvl, mode="fused", model=m)}
            )
    return table
