"""Face-like vectors: identity centres plus per-photo spread, fitted to real ArcFace pairs.

Galleries larger than the real faces (up to 10M x 512) come from this generator. Uniform
noise on the sphere would make every pair an impostor at cosine ~0 +- 0.044; real face
embeddings are clustered by identity, share a common mean direction and fill a subspace of
lower rank than 512, and approximate indexes behave very differently on the two.

The model (all rows are unit vectors in `dim` dimensions):

    centre(identity) = normalise(mean_weight * m + B z),   z ~ N(0, I_rank)
    photo            = normalise(centre + s * W e),        e ~ N(0, I_rank)
    s                = spread_median * exp(spread_sigma * N(0, 1))   (one draw per photo)

`m` is a fixed random unit direction (the mean face). `B` and `W` map a random `rank`-dim
subspace of R^dim, with eigenvalues decaying as exp(-i / tau) (normalised to sum 1):
`tau_between` for identity centres, `tau_within` for a photo's deviation from its centre; the
two use different random rotations of the same subspace. Everything is seeded.

Fitted (`python benchmarks/facelike.py --emb EMB.npz --fit`, EMB.npz from `--embed-lfw`) to
the w600k_mbf ArcFace embeddings (the `vectron` pack) of all 11,150 LFW aligned112 crops
(3,677 people): 15,215 same-person pairs (at most 50 per person) and 199,245 random
different-person pairs. Measured directly: the embeddings fill a subspace of rank ~361
(eigenvalues past it are < 1e-3 of the largest), and a log-linear fit of the within-person
residuals' spectrum gives tau_within 133 (effective dimension 240). The mean weight, the
per-photo spread and tau_between were then fitted (Nelder-Mead) so that the generated pair
cosines match the real quantiles; tau_between came out at 65, below the 98.5 that the LFW
identity means suggest (their spectrum is flattened by the noise of averaging ~3 photos):

    rank 361, tau_between 64.8, tau_within 133.0,
    mean_weight 0.132, spread_median 0.781, spread_sigma 0.348

    cosine          mean    std      1%      5%     25%     50%     75%     95%     99%   99.9%
    genuine  real   0.5980  0.1117  0.3103  0.4055  0.5293  0.6044  0.6745  0.7684  0.8327  0.9011
    genuine  gen.   0.6001  0.1156  0.3118  0.3991  0.5236  0.6068  0.6840  0.7781  0.8323  0.8768
    impostor real   0.0077  0.0668 -0.1436 -0.1004 -0.0374  0.0066  0.0516  0.1193  0.1705  0.2372
    impostor gen.   0.0100  0.0690 -0.1509 -0.1031 -0.0363  0.0099  0.0565  0.1236  0.1712  0.2252

(`python benchmarks/facelike.py --check` prints the generated rows again.) Uniform random
unit vectors would give impostors 0.000 +- 0.044 and no genuine pairs at all. What the
Gaussian model cannot show: real impostor cosines have a slightly longer top tail (99.9%:
0.237 vs 0.225), from demographic clusters, which if anything should leave a real gallery's
top-10 impostors a little better separated, and easier for an approximate index, than these
(not measured at scale: LFW has only 11k faces).

Gallery shape: identity photo counts are 1 + Geometric, mean `photos_per_identity` (3 by
default: many people with one photo, a long tail of many). Probes are fresh photos of enrolled
identities, so each probe has at least one genuine match in the gallery.

Only numpy is needed; `device="cuda"` (or any torch device) generates on that device with torch
(same distributions, a different random stream), which is how the GPU benchmark fills 10M rows
in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)

# Measured on the real LFW pairs described above (`--fit` prints them again).
REAL = {
    "genuine": {
        "n": 15215,
        "mean": 0.5980,
        "std": 0.1117,
        "quantiles": [0.3103, 0.4055, 0.5293, 0.6044, 0.6745, 0.7684, 0.8327, 0.9011],
    },
    "impostor": {
        "n": 199245,
        "mean": 0.0077,
        "std": 0.0668,
        "quantiles": [-0.1436, -0.1004, -0.0374, 0.0066, 0.0516, 0.1193, 0.1705, 0.2372],
    },
}


@dataclass(frozen=True)
class Params:
    """The generator's parameters (see the module docstring)."""

    dim: int = 512
    rank: int = 361
    tau_between: float = 64.8
    tau_within: float = 133.0
    mean_weight: float = 0.132
    spread_median: float = 0.781
    spread_sigma: float = 0.348


FITTED = Params()

_ID_BLOCK = 4096  # identities per random block: results do not depend on how callers chunk


def _spectrum(rank: int, tau: float) -> np.ndarray:
    lam = np.exp(-np.arange(rank) / tau)
    return lam / lam.sum()


@dataclass
class FaceSet:
    """A generated gallery and probes; arrays are numpy, or torch tensors for a torch device."""

    gallery: Any
    labels: np.ndarray
    probes: Any
    probe_labels: np.ndarray


class FaceLike:
    """A seeded population of face-like identities."""

    def __init__(
        self, params: Params = FITTED, *, seed: int = 0, photos_per_identity: float = 3.0
    ) -> None:
        if photos_per_identity < 1:
            raise ValueError("photos_per_identity must be at least 1")
        self.params, self.seed, self.photos_per_identity = params, seed, photos_per_identity
        p = params
        rng = np.random.default_rng([seed, 0])
        # A random rank-dim subspace, the mean direction inside it, and two rotations of it.
        basis, _ = np.linalg.qr(rng.standard_normal((p.dim, p.rank)))
        mean = basis @ rng.standard_normal(p.rank)
        self.mean = (mean / np.linalg.norm(mean)).astype(np.float32)
        rot, _ = np.linalg.qr(rng.standard_normal((p.rank, p.rank)))
        # Row-vector maps: z (.., rank) @ between -> (.., dim).
        self.between = (np.sqrt(_spectrum(p.rank, p.tau_between))[:, None] * basis.T).astype(
            np.float32
        )
        self.within = (np.sqrt(_spectrum(p.rank, p.tau_within))[:, None] * (basis @ rot).T).astype(
            np.float32
        )

    # -- identities ---------------------------------------------------------------------------
    def counts(self, n: int) -> np.ndarray:
        """Photos per identity for a gallery of `n` rows (identity i owns counts[i] rows)."""
        rng = np.random.default_rng([self.seed, 1])
        p = 1.0 / self.photos_per_identity
        out: list[np.ndarray] = []
        total = 0
        while total < n:
            c = rng.geometric(p, size=max(1024, int((n - total) * p * 1.1)))
            out.append(c)
            total += int(c.sum())
        counts = np.concatenate(out)
        cum = np.cumsum(counts)
        last = int(np.searchsorted(cum, n))
        counts = counts[: last + 1].copy()
        counts[-1] -= int(cum[last] - n)
        return counts

    # -- generation ---------------------------------------------------------------------------
    def generate(
        self,
        n: int,
        n_probes: int = 0,
        *,
        dtype: Any = np.float32,
        device: str | None = None,
    ) -> FaceSet:
        """`n` gallery rows and `n_probes` probes (fresh photos of gallery identities)."""
        counts = self.counts(n)
        labels = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        probe_labels = np.sort(
            np.random.default_rng([self.seed, 2]).choice(len(counts), n_probes, replace=True)
        ).astype(np.int64)
        if device is None:
            gallery = np.empty((n, self.params.dim), dtype=dtype)
            probes = np.empty((n_probes, self.params.dim), dtype=dtype)
        else:
            import torch

            tdtype = {np.float32: torch.float32, np.float16: torch.float16}[np.dtype(dtype).type]
            gallery = torch.empty((n, self.params.dim), dtype=tdtype, device=device)
            probes = torch.empty((n_probes, self.params.dim), dtype=tdtype, device=device)
        for rows, g, (at, q) in self._blocks(counts, probe_labels, device):
            if device is not None:
                g, q = g.to(gallery.dtype), q.to(gallery.dtype)
            gallery[rows] = g
            if len(at):
                probes[at] = q
        return FaceSet(gallery, labels, probes, probe_labels)

    def iter_gallery(
        self, n: int, chunk: int = 1 << 18, *, dtype: Any = np.float32
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The gallery of `generate(n)` as (vectors, labels) chunks of about `chunk` rows."""
        counts = self.counts(n)
        labels = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        buf: list[np.ndarray] = []
        start = size = 0
        for rows, g, _ in self._blocks(counts, np.zeros(0, np.int64), None):
            buf.append(g.astype(dtype, copy=False))
            size += len(g)
            if size >= chunk or rows.stop == n:
                yield np.concatenate(buf), labels[start : start + size]
                start, size, buf = start + size, 0, []

    def _blocks(
        self, counts: np.ndarray, probe_labels: np.ndarray, device: str | None
    ) -> Iterator[tuple[slice, Any, tuple[np.ndarray, Any]]]:
        ops = _Ops(self, device)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for b0 in range(0, len(counts), _ID_BLOCK):
            b1 = min(b0 + _ID_BLOCK, len(counts))
            rng = ops.rng(self.seed, 3, b0 // _ID_BLOCK)
            centres = ops.centres(rng, b1 - b0)
            local = np.repeat(np.arange(b1 - b0), counts[b0:b1])
            g = ops.photos(rng, centres, local)
            p0, p1 = np.searchsorted(probe_labels, [b0, b1])
            q = ops.photos(rng, centres, probe_labels[p0:p1] - b0)
            yield slice(int(offsets[b0]), int(offsets[b1])), g, (np.arange(p0, p1), q)


class _Ops:
    """The few array operations of the generator, in numpy or in torch on a device."""

    def __init__(self, gen: FaceLike, device: str | None) -> None:
        self.p, self.device = gen.params, device
        if device is None:
            self.mean, self.between, self.within = gen.mean, gen.between, gen.within
        else:
            import torch

            self.torch = torch
            to = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
            self.mean, self.between, self.within = to(gen.mean), to(gen.between), to(gen.within)

    def rng(self, *key: int) -> Any:
        if self.device is None:
            return np.random.default_rng(list(key))
        g = self.torch.Generator(device=self.device)
        g.manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1))
        return g

    def normal(self, rng: Any, shape: tuple[int, ...]) -> Any:
        if self.device is None:
            return rng.standard_normal(shape, dtype=np.float32)
        return self.torch.randn(shape, generator=rng, device=self.device)

    def unit(self, x: Any) -> Any:
        if self.device is None:
            return x / np.linalg.norm(x, axis=1, keepdims=True)
        return self.torch.nn.functional.normalize(x, dim=1)

    def centres(self, rng: Any, n: int) -> Any:
        z = self.normal(rng, (n, self.p.rank)) @ self.between
        return self.unit(z + self.p.mean_weight * self.mean)

    def photos(self, rng: Any, centres: Any, which: np.ndarray) -> Any:
        n = len(which)
        e = self.normal(rng, (n, self.p.rank)) @ self.within
        s = self.normal(rng, (n, 1)) * self.p.spread_sigma
        if self.device is None:
            s = self.p.spread_median * np.exp(s)
            return self.unit(centres[which] + s * e)
        s = self.p.spread_median * self.torch.exp(s)
        idx = self.torch.from_numpy(which).to(self.device)
        return self.unit(centres[idx] + s * e)


# -- pair statistics, fitting, checking ---------------------------------------------------------
def pair_cosines(
    x: np.ndarray, labels: np.ndarray, *, per_identity: int = 50, impostors: int = 200_000
) -> tuple[np.ndarray, np.ndarray]:
    """Genuine (same label, at most `per_identity` pairs each) and impostor pair cosines."""
    rng = np.random.default_rng(0)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    genuine = []
    for idx in np.split(order, bounds):
        if len(idx) < 2:
            continue
        iu = np.triu_indices(len(idx), 1)
        v = (x[idx] @ x[idx].T)[iu]
        genuine.append(rng.choice(v, per_identity, replace=False) if len(v) > per_identity else v)
    a, b = rng.integers(0, len(x), (2, impostors))
    keep = labels[a] != labels[b]
    impostor = np.einsum("ij,ij->i", x[a[keep]], x[b[keep]])
    return np.concatenate(genuine).astype(np.float64), impostor.astype(np.float64)


def describe(v: np.ndarray) -> dict[str, Any]:
    return {
        "n": len(v),
        "mean": round(float(v.mean()), 4),
        "std": round(float(v.std()), 4),
        "quantiles": [round(float(t), 4) for t in np.quantile(v, QUANTILES)],
    }


def simulate(params: Params, *, identities: int = 6000, seed: int = 1) -> dict[str, Any]:
    """Pair statistics of generated data shaped like the LFW sample (about 3 photos each)."""
    gen = FaceLike(params, seed=seed, photos_per_identity=3.0)
    data = gen.generate(identities * 3)
    g, i = pair_cosines(data.gallery, data.labels)
    return {"genuine": describe(g), "impostor": describe(i)}


def _loss(stats: dict[str, Any], real: dict[str, Any]) -> float:
    err = 0.0
    for kind in ("genuine", "impostor"):
        a, b = stats[kind], real[kind]
        err += sum((x - y) ** 2 for x, y in zip(a["quantiles"], b["quantiles"]))
        err += 3 * (a["std"] - b["std"]) ** 2 + 3 * (a["mean"] - b["mean"]) ** 2
    return err


def fit(x: np.ndarray, labels: np.ndarray) -> tuple[Params, dict[str, Any]]:
    """Fit the spectra, then the spread and mean weight, to real embeddings (rows, labels)."""
    from scipy.optimize import minimize

    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    g, i = pair_cosines(x, labels)
    real = {"genuine": describe(g), "impostor": describe(i)}
    uniq, inv, cnt = np.unique(labels, return_inverse=True, return_counts=True)
    cent = np.zeros((len(uniq), x.shape[1]))
    np.add.at(cent, inv, x)
    cent /= cnt[:, None]
    multi = cnt[inv] >= 2
    spectra = {
        "between": np.linalg.eigvalsh(np.cov(cent[cnt >= 2].T))[::-1],
        "within": np.linalg.eigvalsh(np.cov((x - cent[inv])[multi].T))[::-1],
    }
    full = np.clip(np.linalg.eigvalsh(np.cov(x.T))[::-1], 0, None)
    rank = int((full > 1e-3 * full[0]).sum())
    taus = {}
    for name, ev in spectra.items():
        ev = np.clip(ev, 1e-12, None)
        i_fit = np.arange(20, max(21, rank - 30))
        taus[name] = float(-1 / np.polyfit(i_fit, np.log(ev[i_fit]), 1)[0])
    base = replace(
        FITTED,
        dim=x.shape[1],
        rank=rank,
        tau_between=round(taus["between"], 1),
        tau_within=round(taus["within"], 1),
    )

    def objective(v: np.ndarray) -> float:
        mw, sm, ss, tb = v
        if mw < 0 or sm <= 0 or ss < 0 or tb <= 1:
            return 1e9
        trial = replace(base, mean_weight=mw, spread_median=sm, spread_sigma=ss, tau_between=tb)
        return _loss(simulate(trial), real)

    start = np.array([FITTED.mean_weight, FITTED.spread_median, FITTED.spread_sigma, 70.0])
    best = minimize(objective, start, method="Nelder-Mead", options={"xatol": 2e-3, "fatol": 1e-6})
    mw, sm, ss = (round(float(t), 3) for t in best.x[:3])
    base = replace(base, tau_between=round(float(best.x[3]), 1))
    return replace(base, mean_weight=mw, spread_median=sm, spread_sigma=ss), real


def embed_lfw(root: Path, out: Path) -> None:
    """Embed every LFW aligned112 crop with the vectron ArcFace model into `out` (x, labels)."""
    import cv2

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tgfr_search.models import load_models

    paths = sorted(root.glob("*/*.jpg"))
    names = {n: i for i, n in enumerate(sorted({p.parent.name for p in paths}))}
    face = load_models("vectron", text=None).face
    rows = [
        face.embed([cv2.imread(str(p)) for p in paths[s : s + 64]])
        for s in range(0, len(paths), 64)
    ]
    np.savez(out, x=np.concatenate(rows), labels=np.array([names[p.parent.name] for p in paths]))


def _table(real: dict[str, Any], gen: dict[str, Any]) -> str:
    head = "cosine          mean     std   " + "".join(f"{q * 100:>8g}" for q in QUANTILES)
    lines = [head]
    for kind in ("genuine", "impostor"):
        for tag, s in (("real", real[kind]), ("gen.", gen[kind])):
            qs = "".join(f"{t:8.4f}" for t in s["quantiles"])
            lines.append(f"{kind:8s} {tag}  {s['mean']:7.4f} {s['std']:7.4f} {qs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embed-lfw", type=Path, help="LFW aligned112 folder to embed into --emb")
    ap.add_argument("--emb", type=Path, help="embeddings file (x, labels) for --fit")
    ap.add_argument("--fit", action="store_true", help="fit the parameters to --emb")
    ap.add_argument("--check", action="store_true", help="compare FITTED with the real pairs")
    args = ap.parse_args(argv)
    if args.embed_lfw:
        embed_lfw(args.embed_lfw, args.emb)
    if args.fit:
        data = np.load(args.emb)
        params, real = fit(data["x"], data["labels"])
        print(json.dumps({"params": asdict(params), "real": real}, indent=1))
        print(_table(real, simulate(params)))
    if args.check or not (args.fit or args.embed_lfw):
        print(json.dumps(asdict(FITTED)))
        print(_table(REAL, simulate(FITTED)))


if __name__ == "__main__":
    main()

__all__ = ["FITTED", "REAL", "FaceLike", "FaceSet", "Params", "fit", "pair_cosines", "simulate"]
