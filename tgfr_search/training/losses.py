"""TGFR training losses: CICL, WRCL, intra-modal supervised contrastive, ArcFace margin.

Every contrastive loss takes identity labels, so that other images (and captions) of the
same person are never treated as negatives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tgfr_search.models.tgfr import wrcl_scores

__all__ = ["ArcMarginLoss", "cicl", "info_nce", "supcon", "wrcl"]


def info_nce(logits: Tensor, labels_a: Tensor, labels_b: Tensor) -> Tensor:
    """Symmetric InfoNCE over a (Ba, Bb) logit matrix where row i and column i are the pair.

    Pairs of different index but the same identity are masked out of the denominators, so
    they are neither positives nor negatives. Requires Ba == Bb.
    """
    n = logits.shape[0]
    if logits.shape != (n, n):
        raise ValueError(f"info_nce needs a square logit matrix, got {tuple(logits.shape)}")
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    same = labels_a[:, None] == labels_b[None, :]
    masked = logits.masked_fill(same & ~eye, float("-inf"))
    target = torch.arange(n, device=logits.device)
    return 0.5 * (F.cross_entropy(masked, target) + F.cross_entropy(masked.T, target))


def cicl(text: Tensor, image: Tensor, labels: Tensor, scale: Tensor | float = 10.0) -> Tensor:
    """Caption-image contrastive loss: text (B, d) and image (B, d) unit rows, row i paired."""
    return info_nce(scale * text @ image.T, labels, labels)


def wrcl(
    words: Tensor,
    mask: Tensor,
    regions: Tensor,
    labels: Tensor,
    gamma1: float = 4.0,
    gamma2: float = 5.0,
    gamma3: float = 10.0,
) -> Tensor:
    """Word-region contrastive loss (DAMSM): symmetric InfoNCE over gamma3 * R(caption, image)."""
    return info_nce(gamma3 * wrcl_scores(words, mask, regions, gamma1, gamma2), labels, labels)


def supcon(x: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss (Khosla et al.) on unit rows: same identity = positive.

    Anchors without any positive in the batch are skipped; returns 0 when none has one.
    """
    n = x.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    logits = (x @ x.T / temperature).masked_fill(eye, float("-inf"))
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    npos = pos.sum(1)
    ok = npos > 0
    if not ok.any():
        return x.sum() * 0.0
    mean_pos = logp.masked_fill(~pos, 0.0).sum(1)[ok] / npos[ok]
    return -mean_pos.mean()


class ArcMarginLoss(nn.Module):
    """ArcFace additive angular margin softmax: s * cos(theta_y + m) for the true class."""

    def __init__(self, dim: int, n_classes: int, s: float = 30.0, m: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.s, self.m = float(s), float(m)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        # Past theta = pi - m, cos(theta + m) stops falling; use the CosFace-like fallback.
        self.th, self.mm = math.cos(math.pi - m), math.sin(math.pi - m) * m

    def logits(self, x: Tensor, labels: Tensor) -> Tensor:
        cos = F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T
        cos = cos.clamp(-1 + 1e-7, 1 - 1e-7)
        sin = torch.sqrt(1.0 - cos * cos)
        phi = cos * self.cos_m - sin * self.sin_m
        phi = torch.where(cos > self.th, phi, cos - self.mm)
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return self.s * (onehot * phi + (1 - onehot) * cos)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(x, labels), labels)
