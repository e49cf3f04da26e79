"""Where a query's time goes: wall time per part, averaged over the query_latency.py probes.

Opens the gallery that `query_latency.py` built (run that first), then wraps the parts of a
query with timers (decode, SCRFD, ArcFace with its region map, MiniLM, the TGFR heads, the
index search, the store's reads, the audit line) and runs every probe `--repeats` times. Parts
nest (`_probes` holds decode and detect; `_matches` holds two `vectors_of` reads), so the
column does not add up to the total; what no part covers is Python glue.

    python benchmarks/query_breakdown.py [--size 100000] [--mode auto|image] [--repeats 2]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LFW  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, default=LFW)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--gallery", type=Path, default=None)
    ap.add_argument("--mode", default="auto", choices=("auto", "image"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    gallery = args.gallery or Path(tempfile.gettempdir()) / f"tgfr-query-latency-{args.size}"
    if not (gallery / "metadata.db").exists():
        sys.exit(f"no gallery in {gallery}: run benchmarks/query_latency.py first")

    from enroll_throughput import captions_for
    from query_latency import split_raw

    import tgfr_search.engine as engine_module
    from tgfr_search import SearchEngine
    from tgfr_search.audit import AuditLog
    from tgfr_search.store import Store

    _, probes = split_raw(args.lfw)
    captions = captions_for(args.lfw, probes) if args.mode == "auto" else [None] * len(probes)
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def timed(owner: Any, attr: str, label: str) -> None:
        inner: Callable[..., Any] = getattr(owner, attr)

        @functools.wraps(inner)
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                spent[label] += time.perf_counter() - t0
                calls[label] += 1

        setattr(owner, attr, wrapper)

    with SearchEngine(gallery, device="cpu") as engine:
        engine.query(probes[0], caption=captions[0], mode=args.mode, k=10)  # loads everything
        models, runtime = engine.models, engine.tgfr
        timed(engine_module, "load_image", "decode")
        timed(models.detector, "detect", "SCRFD detect")
        timed(models.face, "embed", "ArcFace (image mode)")
        timed(runtime.regions, "embed_full", "ArcFace + region map (fused)")
        timed(models.text, "encode", "MiniLM encode")
        for name in ("encode_image", "encode_text", "fuse"):
            timed(runtime.model, name, f"TGFR heads: {name}")
        for kind in {type(engine._index(s).sync()) for s in ("face", "fused")}:
            timed(kind, "search", "index search")
        timed(Store, "generation", "store.generation")
        timed(Store, "face_info", "store.face_info")
        timed(Store, "vectors_of", "store.vectors_of")
        timed(AuditLog, "record", "audit line")
        timed(SearchEngine, "_probes", "_probes (decode + detect + align)")
        timed(SearchEngine, "_matches", "_matches (scores per result)")
        ms = []
        for _ in range(args.repeats):
            for probe, caption in zip(probes, captions):
                t0 = time.perf_counter()
                engine.query(probe, caption=caption, mode=args.mode, k=10)
                ms.append(1000 * (time.perf_counter() - t0))
    n = len(ms)
    print(f"mode {args.mode}: {n} queries, p50 {statistics.median(ms):.2f} ms")
    for label, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {label:34s} {1000 * seconds / n:6.2f} ms  ({calls[label] / n:g} calls)")


if __name__ == "__main__":
    main()
