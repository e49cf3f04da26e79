"""GPU enrollment, stage by stage: variants of the pipeline in one process, then the models' parts.

Each variant patches the engine for its runs, then `enroll_throughput.ours` enrolls the same
48,000 faces (2,400 LFW aligned crops x 20 commented copies, as `enroll_throughput.py --copies
20 --input files`) into fresh engines and reports the median rate and the stage seconds:

* `new`: the engine as it is.
* `no-arena`: decoded pixels come back through the worker pipes, not shared memory.
* `threads-decode`: decoding in threads of this process, no worker processes.
* `stub models`: the models replaced by fixed vectors (what the rest of the pipeline allows).
* `stub store`: the store's insert replaced by handing out ids (what the rest allows).
* `4k-pages`: new SQLite files with 4 KB pages, as before 16 KB.
* `no ramp`: every batch full size, without the smaller first batches.
* `writer checkpoints`: each commit folds the WAL into the file itself, as before
  `Store.checkpoints_aside` moved that to a thread of its own.
* `float32 vectors`: vectors stored as float32, as before migration 0002.
* `IN-list duplicates`: the duplicate check as an IN list of bound hashes, as before.
* `N workers`: N decoding processes.
* `no save`: the index files not written at the end of the run (what saving them costs).
* `gc off`: the garbage collector off during the run, young collections too.
* `full collections`: the collector's automatic full passes left on during the run, as before
  stop 13 (after the fork they stalled every thread).
* `fp32 index files`: the torch index saved as float32 `IndexFlatIP`, as before stop 13.
* `blocking indices`: the caption indices copied to the GPU after the recogniser is queued,
  which waits for it, as before stop 13.
* `fork per run`: each run forks its decoding processes and shuts them down, as before stop 15
  (now a run leaves them to the next).

Variants combine with `+`: `stub models+writer checkpoints` is the pipeline without the models,
the writer checkpointing as before.

Then, on batches of 4,096 crops with their captions: `TGFRRuntime.embed` and its parts, and
the operations in one `embed` that synchronise with the GPU.

    python benchmarks/enroll_variants.py [--variants new,no-arena,...] [--repeats 2]
        [--batch-size 4096] [--copies 20] [--limit N] [--no-parts]
        [--out results/enroll_variants.json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import enroll_throughput as et  # noqa: E402
from _common import LFW, machine, write_json  # noqa: E402


@contextlib.contextmanager
def patched(pairs: list[tuple[Any, str, Any]]) -> Any:
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in pairs]
    for owner, name, value in pairs:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def variants(dims: dict[str, int]) -> dict[str, list[tuple[Any, str, Any]]]:
    import tgfr_search.engine as engine
    from tgfr_search import images
    from tgfr_search.store import store

    pragmas = store._sqlite_pragmas

    def pragmas_4k(conn: Any, record: Any) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA page_size=4096")
        cur.close()
        pragmas(conn, record)

    fixed: dict[str, np.ndarray] = {}

    def stub_embed(self: Any, crops: list[Any], captions: list[Any], ready: Any = None) -> Any:
        if not fixed or len(next(iter(fixed.values()))) != len(crops):
            rng = np.random.default_rng(0)
            fixed.clear()
            fixed.update(
                {
                    k: rng.standard_normal((len(crops), d)).astype(np.float16)
                    for k, d in dims.items()
                }
            )
        return lambda: dict(fixed)

    issued = [0]

    def stub_add(self: Any, faces: list[Any]) -> list[int]:
        first = issued[0] + 1
        issued[0] += len(faces)
        return list(range(first, first + len(faces)))

    def in_list(self: Any, keys: Any) -> set[tuple[str, int]]:
        from sqlalchemy import select

        from tgfr_search.store.schema import Face

        hashes = {h for h, _ in keys}
        with self._session() as s:
            rows = s.execute(
                select(Face.content_hash, Face.face_index).where(Face.content_hash.in_(hashes))
            ).all()
        return {(h, i) for h, i in rows}

    enroll_many = engine.SearchEngine.enroll_many

    def gc_off(self: Any, *args: Any, **kwargs: Any) -> Any:
        gc.disable()
        try:
            return enroll_many(self, *args, **kwargs)
        finally:
            gc.enable()

    from tgfr_search.index import torch_index
    from tgfr_search.index.base import atomic_write
    from tgfr_search.index.faiss_index import _faiss
    from tgfr_search.models import fusion

    def save_fp32(self: Any, path: Any) -> None:
        faiss = _faiss()
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        for shard in self._shards:
            for s in range(0, shard.n, 1 << 18):
                block = shard.data[s : min(s + (1 << 18), shard.n)].float().cpu().numpy()
                index.add_with_ids(block, shard.ids[s : s + (1 << 18)])
        atomic_write(path, lambda tmp: faiss.write_index(index, tmp))

    def on_device_blocking(self: Any, crops: Any, captions: Any, ready: Any) -> Any:
        t = self._torch
        texts = fusion._texts(captions)
        distinct = sorted(set(texts))
        pos = {x: i for i, x in enumerate(distinct)}
        text_parts = self._text_parts(distinct, ready)
        needs = self.model.config.needs_regions
        globals_, norms, regions = self.regions.embed_full_tensors(crops, regions=needs)
        with t.inference_mode():
            image = self.model.encode_image(globals_, norms, regions)
            where = t.tensor([pos[x] for x in texts], device=self.device)
            text = {k: v[where] for k, v in text_parts.items()}
            has_text = t.tensor([bool(x) for x in texts], device=self.device)
            fused = self.model.fuse(image, text, has_text=has_text)
            out = {"face": globals_, fusion.FUSED: fused, fusion.ALIGNED: image["global"]}
            if fusion.CAPTION in self.dims:
                out[fusion.CAPTION] = text["sentence"] * has_text[:, None].to(
                    text["sentence"].dtype
                )
            return out, norms

    @contextlib.contextmanager
    def fork_per_run(workers: int, slots: int) -> Any:
        decoders = engine._Decoders(workers, slots)
        try:
            yield decoders
        finally:
            decoders.shutdown()

    out: dict[str, list[tuple[Any, str, Any]]] = {
        "new": [],
        "no-arena": [(images.Arena, "put", lambda self, slot, image: False)],
        "threads-decode": [(engine, "_decode_processes", lambda workers, arena: None)],
        "stub models": [(engine.SearchEngine, "_embed_later", stub_embed)],
        "stub store": [(store.Store, "add_faces", stub_add)],
        "4k-pages": [(store, "_sqlite_pragmas", pragmas_4k)],
        "no ramp": [(engine, "_RAMP", 0)],
        "writer checkpoints": [(store.Store, "checkpoints_aside", contextlib.nullcontext)],
        "float32 vectors": [(store, "VECTOR_DTYPE", np.dtype("<f4"))],
        "IN-list duplicates": [(store.Store, "existing", in_list)],
        "no save": [(engine.SearchEngine, "_save_indexes", lambda self, pool=None: None)],
        "gc off": [(engine.SearchEngine, "enroll_many", gc_off)],
        "full collections": [(engine, "_young_collections_only", contextlib.nullcontext)],
        "fp32 index files": [(torch_index.TorchIndex, "save", save_fp32)],
        "blocking indices": [(fusion.TGFRRuntime, "_on_device", on_device_blocking)],
        "fork per run": [(engine, "_decoders", fork_per_run)],
    }
    for n in (4, 6, 12, 16):
        out[f"{n} workers"] = [(engine, "_workers", lambda n=n: n)]
    return out


def parts(files: list[Path], caps: list[list[str]], device: str, n: int) -> dict[str, Any]:
    """`embed` and its parts on one batch, and where one `embed` waits for the GPU."""
    import torch

    from tgfr_search import SearchEngine
    from tgfr_search.images import load_image

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, SearchEngine(Path(tmp) / "db", device=device) as eng:
        rt = eng.tgfr
        crops = [load_image(files[i % len(files)]) for i in range(n)]
        texts = [
            caps[i % len(files)][i // len(files) % len(caps[i % len(files)])] for i in range(n)
        ]
        distinct = sorted(set(texts))
        rt.embed(crops[:64], texts[:64])
        needs = rt.model.config.needs_regions
        tokenizer, _ = rt.text._load()

        def timed(label: str, fn: Any) -> None:
            times = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out[label] = round(1e3 * statistics.median(times), 1)
            print(f"  {label}: {out[label]} ms per {n}", flush=True)

        print(f"parts, batch {n}, {len(distinct)} distinct captions")
        timed("embed() end to end", lambda: rt.embed(crops, texts))
        timed(
            "recogniser + region map", lambda: rt.regions.embed_full_tensors(crops, regions=needs)
        )
        timed("tokenise the distinct captions", lambda: rt.text._tokenize(tokenizer, distinct))
        timed("text parts (tokenise + MiniLM + text heads)", lambda: rt._text_parts(distinct))
        timed("embed_later() and its result", lambda: rt.embed_later(crops, texts)())
        for label, call in (("embed", rt.embed), ("embed_later", rt.embed_later)):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                call(crops, texts)
                returned = time.perf_counter() - t0
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            where = collections.Counter(
                f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in caught
            )
            key = "sync_points" if label == "embed" else f"sync_points_{label}"
            out[key] = dict(where)
            out[f"{label}_returns_ms"] = round(1e3 * returned, 1)
            print(f"  waits for the GPU in one {label}() (returned in {1e3 * returned:.1f} ms):")
            print(f"    {dict(where)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, default=LFW)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default="new,no-arena,threads-decode,stub models,stub store")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--limit", type=int, default=0, help="at most this many aligned crops")
    ap.add_argument("--no-parts", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/enroll_variants.json"))
    args = ap.parse_args()
    from tgfr_search import SearchEngine

    files = sorted((args.lfw / "aligned112").glob("*/*.jpg"))[: args.limit or None]
    caps = et.caption_lists(args.lfw, files)
    copy_dir = tempfile.TemporaryDirectory()
    copies = et.commented_copies(files, args.copies, Path(copy_dir.name))

    def items() -> list[Any]:
        return et.copy_items(files, caps, copies)

    with (
        tempfile.TemporaryDirectory() as tmp,
        SearchEngine(Path(tmp) / "db", device=args.device) as eng,
    ):
        vectors, _ = eng._embed([np.zeros((112, 112, 3), np.uint8)] * 2, ["a", "b"])
        dims = {k: v.shape[1] for k, v in vectors.items()}
    table = variants(dims)
    results: dict[str, Any] = {}
    from tgfr_search import engine

    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        # Each variant forks its own decoders: kept ones carry the patches of the one before.
        engine._drop_spare()
        with patched([p for part in name.split("+") for p in table[part.strip()]]):
            r = et.ours(
                items,
                len(copies),
                aligned=True,
                device=args.device,
                repeats=args.repeats,
                batch_size=args.batch_size,
                stages=True,
            )
        results[name] = r
        print(
            f"{name}: {r['rate']:.0f} faces/s {r['rates']}\n  {r.get('stage_seconds')}", flush=True
        )
    doc: dict[str, Any] = {
        "machine": machine(),
        "args": vars(args) | {"lfw": str(args.lfw), "out": str(args.out)},
    }
    doc["variants"] = results
    if not args.no_parts:
        doc["parts_ms"] = parts(files, caps, args.device, args.batch_size)
    copy_dir.cleanup()
    write_json(args.out, doc)


if __name__ == "__main__":
    main()
