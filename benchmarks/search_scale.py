"""Search speed by gallery size, with numpy brute force and faiss flat as yardsticks in one run.

CPU mode (default): for each gallery size, face-like vectors (benchmarks/facelike.py) are
searched by numpy brute force (matmul + argpartition), exact faiss flat (`FaissFlatIndex`)
and the approximate index the factory picks past its threshold (`FaissPQIndex`): batch-1
latency (p50, p99), batch throughput, build time, recall@10 against exact search, unfiltered
and with an id pre-filter (1% and 30% subsets). `--compare` adds IVF-Flat and HNSW sweeps
at sizes up to --compare-max, which is how the ANN kind was chosen.

    python benchmarks/search_scale.py [--sizes 10000,30000,100000,1000000]
        [--compare] [--out benchmarks/results/search_scale.json]

GPU mode: exact search over 10M x 512 fp16 vectors with torch (matmul + top-k, `TorchIndex`,
one shard per visible CUDA device): batch-1 latency and effective scan rate (bytes of
vectors / time), and queries/s at batch 1024. Needs only numpy and torch.

    python benchmarks/search_scale.py --gpu [--gpu-size 10000000] --out results/search_gpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
from _common import table, write_json  # noqa: E402
from facelike import FaceLike  # noqa: E402

K = 10


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        pass
    return info


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(got, truth)]))


def latency(search: Any, q: np.ndarray, *, budget_s: float, max_n: int) -> dict[str, Any]:
    """Batch-1 latency over up to `max_n` probes, fewer when the budget runs out (min 10)."""
    search(q[:1])  # warm-up
    search(q[1:2])
    times: list[float] = []
    start = time.perf_counter()
    for i in range(max_n):
        t0 = time.perf_counter()
        search(q[i % len(q) : i % len(q) + 1])
        times.append(time.perf_counter() - t0)
        if i >= 9 and time.perf_counter() - start > budget_s:
            break
    ms = np.array(times) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "n": len(ms),
    }


def throughput(search: Any, q: np.ndarray, *, budget_s: float) -> float:
    search(q[:8])
    start, done = time.perf_counter(), 0
    while True:
        search(q)
        done += len(q)
        if time.perf_counter() - start > budget_s:
            break
    return round(done / (time.perf_counter() - start), 1)


class NumpyBrute:
    """The numpy yardstick: one matmul (BLAS, all cores) and argpartition, in row chunks."""

    def __init__(self, x: np.ndarray, ids: np.ndarray) -> None:
        self.x, self.ids = x, ids

    def search(self, q: np.ndarray, k: int = K) -> np.ndarray:
        step = max(1 << 14, (256 << 20) // (4 * len(q)))
        best_s = np.full((len(q), 0), -np.inf, np.float32)
        best_i = np.zeros((len(q), 0), np.int64)
        for r0 in range(0, len(self.x), step):
            s = q @ self.x[r0 : r0 + step].T
            kk = min(k, s.shape[1])
            top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
            best_i = np.concatenate([best_i, top + r0], axis=1)
            if best_s.shape[1] > 4 * k:
                keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
                best_s = np.take_along_axis(best_s, keep, 1)
                best_i = np.take_along_axis(best_i, keep, 1)
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        return self.ids[np.take_along_axis(best_i, order, 1)]


def cpu_size(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    from tgfr_search.index import FaissFlatIndex, build_index
    from tgfr_search.index.factory import ANN_KIND

    t0 = time.perf_counter()
    data = FaceLike(seed=args.seed).generate(n, args.queries)
    x, q = data.gallery, data.probes
    ids = np.arange(n, dtype=np.int64) * 2 + 1  # ids unlike positions, as in a real gallery
    gen_s = time.perf_counter() - t0
    print(f"\n== {n:,} x {x.shape[1]} (generated in {gen_s:.1f}s, load {load()})", flush=True)
    rows: list[dict[str, Any]] = []
    brute = NumpyBrute(x, ids)
    truth = brute.search(q)
    rng = np.random.default_rng(args.seed)
    subsets = {f: np.sort(rng.choice(ids, max(K, int(f * n)), replace=False)) for f in (0.01, 0.3)}
    truth_sub = {}
    for f, sub in subsets.items():
        pos = (sub - 1) // 2
        truth_sub[f] = NumpyBrute(x[pos], sub).search(q)
    nb = q[: args.batch]

    def row(name: str, search: Any, build_s: float | None, **extra: Any) -> dict[str, Any]:
        r: dict[str, Any] = {"size": n, "method": name, "build_s": build_s, **extra}
        r["b1"] = latency(search, q, budget_s=args.budget, max_n=args.latency_queries)
        r["batch_qps"] = throughput(search, nb, budget_s=args.budget)
        r["load"] = load()
        rows.append(r)
        print(
            f"  {name:24s} p50 {r['b1']['p50_ms']:9.3f} ms  p99 {r['b1']['p99_ms']:9.3f} ms"
            f"  (n={r['b1']['n']})  batch {r['batch_qps']:9.1f} q/s  "
            + " ".join(f"{k}={v}" for k, v in extra.items()),
            flush=True,
        )
        return r

    row("numpy brute force", brute.search, None, recall10=1.0)

    t0 = time.perf_counter()
    flat = FaissFlatIndex(x.shape[1], use_gpu=False)
    flat.add(ids, x)
    flat_build = time.perf_counter() - t0
    row("faiss flat", lambda z: flat.search(z, K)[1], round(flat_build, 2), recall10=1.0)
    flat = None  # free its memory before the next index

    t0 = time.perf_counter()
    ann = build_index(x.shape[1], ids, x, kind=ANN_KIND, use_gpu=False)
    ann_build = time.perf_counter() - t0
    extra = {
        "recall10": round(recall(ann.search(q, K)[1], truth), 4),
        **{
            f"recall10_subset{int(f * 100)}pct": round(
                recall(ann.search(q, K, subset=sub)[1], truth_sub[f]), 4
            )
            for f, sub in subsets.items()
        },
        "params": _params(ann),
    }
    r = row(f"ann ({ann.kind})", lambda z: ann.search(z, K)[1], round(ann_build, 2), **extra)
    r["subset_b1"] = {
        f"{int(f * 100)}pct": latency(
            lambda z, s=sub: ann.search(z, K, subset=s)[1],
            q,
            budget_s=args.budget / 2,
            max_n=50,
        )
        for f, sub in subsets.items()
    }
    print(f"  {'':24s} filtered b1: {r['subset_b1']}", flush=True)
    ann = None
    if args.compare and n <= args.compare_max:
        rows += compare(x, ids, q, truth, args)
    return rows


def _params(index: Any) -> dict[str, Any]:
    keys = ("m", "k_factor", "min_candidates", "exact_fraction", "nlist", "nprobe", "ef_search")
    return {k: getattr(index, k) for k in keys if hasattr(index, k)}


def compare(
    x: np.ndarray, ids: np.ndarray, q: np.ndarray, truth: np.ndarray, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Sweeps of the approximate kinds: recall@10 and batch-1 latency per search setting."""
    from tgfr_search.index import build_index

    n, dim, out = len(x), x.shape[1], []
    t0 = time.perf_counter()
    ivf: Any = build_index(dim, ids, x, kind="ivf", use_gpu=False)
    build_s = time.perf_counter() - t0
    for p in _nprobes(ivf.nlist):
        ivf.set_nprobe(p)
        out.append(_sweep_row(n, f"ivf-flat nlist={ivf.nlist} nprobe={p}", ivf, q, truth, build_s))
    del ivf
    t0 = time.perf_counter()
    pq: Any = build_index(dim, ids, x, kind="pq")
    build_s = time.perf_counter() - t0
    for kf in (10, 20, 30, 50):
        pq.k_factor = kf
        out.append(_sweep_row(n, f"pq m={dim // 2} k_factor={kf}", pq, q, truth, build_s))
    del pq
    t0 = time.perf_counter()
    hnsw: Any = build_index(dim, ids, x, kind="hnsw", m=32, ef_construction=80)
    build_s = time.perf_counter() - t0
    for ef in (128, 256, 512, 1024, 2048):
        hnsw.ef_search = ef
        out.append(_sweep_row(n, f"hnsw M=32 efC=80 ef={ef}", hnsw, q, truth, build_s))
    return out


def _nprobes(nlist: int) -> list[int]:
    return [p for p in (nlist // 32, nlist // 8, nlist // 4, nlist // 2) if p >= 1]


def _sweep_row(
    n: int, name: str, index: Any, q: np.ndarray, truth: np.ndarray, build_s: float
) -> dict[str, Any]:
    r = {
        "size": n,
        "method": name,
        "build_s": round(build_s, 2),
        "recall10": round(recall(index.search(q, K)[1], truth), 4),
        "b1": latency(lambda z: index.search(z, K)[1], q, budget_s=5, max_n=50),
        "load": load(),
    }
    print(
        f"  {name:36s} recall@10 {r['recall10']:.4f}  p50 {r['b1']['p50_ms']:8.3f} ms "
        f"(build {r['build_s']}s)",
        flush=True,
    )
    return r


# -- GPU ---------------------------------------------------------------------------------------
def gpu(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tgfr_search.index.torch_index import TorchIndex, topk_chunked

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if args.devices:
        devices = devices[: args.devices]
    n, dim = args.gpu_size, 512
    t0 = time.perf_counter()
    data = FaceLike(seed=args.seed).generate(n, 2048, dtype=np.float16, device=devices[0])
    torch.cuda.synchronize()
    gen_s = time.perf_counter() - t0
    index = TorchIndex(dim, devices=devices, dtype=torch.float16)
    index.add(np.arange(n, dtype=np.int64), data.gallery)
    del data.gallery
    torch.cuda.empty_cache()
    for d in devices:
        torch.cuda.synchronize(d)
    print(f"{n:,} x {dim} fp16 on {devices}, generated in {gen_s:.1f}s", flush=True)
    probes = data.probes
    q_host = probes.float().cpu().numpy()
    scanned = n * dim * 2
    out: dict[str, Any] = {"size": n, "dim": dim, "dtype": "float16", "devices": devices}

    # Yardstick: the bare kernel on one device's shard, query already there, CUDA events.
    shard = index._shards[0]
    rows = shard.rows
    q1 = probes[:1].to(shard.device)
    for _ in range(10):
        topk_chunked(rows, q1, K)
    torch.cuda.synchronize(shard.device)
    times = []
    for i in range(args.gpu_reps):
        qi = probes[i % len(probes) : i % len(probes) + 1].to(shard.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        topk_chunked(rows, qi, K)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = float(np.median(times))
    out["kernel_b1"] = {
        "rows": int(shard.n),
        "p50_ms": round(ms, 3),
        "p99_ms": round(float(np.percentile(times, 99)), 3),
        "tb_per_s": round(shard.n * dim * 2 / (ms / 1e3) / 1e12, 3),
    }

    # The product path: TorchIndex.search from host numpy queries to host numpy ids.
    r = latency(lambda z: index.search(z, K), q_host, budget_s=30, max_n=args.gpu_reps)
    r["tb_per_s"] = round(scanned / (r["p50_ms"] / 1e3) / 1e12, 3)
    out["index_b1"] = r
    qb = q_host[:1024]
    index.search(qb, K)
    for d in devices:
        torch.cuda.synchronize(d)
    t0, reps = time.perf_counter(), 0
    while reps < 5 or time.perf_counter() - t0 < 3:
        index.search(qb, K)
        reps += 1
    out["index_b1024_qps"] = round(reps * len(qb) / (time.perf_counter() - t0), 1)

    # fp16 versus fp32 exact, on 64 probes (fp32 scores computed chunk by chunk).
    ids16 = index.search(q_host[:64], K)[1]
    best_s, best_i = [], []
    for shard in index._shards:
        qd = torch.from_numpy(q_host[:64]).to(shard.device)
        s, i = topk_chunked(shard.rows, qd, K, chunk_rows=1 << 20, upcast=True)
        best_s.append(s.cpu())
        best_i.append(torch.from_numpy(shard.ids)[i.cpu()])
    s, i = torch.cat(best_s, 1), torch.cat(best_i, 1)
    truth = torch.gather(i, 1, torch.topk(s, K, dim=1).indices).numpy()
    out["recall10_fp16_vs_fp32"] = round(recall(ids16, truth), 4)
    print(table([{**flatten(out)}], list(flatten(out))), flush=True)
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,30000,100000,1000000")
    ap.add_argument("--queries", type=int, default=300, help="probes for recall and batches")
    ap.add_argument("--latency-queries", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per latency/qps cell")
    ap.add_argument("--compare", action="store_true", help="IVF/HNSW/PQ sweeps too")
    ap.add_argument("--compare-max", type=int, default=100_000)
    ap.add_argument(
        "--threads", type=int, default=0, help="BLAS and OpenMP threads (0: library default)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu", action="store_true", help="torch exact search on CUDA instead")
    ap.add_argument("--gpu-size", type=int, default=10_000_000)
    ap.add_argument("--gpu-reps", type=int, default=200)
    ap.add_argument("--devices", type=int, default=0, help="GPUs to shard over (0: all)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "search_scale.json")
    args = ap.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/search_scale.py " + " ".join(given)
    if args.gpu:
        doc = {"command": command, "machine": machine(), "gpu": gpu(args)}
        write_json(args.out, doc)
        return
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(args.threads)
        except ImportError:
            print("threadpoolctl missing: numpy BLAS threads left as they are", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += cpu_size(n, args)
    doc = {
        "command": command,
        "machine": machine(),
        "threads": args.threads or "default",
        "k": K,
        "rows": rows,
    }
    write_json(args.out, doc)
    cols = ["size", "method", "p50_ms", "p99_ms", "batch_qps", "recall10", "build_s", "load"]
    flat = [
        {
            **{c: r.get(c, "") for c in cols},
            "p50_ms": r["b1"]["p50_ms"],
            "p99_ms": r["b1"]["p99_ms"],
        }
        for r in rows
    ]
    print("\n" + table(flat, cols))
    print(f"\nfaiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; wrote {args.out}")


if __name__ == "__main__":
    main()
