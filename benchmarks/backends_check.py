"""Issue 7's check through the CLI: the raw-LFW identification run on faiss and on Milvus Lite.

80 people enrolled with their first photo, their 293 other photos queried (top 5): rank-1 of
each store, how many probes get the same top-5 identities from both, then the same after
deleting every fourth person and enrolling them again.

    python benchmarks/backends_check.py ../shared/datasets/lfw \
        --out benchmarks/results/backends_lfw.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tgfr(*args: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "tgfr_search.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    if out.returncode != 0:
        raise SystemExit(f"tgfr-search {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def top5(store: list[str], probes: Path) -> dict[str, list[str]]:
    lines = tgfr(*store, "query", str(probes), "-k", "5", "--json").splitlines()
    docs = [json.loads(line) for line in lines if line.strip()]
    return {Path(d["probe"]).name: [m["identity"] for m in d["results"]] for d in docs}


def compare(a: dict[str, list[str]], b: dict[str, list[str]]) -> dict[str, float | int]:
    truth = {name: name.split("__")[0] for name in a}
    return {
        "probes": len(a),
        "rank1_faiss": sum(a[p][0] == truth[p] for p in a) / len(a),
        "rank1_milvus_lite": sum(b[p][0] == truth[p] for p in b) / len(b),
        "same_top5": sum(a[p] == b[p] for p in a),
        "same_top5_fraction": sum(a[p] == b[p] for p in a) / len(a),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lfw", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    people = {d.name: sorted(d.glob("*.jpg")) for d in sorted((args.lfw / "raw").iterdir())}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gallery, probes = root / "gallery", root / "probes"
        probes.mkdir()
        for name, photos in people.items():
            (gallery / name).mkdir(parents=True)
            (gallery / name / photos[0].name).symlink_to(photos[0].resolve())
            for p in photos[1:]:
                (probes / f"{name}__{p.name}").symlink_to(p.resolve())
        stores = {
            "faiss": ["--db", str(root / "faiss")],
            "milvus-lite": [
                "--db",
                str(root / "milvus"),
                "--vectors",
                f"milvus-lite://{root / 'vectors.db'}",
            ],
        }
        result: dict[str, object] = {
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "command": " ".join(["python", *sys.argv]),
        }
        t0 = time.monotonic()
        for store in stores.values():
            tgfr(*store, "enroll", str(gallery), "--json")
        before = [top5(s, probes) for s in stores.values()]
        result["enrolled"] = compare(*before)
        doomed = list(people)[::4]
        for store in stores.values():
            for name in doomed:
                tgfr(*store, "delete", "--yes", name)
        after = [top5(s, probes) for s in stores.values()]
        result["deleted"] = len(doomed)
        result["after_delete"] = compare(*after)
        result["deleted_found"] = sum(
            n in doomed for answers in after for r in answers.values() for n in r
        )
        again = root / "again"
        for name in doomed:
            (again / name).mkdir(parents=True)
            (again / name / people[name][0].name).symlink_to(people[name][0].resolve())
        for store in stores.values():
            tgfr(*store, "enroll", str(again), "--json")
        result["after_reenroll"] = compare(*[top5(s, probes) for s in stores.values()])
        result["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
