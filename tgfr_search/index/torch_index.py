"""Exact search as a torch matmul + top-k, one shard per device, for CUDA without faiss-gpu.

Vectors live on the devices (fp16 on CUDA: half the bytes to scan, and scores of unit vectors
in fp16 are within ~5e-4 of fp32), split evenly, one shard per device. A query batch is
multiplied against each shard in row chunks small enough to bound the score matrix, each
chunk keeps its top-k, and the shards' top-k are merged on the host. Kernels launch on every
device before any result is copied back, so shards run at the same time. On CPU it runs in
fp32 (that is how the tests check it against numpy).

Only numpy and torch are needed to search; faiss only to save and load. The file is a faiss
`IndexIDMap2` over an fp16 `IndexScalarQuantizer` on CUDA (the rows' own bytes: half of
float32, and nothing lost, as the store keeps float16 too) or over `IndexFlatIP` in float32, so
a gallery saved here opens in `FaissFlatIndex` and back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tgfr_search.errors import MissingDependency
from tgfr_search.index.base import as_queries, atomic_write, empty_result

SCORE_BYTES = 1 << 30  # bound on one chunk's score matrix (queries x rows)


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a base dependency
        raise MissingDependency("torch is not installed: pip install torch") from e
    return torch


def cuda_devices() -> list[str]:
    """Every CUDA device torch sees, as device names."""
    torch = _torch()
    return (
        [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )


def topk_chunked(
    x: Any, q: Any, k: int, *, chunk_rows: int | None = None, upcast: bool = False
) -> tuple[Any, Any]:
    """Top-k of q @ x.T over the rows of `x`, in row chunks; (scores, row indices) on x's device.

    `x` is (n, d), `q` is (b, d), both on the same device and dtype. Chunks are sized so a
    chunk's score matrix stays under SCORE_BYTES; with b = 1 that is one chunk up to ~500M rows.
    `upcast` computes in float32 (a reference for checking fp16 results).
    """
    torch = _torch()
    n, b = x.shape[0], q.shape[0]
    if chunk_rows is None:
        chunk_rows = max(1 << 16, SCORE_BYTES // (x.element_size() * max(b, 1)))
    if upcast:
        q = q.float()
    best_s: Any = None
    best_i: Any = None
    for start in range(0, n, chunk_rows):
        block = x[start : start + chunk_rows]
        if upcast:
            block = block.float()
        scores = q @ block.T if b > 1 else (block @ q[0]).unsqueeze(0)
        s, i = torch.topk(scores, min(k, block.shape[0]), dim=1)
        i = i + start
        if best_s is None:
            best_s, best_i = s, i
        else:
            s = torch.cat([best_s, s], dim=1)
            i = torch.cat([best_i, i], dim=1)
            best_s, j = torch.topk(s, min(k, s.shape[1]), dim=1)
            best_i = torch.gather(i, 1, j)
    return best_s, best_i


class _Shard:
    """The rows on one device: a tensor grown by doubling, and their ids on the host."""

    def __init__(self, device: str, dim: int, dtype: Any) -> None:
        torch = _torch()
        self.device, self.dtype = device, dtype
        self.data = torch.empty((0, dim), dtype=dtype, device=device)
        self.n = 0
        self._ids = np.zeros(0, np.int64)  # grown by doubling, like `data`
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def ids(self) -> np.ndarray:
        return self._ids[: self.n]

    def append(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        torch = _torch()
        need = self.n + len(ids)
        if need > self.data.shape[0]:
            grown = torch.empty(
                (max(need, 2 * self.data.shape[0]), self.data.shape[1]),
                dtype=self.dtype,
                device=self.device,
            )
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        if isinstance(vectors, torch.Tensor):
            rows = vectors
        else:  # torch refuses to wrap a read-only array (e.g. a view of a faiss index)
            rows = torch.from_numpy(vectors if vectors.flags.writeable else vectors.copy())
        self.data[self.n : need] = rows.to(self.device, self.dtype)
        if need > len(self._ids):
            self._ids = np.concatenate(
                [self.ids, np.zeros(max(need, 2 * len(self._ids)) - self.n, np.int64)]
            )
        self._ids[self.n : need] = ids
        self.n = need
        self._sorted = None

    def keep(self, mask: np.ndarray) -> None:
        torch = _torch()
        rows = torch.from_numpy(np.flatnonzero(mask)).to(self.device)
        self.data = self.data[: self.n].index_select(0, rows).contiguous()
        self._ids = self.ids[mask]
        self.n = len(self._ids)
        self._sorted = None

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of those `ids` this shard holds."""
        if self._sorted is None:
            order = np.argsort(self.ids, kind="stable")
            self._sorted = (self.ids[order], order)
        keys, order = self._sorted
        at = np.minimum(np.searchsorted(keys, ids), max(len(keys) - 1, 0))
        found = len(keys) > 0
        hit = keys[at] == ids if found else np.zeros(len(ids), bool)
        return np.sort(order[at[hit]])

    @property
    def rows(self) -> Any:
        return self.data[: self.n]


class TorchIndex:
    """Exact inner-product search with torch on one or more devices (one shard each)."""

    kind = "torch"

    def __init__(
        self,
        dim: int,
        *,
        devices: list[str] | None = None,
        dtype: Any = None,
        chunk_rows: int | None = None,
    ) -> None:
        torch = _torch()
        self.dim = dim
        self.devices = devices or cuda_devices() or ["cpu"]
        if dtype is None:
            dtype = torch.float16 if self.devices[0].startswith("cuda") else torch.float32
        self.dtype = dtype
        self.chunk_rows = chunk_rows
        self._shards = [_Shard(d, dim, dtype) for d in self.devices]

    @classmethod
    def load(cls, path: Path, **kw: Any) -> TorchIndex:
        """Read an exact index file (fp16, as `save` writes on CUDA, or float32)."""
        from tgfr_search.index.faiss_index import read_exact

        dim, ids, vecs = read_exact(path)
        index = cls(dim, **kw)
        step = 1 << 20
        for s in range(0, len(ids), step):
            index.add(ids[s : s + step], vecs[s : s + step])
        return index

    def __len__(self) -> int:
        return sum(s.n for s in self._shards)

    def add(self, ids: np.ndarray, vectors: Any) -> None:
        """Add rows (a numpy array, or a torch tensor on any device) under int64 ids."""
        torch = _torch()
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        x = vectors
        if not isinstance(x, torch.Tensor):  # float16 stays so: the shards convert on the device
            x = np.ascontiguousarray(x)
            if x.dtype != np.float16:
                x = x.astype(np.float32, copy=False)
        start = 0
        while start < len(ids):  # fill the smallest shard first, keeping shards even
            sizes = [s.n for s in self._shards]
            target = (sum(sizes) + len(ids) - start + len(sizes) - 1) // len(sizes)
            i = int(np.argmin(sizes))
            take = max(1, min(len(ids) - start, target - sizes[i]))
            self._shards[i].append(ids[start : start + take], x[start : start + take])
            start += take

    def remove(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        drop = np.ascontiguousarray(ids, dtype=np.int64)
        for shard in self._shards:
            mask = ~np.isin(shard.ids, drop)
            if not mask.all():
                shard.keep(mask)

    def ids(self) -> np.ndarray:
        return np.concatenate([s.ids for s in self._shards])

    def search(
        self, queries: np.ndarray, k: int, subset: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        torch = _torch()
        q = as_queries(queries)
        if len(self) == 0:
            return empty_result(len(q))
        k = max(1, min(int(k), len(self)))
        pending = []
        with torch.inference_mode():
            for shard in self._shards:
                if shard.n == 0:
                    continue
                rows, pos = shard.rows, None
                if subset is not None:
                    pos = shard.positions(np.ascontiguousarray(subset, dtype=np.int64))
                    if not len(pos):
                        continue
                    rows = rows.index_select(0, torch.from_numpy(pos).to(shard.device))
                tq = torch.from_numpy(q).to(shard.device, self.dtype)
                s, i = topk_chunked(rows, tq, k, chunk_rows=self.chunk_rows)
                pending.append((shard, pos, s, i))
            return self._merge(pending, len(q), k)

    @staticmethod
    def _merge(pending: list[Any], nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not pending:
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        scores, ids = [], []
        for shard, pos, s, i in pending:  # the first copy back waits; the others are done
            rows = i.cpu().numpy()
            if pos is not None:
                rows = pos[rows]
            scores.append(s.float().cpu().numpy())
            ids.append(shard.ids[rows])
        s_all, i_all = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
        if len(pending) > 1:
            order = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
            s_all = np.take_along_axis(s_all, order, 1)
            i_all = np.take_along_axis(i_all, order, 1)
        if s_all.shape[1] < k:
            pad = k - s_all.shape[1]
            s_all = np.pad(s_all, ((0, 0), (0, pad)), constant_values=-np.inf)
            i_all = np.pad(i_all, ((0, 0), (0, pad)), constant_values=-1)
        return s_all.astype(np.float32), i_all.astype(np.int64)

    def save(self, path: Path) -> None:
        """Write a faiss `IndexIDMap2` file, atomically: fp16 codes (`IndexScalarQuantizer`)
        when the rows are fp16, the bytes the devices hold; else `IndexFlatIP` (float32)."""
        from tgfr_search.index.faiss_index import _faiss, write_fp16

        torch = _torch()
        step = 1 << 18
        blocks = (
            (shard.ids[s : s + step], shard.data[s : min(s + step, shard.n)])
            for shard in self._shards
            for s in range(0, shard.n, step)
        )
        if self.dtype == torch.float16:
            write_fp16(path, self.dim, ((ids, rows.cpu().numpy()) for ids, rows in blocks))
            return
        faiss = _faiss()
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        for ids, rows in blocks:
            index.add_with_ids(rows.float().cpu().numpy(), ids)
        atomic_write(path, lambda tmp: faiss.write_index(index, tmp))
