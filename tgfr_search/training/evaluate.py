"""The held-out identification protocol of issue 3, from cached frozen features.

Gallery: the first image (by file name) of every person of the split plus impostor entries
(test: the first image of every distractor; val: the first image of every train person).
Probes: every other image of the split's people, degraded at level L. The gallery uses
caption 0 of its image and a probe caption 1 of its image. Scores are cosine similarities;
rank-k is over the whole gallery; TAR@FAR takes genuine = probe vs its own person's gallery
entry and impostors = probe vs every other entry.

Images without captions stay in the protocol. In fused mode their text part is zero (see
`TGFR.fuse`), so their fused vector is the model's face part alone: the comparison falls back
to the face evidence, scaled by the other side's face weight.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tgfr_search.errors import TGFRError
from tgfr_search.training import metrics

if TYPE_CHECKING:
    from tgfr_search.models.tgfr import TGFR
    from tgfr_search.training.features import FeatureCache

__all__ = [
    "MODES",
    "Protocol",
    "build_protocol",
    "evaluate",
    "aligned_captions",
    "aligned_images",
    "fused_vectors",
    "fusion_parts",
    "refine_scores",
    "person_groups",
    "plot_roc",
    "score_matrix",
]

MODES = ("image", "fused", "score", "refine", "text", "words")
#: The bag-of-attribute-words baseline: framing words dropped, synonyms merged.
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "with",
        "of",
        "in",
        "on",
        "this",
        "that",
        "is",
        "who",
        "has",
        "have",
        "wearing",
        "wears",
        "person",
        "someone",
        "individual",
        "face",
        "photo",
        "picture",
        "image",
        "portrait",
        "photographed",
        "shown",
        "close",
        "up",
        "looking",
        "from",
        "front",
        "slightly",
    ]
)
SYNONYMS = {
    **dict.fromkeys(("female", "lady", "she", "her"), "woman"),
    **dict.fromkeys(("male", "guy", "gentleman", "he", "his"), "man"),
    **dict.fromkeys(("gray", "silver", "greying"), "grey"),
    **dict.fromkeys(("spectacles", "eyeglasses", "bespectacled"), "glasses"),
    **dict.fromkeys(("blonde", "fair"), "blond"),
    **dict.fromkeys(("bearded",), "beard"),
    **dict.fromkeys(("mustache",), "moustache"),
    **dict.fromkeys(("balding",), "bald"),
    **dict.fromkeys(("necktie",), "tie"),
    **dict.fromkeys(("headwear",), "hat"),
    **dict.fromkeys(("smiling",), "smile"),
    **dict.fromkeys(("older", "elderly"), "old"),
}
GALLERY_CAPTION, PROBE_CAPTION = 0, 1


class EvaluationError(TGFRError, ValueError):
    """An evaluation request that the cache or the model cannot answer."""


@dataclass(frozen=True)
class Protocol:
    """Which manifest rows are gallery entries and probes, and each probe's mate column."""

    split: str
    gallery: np.ndarray  # (G,) manifest row indices
    probes: np.ndarray  # (P,) manifest row indices
    mate: np.ndarray  # (P,) gallery column of the probe's person; -1 when left out (open set)
    held_out: frozenset[str] = frozenset()


def _file_key(row: Mapping[str, Any]) -> str:
    return row["image"].rsplit("/", 1)[-1]


def build_protocol(
    rows: Sequence[Mapping[str, Any]], split: str = "test", *, open_set: float = 0.0
) -> Protocol:
    """The protocol over manifest `rows` for `split` ("test" or "val").

    `open_set` > 0 leaves that fraction of the split's people out of the gallery (chosen by a
    hash of the name, so the choice is stable); their probes keep mate = -1.
    """
    impostor_split = {"test": "distractor", "val": "train"}.get(split)
    if impostor_split is None:
        raise EvaluationError(f"split must be 'test' or 'val', not {split!r}")
    people: dict[str, list[int]] = defaultdict(list)
    impostors: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row["split"] == split:
            people[row["identity"]].append(i)
        elif row["split"] == impostor_split:
            impostors[row["identity"]].append(i)
    if not people:
        raise EvaluationError(f"the manifest has no {split!r} people")
    held: set[str] = set()
    if open_set > 0:
        for name in people:
            h = int(hashlib.sha1(f"open-set:{name}".encode()).hexdigest()[:8], 16)
            if h / 0xFFFFFFFF < open_set:
                held.add(name)
    gallery: list[int] = []
    column: dict[str, int] = {}
    probes: list[int] = []
    probe_person: list[str] = []
    for name in sorted(people):
        idx = sorted(people[name], key=lambda i: _file_key(rows[i]))
        if name not in held:
            column[name] = len(gallery)
            gallery.append(idx[0])
        probes.extend(idx[1:])
        probe_person.extend([name] * (len(idx) - 1))
    for name in sorted(impostors):
        gallery.append(min(impostors[name], key=lambda i: _file_key(rows[i])))
    mate = np.array([column.get(p, -1) for p in probe_person], dtype=np.int64)
    return Protocol(
        split=split,
        gallery=np.asarray(gallery, dtype=np.int64),
        probes=np.asarray(probes, dtype=np.int64),
        mate=mate,
        held_out=frozenset(held),
    )


def _positions(image_index: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Positions in a feature array (whose manifest rows are `image_index`) of `wanted` rows."""
    lookup = np.full(int(max(image_index.max(initial=-1), wanted.max(initial=-1))) + 1, -1)
    lookup[image_index] = np.arange(image_index.size)
    pos = lookup[wanted]
    if (pos < 0).any():
        raise EvaluationError(f"{int((pos < 0).sum())} {what} rows are missing from the cache")
    return pos


def caption_positions(cache: FeatureCache, rows_wanted: np.ndarray, caption: int) -> np.ndarray:
    """Index into `cache.text()` of caption `caption` of each manifest row, or -1 when absent."""
    text = cache.text()
    image = np.asarray(text.image, dtype=np.int64)
    cap = np.asarray(text.caption, dtype=np.int64)
    n = max(int(image.max(initial=-1)), int(np.max(rows_wanted, initial=-1))) + 1
    lookup = np.full(n, -1, dtype=np.int64)
    sel = np.flatnonzero(cap == caption)
    lookup[image[sel]] = sel
    return lookup[rows_wanted]


def _encode_faces(model: TGFR, face: Any, pos: np.ndarray, device: str) -> dict[str, Any]:
    """`model.encode_image` of cached face rows `pos` (with the region map where it reads it)."""
    import torch

    def tensor(x: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x[pos]), dtype=torch.float32).to(device)

    regions = tensor(face.regions) if model.config.needs_regions else None
    return model.encode_image(tensor(face.globals), tensor(face.norms), regions)


def fusion_parts(
    model: TGFR,
    cache: FeatureCache,
    variant: str,
    rows_wanted: np.ndarray,
    caption: int,
    *,
    batch_size: int = 512,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Face part (N, 512), unit cross part (N, cross_dim; zero without caption) and quality q."""
    import torch

    face = cache.face(variant)
    text = cache.text()
    fpos = _positions(np.asarray(face.image, dtype=np.int64), rows_wanted, f"{variant} face")
    tpos = caption_positions(cache, rows_wanted, caption)
    faces, crosses, qs = [], [], []
    model.eval()
    with torch.no_grad():
        for s in range(0, len(rows_wanted), batch_size):
            fp, tp = fpos[s : s + batch_size], tpos[s : s + batch_size]
            has = tp >= 0
            tsafe = np.where(has, tp, 0)
            tmask = np.asarray(text.mask[tsafe])
            length = max(int(tmask.sum(1).max(initial=1)), 1)  # drop all-padding positions
            img = _encode_faces(model, face, fp, device)
            txt = model.encode_text(
                torch.as_tensor(np.asarray(text.tokens[tsafe][:, :length]), dtype=torch.float32).to(
                    device
                )
                if model.config.use_regions
                else None,
                torch.as_tensor(tmask[:, :length]).to(device),
                torch.as_tensor(np.asarray(text.sentence[tsafe]), dtype=torch.float32).to(device),
            )
            f, c = model.fuse_parts(img, txt, torch.as_tensor(has).to(device))
            faces.append(f.float().cpu().numpy())
            crosses.append(c.float().cpu().numpy())
            qs.append(img["q"].float().cpu().numpy())
    if not faces:
        cfg = model.config
        return np.zeros((0, cfg.face_dim)), np.zeros((0, cfg.cross_dim)), np.zeros(0)
    return np.concatenate(faces), np.concatenate(crosses), np.concatenate(qs)


def fused_vectors(
    model: TGFR,
    cache: FeatureCache,
    variant: str,
    rows_wanted: np.ndarray,
    caption: int,
    *,
    batch_size: int = 512,
    device: str = "cpu",
) -> np.ndarray:
    """Fused TGFR vectors (N, D) of manifest rows at a feature variant with one caption each."""
    import torch

    f, c, q = fusion_parts(
        model, cache, variant, rows_wanted, caption, batch_size=batch_size, device=device
    )
    with torch.no_grad():
        out = model.combine(torch.as_tensor(f), torch.as_tensor(c), torch.as_tensor(q))
    return out.numpy().astype(np.float32)


def _face_globals(cache: FeatureCache, variant: str, rows_wanted: np.ndarray) -> np.ndarray:
    face = cache.face(variant)
    pos = _positions(np.asarray(face.image, dtype=np.int64), rows_wanted, f"{variant} face")
    g = np.asarray(face.globals[pos], dtype=np.float32)
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)


def _sentences(cache: FeatureCache, rows_wanted: np.ndarray, caption: int) -> np.ndarray:
    """Unit sentence embeddings of one caption per row; zero rows where the caption is absent."""
    text = cache.text()
    pos = caption_positions(cache, rows_wanted, caption)
    out = np.zeros((len(rows_wanted), np.asarray(text.sentence[:1]).shape[1]), np.float32)
    has = pos >= 0
    s = np.asarray(text.sentence[pos[has]], dtype=np.float32)
    out[has] = s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    return out


def aligned_images(
    model: TGFR, cache: FeatureCache, variant: str, rows_wanted: np.ndarray, *, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Faces in the aligned (caption <-> face) space (N, 256) and their quality q (N,)."""
    import torch

    face = cache.face(variant)
    pos = _positions(np.asarray(face.image, dtype=np.int64), rows_wanted, f"{variant} face")
    model.eval()
    out: list[tuple[np.ndarray, np.ndarray]] = []
    with torch.no_grad():
        for s in range(0, len(pos), 1024):
            img = _encode_faces(model, face, pos[s : s + 1024], device)
            out.append((img["global"].float().cpu().numpy(), img["q"].float().cpu().numpy()))
    if not out:
        return np.zeros((0, model.config.embed_dim), np.float32), np.zeros(0, np.float32)
    return np.concatenate([g for g, _ in out]), np.concatenate([q for _, q in out])


def aligned_captions(
    model: TGFR, cache: FeatureCache, rows_wanted: np.ndarray, caption: int, *, device: str = "cpu"
) -> np.ndarray:
    """One caption per row in the aligned space (N, 256); zero rows where it is absent."""
    import torch

    sentences = _sentences(cache, rows_wanted, caption)
    with torch.no_grad():
        encoded = model.encode_text(None, None, torch.as_tensor(sentences).to(device))
    out: np.ndarray = encoded["sentence"].float().cpu().numpy()
    out[~sentences.any(1)] = 0.0
    return out


def refine_scores(
    face: np.ndarray, text: np.ndarray, q: np.ndarray, params: Mapping[str, Any]
) -> np.ndarray:
    """Scores of `refine` mode: the image-mode top-k re-ranked by face + w(q) * text.

    `face` and `text` are (P, G) face and caption-to-face scores, `q` the probes' quality.
    w(q) = max(0, weight + slope * q) lets the caption count more as the face gets worse.
    Entries outside each row's image-mode top-k are not candidates: they score -4, below
    any cosine-based score, as if a search had not returned them.
    """
    k = int(params.get("k", 100))
    w = np.maximum(0.0, float(params.get("weight", 0.0)) + float(params.get("slope", 0.0)) * q)
    out = face + w[:, None] * text
    if k < face.shape[1]:
        kth = np.partition(face, -k, axis=1)[:, -k]
        out[face < kth[:, None]] = -4.0
    return out


def _bags(cache: FeatureCache, rows_wanted: np.ndarray, caption: int) -> list[set[str]]:
    out = []
    for i in rows_wanted:
        caps = cache.rows[int(i)].get("captions") or []
        text = caps[caption] if len(caps) > caption else ""
        words = "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()
        out.append({SYNONYMS.get(w, w) for w in words if w not in STOPWORDS})
    return out


def words_matrix(probes: list[set[str]], gallery: list[set[str]]) -> np.ndarray:
    """tf-idf cosine of bags of attribute words (the text-only baseline), (P, G)."""
    vocab = sorted(set().union(*probes, *gallery))
    col = {w: j for j, w in enumerate(vocab)}

    def matrix(bags: list[set[str]]) -> np.ndarray:
        m = np.zeros((len(bags), len(vocab)), np.float32)
        for i, bag in enumerate(bags):
            m[i, [col[w] for w in bag]] = 1.0
        return m

    p, g = matrix(probes), matrix(gallery)
    idf = np.log((1 + len(gallery)) / (1 + g.sum(0))) + 1.0
    p, g = p * idf, g * idf
    p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return p @ g.T


def score_matrix(
    cache: FeatureCache,
    protocol: Protocol,
    level: int,
    mode: str = "image",
    *,
    model: TGFR | None = None,
    text_weight: float = 0.1,
    refine: Mapping[str, Any] | None = None,
    text: Mapping[str, Any] | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """(P, G) cosine scores of the protocol's probes (at `level`) against its gallery (clean).

    mode "image": frozen ArcFace cosine. "fused": cosine of TGFR fused vectors. "score":
    face cosine + `text_weight` * cosine of the two captions' sentence embeddings (0 where a
    caption is missing), the score-level fusion baseline. "refine": image-mode candidates
    re-ranked with the probe caption's score against each gallery face (`refine_scores`;
    `refine` defaults to the model's fitted parameters; gallery captions are not used).
    "text": the probe's caption alone against each gallery face, plus `caption_weight` times
    its score against the gallery entry's caption, both in the aligned space (`text` defaults
    to the model's fitted {"caption_weight": w}; w = 0 is a caption-less gallery).
    "words": the bag-of-attribute-words baseline, probe caption against gallery caption.
    """
    variant = f"L{int(level)}"
    if mode == "words":
        return words_matrix(
            _bags(cache, protocol.probes, PROBE_CAPTION),
            _bags(cache, protocol.gallery, GALLERY_CAPTION),
        )
    if mode == "image":
        p = _face_globals(cache, variant, protocol.probes)
        g = _face_globals(cache, "L0", protocol.gallery)
        return p @ g.T
    if mode == "score":
        face = (
            _face_globals(cache, variant, protocol.probes)
            @ _face_globals(cache, "L0", protocol.gallery).T
        )
        pt = _sentences(cache, protocol.probes, PROBE_CAPTION)
        gt = _sentences(cache, protocol.gallery, GALLERY_CAPTION)
        return face + float(text_weight) * (pt @ gt.T)
    if mode == "fused":
        if model is None:
            raise EvaluationError("fused mode needs a TGFR model")
        p = fused_vectors(model, cache, variant, protocol.probes, PROBE_CAPTION, device=device)
        g = fused_vectors(model, cache, "L0", protocol.gallery, GALLERY_CAPTION, device=device)
        return p @ g.T
    if mode in ("refine", "text"):
        if model is None:
            raise EvaluationError(f"{mode} mode needs a TGFR model")
        g, _ = aligned_images(model, cache, "L0", protocol.gallery, device=device)
        probe_text = aligned_captions(model, cache, protocol.probes, PROBE_CAPTION, device=device)
        if mode == "text":
            params = text if text is not None else model.summary.get("text", {})
            w = float(params.get("caption_weight", 0.0))
            scores = probe_text @ g.T
            if w:
                gc = aligned_captions(
                    model, cache, protocol.gallery, GALLERY_CAPTION, device=device
                )
                scores += w * (probe_text @ gc.T)
            return scores
        text_face = probe_text @ g.T
        face = (
            _face_globals(cache, variant, protocol.probes)
            @ _face_globals(cache, "L0", protocol.gallery).T
        )
        _, q = aligned_images(model, cache, variant, protocol.probes, device=device)
        params = refine if refine is not None else model.summary.get("refine")
        if not params:
            raise EvaluationError("the model has no fitted refine parameters (train it again)")
        return refine_scores(face, text_face, q, params)
    raise EvaluationError(f"mode must be one of {MODES}, not {mode!r}")


def _age_group(age: float) -> str:
    if age < 30:
        return "<30"
    if age < 45:
        return "30-44"
    if age < 60:
        return "45-59"
    return "60+"


def person_groups(lfw_root: Path, attribute: str) -> dict[str, str]:
    """Each person's group for `attribute` (gender, age or ethnicity), by majority over images.

    Groups come from the DeepFace predictions in `attributes.csv.gz` (model predictions, not
    self-reported labels): gender Man/Woman, age bands <30/30-44/45-59/60+, and the race label.
    """
    column = {"gender": "df_gender", "age": "df_age", "ethnicity": "df_race"}.get(attribute)
    if column is None:
        raise EvaluationError(f"--by must be gender, age or ethnicity, not {attribute!r}")
    path = Path(lfw_root) / "attributes.csv.gz"
    try:
        with gzip.open(path, "rt", newline="") as f:
            votes: dict[str, Counter[str]] = defaultdict(Counter)
            for row in csv.DictReader(f):
                value = row.get(column, "")
                if not value:
                    continue
                if attribute == "age":
                    try:
                        value = _age_group(float(value))
                    except ValueError:
                        continue
                votes[row["image"].split("/", 1)[0]][value] += 1
    except OSError as e:
        raise EvaluationError(f"cannot read {path}: {e}") from e
    return {person: c.most_common(1)[0][0] for person, c in votes.items()}


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> None:
    """Draw ROC curves (label -> (genuine, impostor)) on a log-FAR axis to a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        from tgfr_search.errors import MissingDependency

        raise MissingDependency("--plot needs matplotlib: `pip install matplotlib`") from e
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for label, (gen, imp) in curves.items():
        far, tar, _ = metrics.roc_curve(gen, imp, n_points=400)
        ok = far > 0
        ax.plot(far[ok], tar[ok], label=label)
    ax.set_xscale("log")
    ax.set_xlim(1e-5, 1)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def evaluate(
    cache: FeatureCache,
    *,
    split: str = "test",
    level: int = 0,
    mode: str = "image",
    model: TGFR | str | Path | None = None,
    text_weight: float = 0.1,
    plot: Path | None = None,
    by: str | None = None,
    lfw_root: Path | None = None,
    far_for_groups: float = 1e-3,
    open_set: float = 0.0,
    device: str = "cpu",
    scores_hook: Callable[[np.ndarray, Protocol], None] | None = None,
) -> dict[str, Any]:
    """Run the protocol and return the JSON-ready result dict of issue 3.

    Keys: level, mode, rank1, rank5, tar_at_far {"0.0001","0.001","0.01"}, eer, n_probes,
    n_gallery (rates are fractions in [0, 1]); plus "groups" when `by` is given (needs
    `lfw_root`), "threshold_at_far" for the group threshold, and "fnir_at_fpir" when
    `open_set` > 0. `model` may be a loaded TGFR or a checkpoint folder. `plot` writes a ROC
    PNG of this mode (and of image mode, for comparison, when mode is not image).
    """
    if mode not in MODES:
        raise EvaluationError(f"mode must be one of {MODES}, not {mode!r}")
    if level not in (0, 1, 2, 3):
        raise EvaluationError(f"level must be 0, 1, 2 or 3, not {level!r}")
    if isinstance(model, (str, Path)):
        from tgfr_search.models.tgfr import TGFR

        model = TGFR.load(Path(model))
    rows = cache.rows
    protocol = build_protocol(rows, split, open_set=open_set)
    scores = score_matrix(
        cache, protocol, level, mode, model=model, text_weight=text_weight, device=device
    )
    if scores_hook is not None:
        scores_hook(scores, protocol)
    mated = protocol.mate >= 0
    result: dict[str, Any] = {"level": int(level), "mode": mode}
    result.update(metrics.summarise(scores[mated], protocol.mate[mated]))
    result["n_probes"] = int(len(protocol.probes))
    result["n_gallery"] = int(len(protocol.gallery))
    if open_set > 0:
        fnir = metrics.fnir_at_fpir(scores, protocol.mate, (1e-2, 1e-3))
        result["fnir_at_fpir"] = {str(k): v for k, v in fnir.items()}
        result["n_non_mated"] = int((~mated).sum())
    if by is not None:
        if lfw_root is None:
            raise EvaluationError("--by needs the LFW folder (attributes.csv.gz)")
        groups = person_groups(Path(lfw_root), by)
        _, impostor = metrics.genuine_impostor(scores[mated], protocol.mate[mated])
        t = float(metrics.threshold_at_far(impostor, far_for_groups))
        result["by"] = by
        result["threshold_at_far"] = {str(far_for_groups): t}
        result["groups"] = metrics.group_rates(
            scores[mated],
            protocol.mate[mated],
            t,
            [groups.get(rows[i]["identity"]) for i in protocol.probes[mated]],
            [groups.get(rows[i]["identity"]) for i in protocol.gallery],
        )
    if plot is not None:
        curves = {}
        if mode != "image":
            base = score_matrix(cache, protocol, level, "image")
            curves["image"] = metrics.genuine_impostor(base[mated], protocol.mate[mated])
        curves[mode] = metrics.genuine_impostor(scores[mated], protocol.mate[mated])
        plot_roc(curves, Path(plot), f"{split}, level {level}")
    return result
