"""The low-quality protocol on test people, every row of benchmarks/README.md in one run.

Rows: image only; score-level fusion (w tuned on val); each TGFR checkpoint given (fused);
refine and text with the first checkpoint (the shipped one by default); the bag-of-attribute-
words baseline. Then the false accept rate on test at the val-calibrated thresholds, open-set
FNIR at FPIR, and false match / non-match rates by gender. Everything was selected on val
before this runs; nothing here feeds back into a model.

    python benchmarks/tgfr_protocol.py --cache CACHE \\
        --model shipped=tgfr_search/weights --model global-only=ckpt/g4 ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tgfr_search.models.tgfr import TGFR
from tgfr_search.training import metrics
from tgfr_search.training.evaluate import build_protocol, evaluate, score_matrix
from tgfr_search.training.features import FeatureCache
from tgfr_search.training.train import tune_score_fusion

LEVELS = (0, 1, 2, 3)


def pct(x: float) -> float:
    return round(100 * float(x), 2)


def row(name: str, level: int | str, scores: np.ndarray, mate: np.ndarray) -> dict:
    r = metrics.summarise(scores, mate)
    tar = r["tar_at_far"]
    return {
        "row": name,
        "level": level,
        "rank1": pct(r["rank1"]),
        "rank5": pct(r["rank5"]),
        **{f"tar@{k}": pct(v) for k, v in tar.items()},  # type: ignore[union-attr]
        "eer": pct(r["eer"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", required=True, type=Path)
    ap.add_argument("--model", action="append", default=[], help="name=checkpoint folder")
    ap.add_argument("--lfw", type=Path, default=Path("../shared/datasets/lfw"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tgfr_protocol.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    cache = FeatureCache(args.cache)
    named = [m.split("=", 1) for m in (args.model or ["shipped=tgfr_search/weights"])]
    models = {name: TGFR.load(path) for name, path in named}
    product = next(iter(models.values()))
    protocol = build_protocol(cache.rows, "test")
    mate = protocol.mate
    w = tune_score_fusion(cache)["best"]["w"]
    rows, far = [], {}
    for lv in LEVELS:
        rows.append(row("image only", lv, score_matrix(cache, protocol, lv, "image"), mate))
        s = score_matrix(cache, protocol, lv, "score", text_weight=w)
        rows.append(row(f"score fusion (w={w:g}, val)", lv, s, mate))
        for name, model in models.items():
            s = score_matrix(cache, protocol, lv, "fused", model=model)
            rows.append(row(f"{name}: fused", lv, s, mate))
        for mode in ("image", "fused", "refine"):
            s = score_matrix(cache, protocol, lv, mode, model=product)
            if mode == "refine":
                rows.append(row("refine (caption-less gallery)", lv, s, mate))
            _, impostor = metrics.genuine_impostor(s, mate)
            far.setdefault(mode, []).append(impostor)
        print(json.dumps(rows[-len(models) - 3 :]), flush=True)
    text = score_matrix(cache, protocol, 0, "text", model=product)
    rows.append(row("text: description alone", "-", text, mate))
    rows.append(
        row("bag-of-attribute-words baseline", "-", score_matrix(cache, protocol, 0, "words"), mate)
    )
    thresholds = product.summary["thresholds"]
    far_check = {}
    for mode, per_level in far.items():
        by_far = thresholds[mode]
        far_check[mode] = {
            "pooled": {f: float((np.concatenate(per_level) > t).mean()) for f, t in by_far.items()},
            **{
                f"L{lv}": {f: float((imp > t).mean()) for f, t in by_far.items()}
                for lv, imp in zip(LEVELS, per_level)
            },
        }
    open_set = [
        {
            "mode": mode,
            "level": lv,
            **{k: r[k] for k in ("rank1", "fnir_at_fpir", "n_probes", "n_non_mated", "n_gallery")},
        }
        for mode in ("image", "fused", "refine")
        for lv in (0, 3)
        for r in [evaluate(cache, level=lv, mode=mode, model=product, open_set=0.5)]
    ]
    groups = {
        mode: evaluate(cache, level=3, mode=mode, model=product, by="gender", lfw_root=args.lfw)
        for mode in ("image", "fused")
    }
    doc = {
        "split": "test",
        "n_probes": int(len(protocol.probes)),
        "n_gallery": int(len(protocol.gallery)),
        "rows": rows,
        "far_at_val_thresholds": far_check,
        "thresholds": thresholds,
        "open_set": open_set,
        "groups": groups,
        "models": {name: str(path) for name, path in named},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{'row':42} {'L':>2} {'rank1':>6} {'rank5':>6} {'1e-4':>6} {'1e-3':>6} {'1e-2':>6}")
    for r in rows:
        print(
            f"{r['row']:42} {r['level']!s:>2} {r['rank1']:6.2f} {r['rank5']:6.2f} "
            f"{r['tar@0.0001']:6.2f} {r['tar@0.001']:6.2f} {r['tar@0.01']:6.2f}"
        )
    print(json.dumps({"far_at_val_thresholds": far_check, "open_set": open_set}, indent=1))


if __name__ == "__main__":
    main()
