"""Query latency end to end on a 100k-face gallery, with insightface + numpy as the yardstick.

One probe at a time, from a 250x250 LFW photo file (and a one-sentence caption) to ranked
results: `SearchEngine.query` decodes, detects, aligns, embeds (ArcFace; with a caption also
MiniLM and the TGFR heads), searches the index, reads the results' rows and writes the audit
line. Two kinds of query: image + caption (mode `auto`, which is `fused` on a captioned
gallery) and image only (mode `image`). Yardstick, same probes, same gallery, same run:
insightface `FaceAnalysis` (detection + recognition, the same ONNX files, det_size 640) on the
decoded photo, then a numpy brute-force top-k over the gallery's face vectors in RAM.

The gallery: the raw LFW photos are enrolled through the engine with their captions, except
one photo per person, held out as that person's probe (80 probes, each with a genuine match).
The rest, up to `--size`, is generated and written straight into the store with
`Store.add_faces` (no image, no model): `face` rows are `facelike.py` photos (identity centres
plus per-photo spread, fitted to real ArcFace pairs); `fused` rows are
`normalise([cos t * face, sin t * cross])` as the TGFR heads build them, with `t` drawn from
the real enrolled faces' fused vectors and `cross` a random unit direction per identity plus
per-photo noise; `aligned` and `caption` rows are random unit vectors; every generated face
carries a real generated caption (so the gallery counts as captioned). The engine then builds
its indexes over all of it, as for any gallery of that size (PQ past 20k faces on CPU).

The gallery is built once into `--gallery` (default: a folder under the system temp dir) and
reused while it holds `--size` faces; building it is not timed.

    python benchmarks/query_latency.py [--size 100000] [--probes 80] [--repeats 2]
        [--out benchmarks/results/query_latency.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LFW, machine, table, write_json  # noqa: E402


def percentiles(ms: list[float]) -> dict[str, float]:
    q = np.percentile(np.array(ms), [50, 95, 99])
    return {
        "p50_ms": round(float(q[0]), 2),
        "p95_ms": round(float(q[1]), 2),
        "p99_ms": round(float(q[2]), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "queries": len(ms),
    }


def split_raw(lfw: Path) -> tuple[list[Path], list[Path]]:
    """(enrolled, probes): every raw photo, the last of each person held out as a probe."""
    enrolled, probes = [], []
    for person in sorted(p for p in (lfw / "raw").iterdir() if p.is_dir()):
        photos = sorted(person.glob("*.jpg"))
        enrolled += photos[:-1]
        probes.append(photos[-1])
    return enrolled, probes


def build_gallery(path: Path, size: int, lfw: Path, captions: dict[str, str], seed: int) -> None:
    """Enroll the real photos, then fill up to `size` faces with generated rows (see above)."""
    from facelike import FaceLike

    from tgfr_search import EnrollItem, SearchEngine
    from tgfr_search.store import NewFace

    enrolled, _ = split_raw(lfw)
    with SearchEngine(path, device="cpu") as engine:
        items = [
            EnrollItem(p, p.parent.name, caption=captions[f"{p.parent.name}/{p.name}"])
            for p in enrolled
        ]
        engine.enroll_many(items)
        real = engine.store.counts()[0]
        fused_dim = engine.tgfr.dims["fused"]
        ids, fused = engine.store.vectors("fused", dim=fused_dim)
        face_dim = engine.models.face.dim
        # The share of the fused vector given to the cross part, as the heads chose it.
        sin_t = np.linalg.norm(fused[:, face_dim:], axis=1)
        n = size - real
        rng = np.random.default_rng(seed)
        pool = list(captions.values())
        cross_dim = fused_dim - face_dim
        gen = FaceLike(seed=seed)
        done = 0
        for vectors, labels in gen.iter_gallery(n, chunk=5000):
            m = len(vectors)
            s = rng.choice(sin_t, m)[:, None]
            centre = rng.standard_normal((int(labels.max()) + 1, cross_dim)).astype(np.float32)
            cross = centre[labels] + 0.5 * rng.standard_normal((m, cross_dim)).astype(np.float32)
            cross /= np.linalg.norm(cross, axis=1, keepdims=True)
            fused_rows = np.concatenate([np.sqrt(1 - s * s) * vectors, s * cross], axis=1)
            unit = rng.standard_normal((m, 2, 256)).astype(np.float32)
            unit /= np.linalg.norm(unit, axis=2, keepdims=True)
            faces = [
                NewFace(
                    identity=f"generated-{seed}-{int(labels[i])}",
                    content_hash=f"generated-{seed}-{done + i}",
                    crop=b"",
                    vectors={
                        "face": vectors[i],
                        "fused": fused_rows[i].astype(np.float32),
                        "aligned": unit[i, 0],
                        "caption": unit[i, 1],
                    },
                    source=None,
                    caption=pool[(done + i) % len(pool)],
                )
                for i in range(m)
            ]
            engine.store.add_faces(faces)
            done += m
            print(f"  generated {done}/{n}", end="\r", flush=True)
        print()
        # Build and save the indexes now, so that no query pays for it.
        for space in ("face", "fused"):
            engine._index(space).save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, default=LFW)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2, help="passes over the probes")
    ap.add_argument("--gallery", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/query_latency.json"))
    args = ap.parse_args()
    gallery = args.gallery or Path(tempfile.gettempdir()) / f"tgfr-query-latency-{args.size}"

    from enroll_throughput import captions_for, vectron_folder

    from tgfr_search import SearchEngine

    enrolled, probes = split_raw(args.lfw)
    caps = captions_for(args.lfw, enrolled + probes)
    captions = {f"{p.parent.name}/{p.name}": c for p, c in zip(enrolled + probes, caps)}

    ready = False
    if (gallery / "metadata.db").exists():
        with SearchEngine(gallery, device="cpu") as engine:
            ready = engine.store.counts()[0] == args.size
    if not ready:
        import shutil

        shutil.rmtree(gallery, ignore_errors=True)
        t0 = time.perf_counter()
        print(f"building a {args.size}-face gallery in {gallery} ...")
        build_gallery(gallery, args.size, args.lfw, captions, args.seed)
        print(f"built in {time.perf_counter() - t0:.0f} s")

    rows: list[dict[str, Any]] = []
    with SearchEngine(gallery, device="cpu") as engine:
        faces, identities = engine.store.counts()
        t0 = time.perf_counter()
        _ = engine.tgfr
        engine.models.text.encode(["warm up"])
        load_s = time.perf_counter() - t0
        kinds = {s: type(engine._index(s).sync()).__name__ for s in ("face", "fused")}
        for kind, mode, with_caption in (
            ("image + caption", "auto", True),
            ("image only", "image", False),
        ):
            ms: list[float] = []
            hits = 0
            used = set()
            first = captions[f"{probes[0].parent.name}/{probes[0].name}"] if with_caption else None
            engine.query(probes[0], caption=first, mode=mode, k=args.k)  # warm-up
            for _ in range(args.repeats):
                for p in probes:
                    caption = captions[f"{p.parent.name}/{p.name}"] if with_caption else None
                    t0 = time.perf_counter()
                    result = engine.query(p, caption=caption, mode=mode, k=args.k)
                    ms.append(1000 * (time.perf_counter() - t0))
                    used.add(result.mode)
                    hits += bool(result) and result[0].identity == p.parent.name
            rows.append(
                {
                    "system": f"tgfr-search query, {kind} (mode {'/'.join(sorted(used))})",
                    **percentiles(ms),
                    "rank1": round(hits / len(ms), 4),
                }
            )

        # Yardstick: insightface detect + embed, numpy brute force over the same face vectors.
        import cv2
        from insightface.app import FaceAnalysis

        ids, matrix = engine.store.vectors("face", dim=engine.models.face.dim)
        best: list[tuple[int, str]] = []  # (face id at rank 1, the probe's person)
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("scrfd_500m_bnkps.onnx", "w600k_mbf.onnx"):
                (Path(tmp) / name).symlink_to(vectron_folder() / name)
            app = FaceAnalysis(
                name=tmp,
                allowed_modules=["detection", "recognition"],
                providers=["CPUExecutionProvider"],
            )
            app.prepare(ctx_id=-1, det_size=(640, 640))
            ms = []
            app.get(cv2.imread(str(probes[0])))
            for _ in range(args.repeats):
                for p in probes:
                    t0 = time.perf_counter()
                    found = app.get(cv2.imread(str(p)))
                    top = np.zeros(0, np.int64)
                    if found:
                        q = found[0].normed_embedding.astype(np.float32)
                        scores = matrix @ q
                        top = np.argpartition(-scores, args.k)[: args.k]
                        top = top[np.argsort(-scores[top])]
                    ms.append(1000 * (time.perf_counter() - t0))
                    if len(top):
                        best.append((int(ids[top[0]]), p.parent.name))
        info = engine.store.face_info(sorted({i for i, _ in best}))
        hits = sum(info[i].identity == person for i, person in best)
        rows.append(
            {
                "system": "insightface FaceAnalysis + numpy brute force (image only)",
                **percentiles(ms),
                "rank1": round(hits / len(ms), 4),
            }
        )
    base = rows[-1]["p50_ms"]
    for r in rows:
        r["p50_vs_yardstick"] = round(base / r["p50_ms"], 2)
    print(
        f"gallery {faces} faces ({identities} identities; {faces - len(enrolled)} generated), "
        f"indexes {kinds}, {len(probes)} probes x {args.repeats}, k={args.k}"
    )
    print(table(rows, ["system", "p50_ms", "p95_ms", "p99_ms", "rank1", "p50_vs_yardstick"]))
    write_json(
        args.out,
        {
            "machine": machine(),
            "gallery": {"faces": faces, "identities": identities, "indexes": kinds},
            "probes": len(probes),
            "repeats": args.repeats,
            "k": args.k,
            "model_load_s": round(load_s, 2),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
