"""The TGFR heads (Hasan, Sami & Nasrabadi, WACV 2024) over frozen face and text features.

FCAM (feature alignment) maps the frozen encoders' outputs into one 256-d space: the ArcFace
global embedding, the 7x7 region map (through one self-attention block), the token states
(through 1/2/3-gram convolutions) and the sentence vector, all L2-normalised.

FCFM (feature fusion) lets words attend to regions and regions to words, pools both, and
mixes them with the aligned global image and sentence into a `text_dim` cross-modal part. The
fused vector is

    normalise([cos(theta(q)) * face, sin(theta(q)) * cross])

where `face` is the frozen ArcFace embedding plus a learned residual whose gate grows as image
quality falls, and theta(q) is a learned function of a quality signal q (the ArcFace
pre-normalisation norm, which falls with blur and resolution). A clean face keeps its ArcFace
embedding almost untouched; a poor one leans on its caption. Images without a caption get a
zero cross part, so their fused vector is the face part alone.

The aligned global image vector (`image_parts["global"]`, 256-d) is what a gallery stores for
text-only search: `caption_image_score` is then one inner product per face, with the
word-region (DAMSM) score as an optional re-ranking term.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tgfr_search.errors import ModelFileError

__all__ = ["TGFR", "TGFRConfig", "wrcl_scores"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class TGFRConfig:
    """Sizes and switches of the TGFR heads; JSON-serialisable."""

    face_dim: int = 512
    region_dim: int = 512
    n_regions: int = 49
    text_dim: int = 384
    embed_dim: int = 256
    cross_dim: int = 128
    heads: int = 4
    ffn_dim: int = 512
    dropout: float = 0.2
    ngrams: tuple[int, ...] = (1, 2, 3)
    use_regions: bool = True
    """False: the global-only ablation (no regions, no words, no cross-attention)."""
    pooled_regions: bool = False
    """Feed the aligned image head the region map pooled over the whole face and over three
    horizontal bands (hair and forehead, eyes, mouth and chin) beside the ArcFace embedding:
    the global embedding is trained to ignore what captions describe (hair, glasses, beard)."""
    regions_attend_words: bool = True
    """Also let regions attend to words (the second cross-attention direction)."""
    face_residual: bool = True
    """A quality-gated learned residual on the ArcFace embedding."""
    quality_mean: float = 20.0
    quality_std: float = 5.0
    """Standardisation of the ArcFace norm into q; set from training data."""
    theta_init: tuple[float, float] = (-1.5, -1.0)
    """Initial (bias, slope) of the mixing angle: theta = pi/2 * sigmoid(bias + slope * q)."""
    gamma1: float = 4.0
    gamma2: float = 5.0
    gamma3: float = 10.0

    @property
    def fused_dim(self) -> int:
        return self.face_dim + self.cross_dim

    @property
    def needs_regions(self) -> bool:
        """Whether the image side reads the region map (cross-attention or pooled bands)."""
        return self.use_regions or self.pooled_regions

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ngrams"] = list(self.ngrams)
        d["theta_init"] = list(self.theta_init)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TGFRConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("ngrams", "theta_init"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


def _l2(x: Tensor, dim: int = -1) -> Tensor:
    return F.normalize(x, dim=dim, eps=1e-6)


class _Mlp(nn.Sequential):
    def __init__(self, i: int, h: int, o: int, dropout: float) -> None:
        super().__init__(nn.Linear(i, h), nn.GELU(), nn.Dropout(dropout), nn.Linear(h, o))


class _CrossBlock(nn.Module):
    """One pre-norm cross-attention block: queries attend to a (masked) context, then an FFN."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.nq, self.nk = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.nf = nn.LayerNorm(d)
        self.ffn = _Mlp(d, ffn, d, dropout)

    def forward(self, q: Tensor, kv: Tensor, kv_pad: Tensor | None = None) -> Tensor:
        k = self.nk(kv)
        a, _ = self.attn(self.nq(q), k, k, key_padding_mask=kv_pad, need_weights=False)
        x = q + a
        return x + self.ffn(self.nf(x))


def wrcl_scores(
    words: Tensor, mask: Tensor, regions: Tensor, gamma1: float = 4.0, gamma2: float = 5.0
) -> Tensor:
    """DAMSM word-region matching score of every caption with every image: (Bt, Bi).

    words (Bt, L, d) unit, mask (Bt, L) bool, regions (Bi, R, d) unit. For each word the
    regions are attended (attention normalised over words first, then sharpened by gamma1
    over regions, as in AttnGAN), the word is compared by cosine to its region context, and
    the word scores are pooled by log-sum-exp with gamma2.
    """
    # s[t, i, l, r]: word l of caption t against region r of image i.
    s = torch.einsum("tld,ird->tilr", words, regions)
    m = mask[:, None, :, None]
    a = torch.softmax(s.masked_fill(~m, float("-inf")), dim=2).masked_fill(~m, 0.0)  # words
    a = torch.softmax(gamma1 * a, dim=3)  # over regions
    # cos(ctx, w) without building ctx = a @ regions (Bt*Bi*L*d floats): ctx . w is
    # sum_r a * s, and |ctx|^2 is a^T G a with G the image's region Gram matrix.
    dot = (a * s).sum(-1)
    gram = regions @ regions.transpose(1, 2)  # (Bi, R, R)
    sq = (torch.einsum("tilr,irs->tils", a, gram) * a).sum(-1)
    wn = words.norm(dim=-1)[:, None, :]
    r = dot / (sq.clamp_min(1e-12).sqrt() * wn).clamp_min(1e-6)  # (Bt, Bi, L)
    r = (gamma2 * r).masked_fill(~mask[:, None, :], float("-inf"))
    return torch.logsumexp(r, dim=2) / gamma2


def pool_regions(regions: Tensor) -> Tensor:
    """(B, R, C) region map of a square grid -> (B, 4C): unit mean over the face, then over
    its top, middle and bottom bands of rows."""
    b, r, c = regions.shape
    side = math.isqrt(r)
    grid = regions.reshape(b, side, side, c)
    cut = [round(side * k / 3) for k in range(4)]  # 7 rows: 0-2, 2-5, 5-7
    parts = [grid.mean((1, 2))] + [grid[:, cut[k] : cut[k + 1]].mean((1, 2)) for k in range(3)]
    return torch.cat([_l2(p) for p in parts], dim=1)


class TGFR(nn.Module):
    """FCAM + FCFM heads over frozen ArcFace (global + regions) and MiniLM (tokens + sentence)."""

    def __init__(self, config: TGFRConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or TGFRConfig()
        d = c.embed_dim
        # FCAM
        pooled = 4 * c.region_dim if c.pooled_regions else 0
        self.img_global = _Mlp(c.face_dim + pooled, 2 * d, d, c.dropout)
        self.sent = _Mlp(c.text_dim, 2 * d, d, c.dropout)
        if c.use_regions:
            self.region_in = nn.Linear(c.region_dim, d)
            self.region_pos = nn.Parameter(torch.zeros(1, c.n_regions, d))
            self.region_block = nn.TransformerEncoderLayer(
                d,
                c.heads,
                c.ffn_dim,
                c.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.region_out = nn.Linear(d, d)
            self.word_convs = nn.ModuleList(
                nn.Conv1d(c.text_dim, d, k, padding=k // 2) for k in c.ngrams
            )
            self.word_out = nn.Linear(d, d)
            # FCFM cross-attention, both directions
            self.w2r = _CrossBlock(d, c.heads, c.ffn_dim, c.dropout)
            cross_in = 3 * d
            if c.regions_attend_words:
                self.r2w = _CrossBlock(d, c.heads, c.ffn_dim, c.dropout)
                cross_in += d
        else:
            cross_in = 2 * d
        self.cross = nn.Sequential(
            nn.Linear(cross_in + 2, 2 * d),
            nn.GELU(),
            nn.Dropout(c.dropout),
            nn.Linear(2 * d, c.cross_dim),
        )
        if c.face_residual:
            self.face_res = _Mlp(c.face_dim + 1, c.face_dim, c.face_dim, c.dropout)
            last = self.face_res[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.res_gate = nn.Parameter(torch.tensor([-2.0, -1.5]))  # bias, slope on q
        self.theta = nn.Parameter(torch.tensor(list(c.theta_init), dtype=torch.float32))
        # Learned temperature for the aligned-space score, CLIP-style (log of 1/tau).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.fingerprints: dict[str, str] = {}
        self.summary: dict[str, Any] = {}

    # ---- helpers -----------------------------------------------------------------------
    FUSION_PREFIXES = ("w2r.", "r2w.", "cross.", "face_res.", "res_gate", "theta")

    def fusion_parameters(self) -> list[nn.Parameter]:
        """The FCFM parameters (cross-attention, cross MLP, face residual, mixing angle)."""
        return [p for n, p in self.named_parameters() if n.startswith(self.FUSION_PREFIXES)]

    def quality(self, norms: Tensor) -> Tensor:
        """Standardised quality signal q from the ArcFace pre-normalisation norm (B,)."""
        c = self.config
        return (norms.float() - c.quality_mean) / c.quality_std

    def mix_angle(self, q: Tensor) -> Tensor:
        """theta(q) in (0, pi/2): the share of the fused vector given to the cross part."""
        return (math.pi / 2) * torch.sigmoid(self.theta[0] + self.theta[1] * q)

    def face_part(self, arcface: Tensor, q: Tensor) -> Tensor:
        """ArcFace (unit rows) plus the residual gated by low quality, renormalised (FCFM)."""
        face = arcface
        if self.config.face_residual:
            gate = torch.sigmoid(self.res_gate[0] + self.res_gate[1] * q)[:, None]
            face = face + gate * self.face_res(torch.cat([arcface, q[:, None]], dim=1))
        return _l2(face)

    # ---- FCAM --------------------------------------------------------------------------
    def encode_image(
        self, globals_: Tensor, norms: Tensor, regions: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Image parts: face (B,512) unit, q (B,), global (B,256) unit, regions (B,R,256) unit."""
        g = _l2(globals_.float())
        q = self.quality(norms)
        x = g
        if self.config.pooled_regions:
            if regions is None:
                raise ValueError("this TGFR model reads the region map: pass regions")
            x = torch.cat([g, pool_regions(regions.float())], dim=1)
        out = {"arcface": g, "q": q, "global": _l2(self.img_global(x))}
        out["face"] = self.face_part(g, q)
        if self.config.use_regions and regions is not None:
            x = self.region_in(regions.float()) + self.region_pos
            x = self.region_block(x)
            out["regions"] = _l2(self.region_out(x))
        return out

    def encode_text(
        self, tokens: Tensor | None, mask: Tensor | None, sentence: Tensor
    ) -> dict[str, Tensor]:
        """Text parts: sentence (B,256) unit and, with regions on, words (B,L,256) unit + mask."""
        out = {"sentence": _l2(self.sent(_l2(sentence.float())))}
        if self.config.use_regions and tokens is not None and mask is not None:
            m = mask.bool()
            x = (tokens.float() * m[..., None]).transpose(1, 2)  # (B, C, L)
            L = x.shape[-1]
            h = sum(conv(x)[..., :L] for conv in self.word_convs)
            h = self.word_out(F.gelu(h.transpose(1, 2)))
            out["words"] = _l2(h) * m[..., None]
            out["mask"] = m
        return out

    # ---- FCFM --------------------------------------------------------------------------
    def cross_part(self, image: dict[str, Tensor], text: dict[str, Tensor]) -> Tensor:
        """The un-normalised cross-modal part (B, cross_dim) of matched image/text pairs."""
        q = image["q"][:, None]
        parts = [image["global"], text["sentence"]]
        if self.config.use_regions:
            words, m, regions = text["words"], text["mask"], image["regions"]
            w = self.w2r(words, regions)  # words attend to regions
            mf = m.float()[..., None]
            w_pool = (w * mf).sum(1) / mf.sum(1).clamp_min(1.0)
            parts.append(_l2(w_pool))
            if self.config.regions_attend_words:
                r = self.r2w(regions, words, kv_pad=~m)  # regions attend to words
                parts.append(_l2(r.mean(1)))
        parts += [q, torch.tanh(q)]
        return self.cross(torch.cat(parts, dim=1))

    def fuse_parts(
        self, image: dict[str, Tensor], text: dict[str, Tensor], has_text: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The face part (B, face_dim) and the unit cross part (B, cross_dim), zero without text."""
        cross = _l2(self.cross_part(image, text))
        if has_text is not None:
            cross = cross * has_text.to(cross.dtype)[:, None]
        return image["face"], cross

    def combine(self, face: Tensor, cross: Tensor, q: Tensor) -> Tensor:
        """normalise([cos(theta(q)) * face, sin(theta(q)) * cross])."""
        theta = self.mix_angle(q)[:, None]
        return _l2(torch.cat([torch.cos(theta) * face, torch.sin(theta) * cross], dim=1))

    def fuse(
        self,
        image: dict[str, Tensor],
        text: dict[str, Tensor],
        has_text: Tensor | None = None,
    ) -> Tensor:
        """The fused, L2-normalised (B, face_dim + cross_dim) vector of image/text pairs.

        `has_text` (B,) bool marks rows with a real caption; the others get a zero cross part,
        so their fused vector is the face part alone.
        """
        face, cross = self.fuse_parts(image, text, has_text)
        return self.combine(face, cross, image["q"])

    def forward(
        self,
        globals_: Tensor,
        norms: Tensor,
        regions: Tensor | None,
        tokens: Tensor | None,
        mask: Tensor | None,
        sentence: Tensor,
        has_text: Tensor | None = None,
    ) -> Tensor:
        return self.fuse(
            self.encode_image(globals_, norms, regions),
            self.encode_text(tokens, mask, sentence),
            has_text,
        )

    # ---- cross-modal scores ------------------------------------------------------------
    def caption_image_score(
        self,
        text: dict[str, Tensor],
        image: dict[str, Tensor] | Tensor,
        *,
        word_region: bool = False,
        word_weight: float = 0.5,
    ) -> Tensor:
        """Aligned-space score (Bt, Bi) of captions against faces.

        `image` may be the precomputed 256-d aligned globals (a tensor, as a gallery stores
        them), making this one matrix product. With `word_region`, image parts must include
        regions; the DAMSM word-region score is added with `word_weight`.
        """
        g = image if isinstance(image, Tensor) else image["global"]
        s = text["sentence"] @ g.T
        if word_region:
            if isinstance(image, Tensor) or "regions" not in image or "words" not in text:
                raise ValueError("word-region scores need region and word features")
            c = self.config
            s = s + word_weight * wrcl_scores(
                text["words"], text["mask"], image["regions"], c.gamma1, c.gamma2
            )
        return s

    # ---- checkpoints -------------------------------------------------------------------
    def save(
        self,
        directory: str | Path,
        *,
        fingerprints: dict[str, str] | None = None,
        summary: dict[str, Any] | None = None,
    ) -> Path:
        """Write model.safetensors and config.json (config, encoder fingerprints, summary)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if fingerprints is not None:
            self.fingerprints = dict(fingerprints)
        if summary is not None:
            self.summary = dict(summary)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {
            "model": "tgfr",
            "config": self.config.to_json(),
            "fused_dim": self.config.fused_dim,
            "fingerprints": self.fingerprints,
            "summary": self.summary,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, map_location: str = "cpu") -> TGFR:
        """Load a checkpoint written by `save` (safetensors only; nothing is unpickled)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            meta = json.loads((directory / CONFIG_FILE).read_text())
            state = load_file(str(directory / WEIGHTS_FILE), device=map_location)
        except (OSError, ValueError) as e:
            raise ModelFileError(f"cannot load a TGFR checkpoint from {directory}: {e}") from e
        model = cls(TGFRConfig.from_json(meta["config"]))
        model.load_state_dict(state)
        model.fingerprints = dict(meta.get("fingerprints", {}))
        model.summary = dict(meta.get("summary", {}))
        model.eval()
        return model

    @property
    def fingerprint(self) -> str:
        """Short id of these weights + config, for stores that must not mix model versions."""
        import hashlib

        h = hashlib.sha256(json.dumps(self.config.to_json(), sort_keys=True).encode())
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().float().numpy().tobytes())
        return f"tgfr:{h.hexdigest()[:16]}"
