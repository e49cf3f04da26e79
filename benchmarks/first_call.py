"""What a process's first GPU batches cost over the same batches again (a diagnostic).

Loads the engine's models on CUDA as `enroll_throughput.py` does (warmed up on two crops),
then embeds real LFW crops with their captions at enrollment's batch sizes (the ramp 512,
1,024, 2,048, then 4,096 and a 3,456 tail) twice over, each call waited for, and times each
part of a call: tokenising, MiniLM with the text heads, the recogniser with its region map,
the heads, and the copies back. A part whose first call costs more than its second at the
same size is paid once per process (allocations, kernel and cuDNN plan set-up).

    python benchmarks/first_call.py [--out benchmarks/results/first_call.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LFW, machine, write_json  # noqa: E402
from enroll_throughput import captions_for  # noqa: E402

SIZES = [512, 1024, 2048, 4096, 4096, 3456]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, default=LFW)
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a quick check of this script)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="batch sizes, in order")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/first_call.json"))
    args = ap.parse_args()

    import cv2
    import numpy as np
    import torch

    from tgfr_search import SearchEngine

    files = sorted((args.lfw / "aligned112").glob("*/*.jpg"))[:2400]
    real = [cv2.imread(str(f)) for f in files]
    texts = captions_for(args.lfw, files)
    sizes = [int(x) for x in args.sizes.split(",")]
    n = max(sizes)
    crops = [real[i % len(real)] for i in range(n)]
    caps = [texts[i % len(texts)] for i in range(n)]

    with (
        tempfile.TemporaryDirectory() as tmp,
        SearchEngine(Path(tmp) / "db", device=args.device) as e,
    ):
        runtime = e.tgfr
        warm = np.zeros((112, 112, 3), np.uint8)
        runtime.text.encode(["warm up"])
        runtime.embed([warm] * 2, ["warm up", None])
        e.models.face.embed([warm])
        on_gpu = args.device != "cpu"
        sync = torch.cuda.synchronize if on_gpu else lambda: None

        regions = runtime.regions
        face = regions.embed_full_tensors if on_gpu else regions.embed_full

        def timed(fn: Any) -> tuple[Any, float]:
            t0 = time.perf_counter()
            out = fn()
            sync()
            return out, round(1e3 * (time.perf_counter() - t0), 1)

        rows = []
        for rnd in range(2):
            for size in sizes:
                c, t = crops[:size], caps[:size]
                ready, tok = timed(lambda c=c, t=t: runtime.tokenize(t))
                distinct = sorted(set(t))
                _, text_ms = timed(lambda d=distinct: runtime._text_parts(d))
                _, face_ms = timed(lambda c=c: face(c))
                _, all_ms = timed(lambda c=c, t=t, r=ready: runtime.embed_later(c, t, r)())
                rows.append(
                    {
                        "round": rnd,
                        "size": size,
                        "captions": len(distinct),
                        "tokenize_ms": tok,
                        "text_ms": text_ms,
                        "recogniser_ms": face_ms,
                        "embed_later_ms": all_ms,
                        "gpu_reserved_mb": torch.cuda.memory_reserved() >> 20 if on_gpu else 0,
                    }
                )
                print(rows[-1], flush=True)
        pinned: dict[str, float] = {}
        for mb in (40, 160) if on_gpu else ():
            _, pinned[f"pin_{mb}mb_ms"] = timed(
                lambda mb=mb: torch.empty(mb << 20, dtype=torch.uint8, pin_memory=True)
            )
        print(pinned)
        # A run's start: reading the (empty) indexes, then forking the decoding processes from
        # this process, which holds the models, until each has run a task.
        from tgfr_search import engine as eng
        from tgfr_search.images import Arena

        start: dict[str, float] = {}
        _, start["index_sync_ms"] = timed(lambda: [e._index(s).sync() for s in e._spaces()])
        for rnd in range(2):
            arena = Arena(3 * 4096, 112 * 112 * 3)
            pool = eng._decode_processes(eng._workers(), arena)
            assert pool is not None
            with pool:
                _, start[f"fork_{rnd}_ms"] = timed(
                    lambda p=pool: [f.result() for f in [p.submit(abs, -1) for _ in range(64)]]
                )
        print(start)
    write_json(args.out, {"machine": machine(), "rows": rows, "pinned": pinned, "start": start})


if __name__ == "__main__":
    main()
