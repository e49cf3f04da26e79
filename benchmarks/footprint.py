"""Bytes per enrolled face, on disk and in RAM, and what dominates them.

Disk: real LFW aligned crops with generated captions enrolled through `enroll_many` (aligned,
CPU) into a fresh engine folder; every file's size after a WAL checkpoint, divided by the
faces. The SQLite share is split by table with SQLite's `dbstat` view where the build has it.
RAM: the resident-set growth of loading a gallery's indexes (all vector spaces) in a fresh
process, divided by its faces: on the enrolled folder, and on a larger gallery folder given
with `--gallery` (e.g. the 100k-face gallery of `query_latency.py`, where PQ indexes are used).

    python benchmarks/footprint.py [--faces 1000] [--gallery DIR] [--out results/footprint.json]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LFW, machine, table, write_json  # noqa: E402
from enroll_throughput import captions_for  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def disk(folder: Path, faces: int) -> dict[str, Any]:
    """Bytes per face of every file in an engine folder, and of each SQLite table."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    out: dict[str, Any] = {"faces": faces, "files": files}
    out["bytes_per_face"] = round(sum(files.values()) / faces, 1)
    db = folder / "metadata.db"
    try:
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall()
        out["sqlite_bytes_per_face"] = {n: round(b / faces, 1) for n, b in rows if b}
    except sqlite3.OperationalError:  # built without SQLITE_ENABLE_DBSTAT_VTAB
        pass
    return out


def index_ram(folder: Path) -> dict[str, Any]:
    """Resident-set growth of loading an engine's indexes, per face, in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "--ram-of", str(folder)], capture_output=True, text=True
    )
    if out.returncode:
        sys.exit(out.stderr.strip().splitlines()[-1])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _index_ram_here(folder: Path) -> dict[str, Any]:
    import faiss  # noqa: F401  (its libraries are not the gallery's memory)

    from tgfr_search import SearchEngine

    with SearchEngine(folder) as engine:
        spaces = engine.info()["spaces"]
        faces = engine.store.counts()[0]
        before = rss_bytes()
        kinds = {s: type(engine._index(s).sync()).__name__ for s in spaces}
        grown = rss_bytes() - before
    return {
        "faces": faces,
        "indexes": kinds,
        "index_ram_bytes": grown,
        "ram_bytes_per_face": round(grown / faces, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, default=LFW)
    ap.add_argument("--faces", type=int, default=1000)
    ap.add_argument("--gallery", type=Path, help="an existing engine folder to measure RAM on")
    ap.add_argument("--ram-of", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results/footprint.json")
    args = ap.parse_args()
    if args.ram_of:
        print(json.dumps(_index_ram_here(args.ram_of)))
        return

    from tgfr_search import SearchEngine
    from tgfr_search.engine import EnrollItem

    files = sorted((args.lfw / "aligned112").glob("*/*.jpg"))[: args.faces]
    if not files:
        sys.exit(f"no LFW aligned crops under {args.lfw}")
    caps = captions_for(args.lfw, files)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "db"
        with SearchEngine(folder) as engine:
            items = [EnrollItem(f, f.parent.name, caption=c) for f, c in zip(files, caps)]
            report = engine.enroll_many(items, aligned=True, batch_size=64)
            engine.store.checkpoint()
        d = disk(folder, report.enrolled)
        rows.append({"gallery": f"{report.enrolled} LFW aligned files + captions", **d})
        rows[-1].update(index_ram(folder))
    if args.gallery:
        faces = index_ram(args.gallery)
        rows.append({"gallery": str(args.gallery), **disk(args.gallery, faces["faces"]), **faces})
    print(table(rows, ["gallery", "faces", "bytes_per_face", "ram_bytes_per_face", "indexes"]))
    for r in rows:
        print(r["gallery"], "files:", r["files"])
        print("  sqlite per face:", r.get("sqlite_bytes_per_face"))
    write_json(args.out, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
