"""FAISS backend: an exact inner-product index behind an id map, on the GPU when faiss has one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tgfr_search.errors import MissingDependency


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a base dependency
        raise MissingDependency(
            "faiss is not installed: pip install faiss-cpu (or faiss-gpu for your CUDA)"
        ) from e
    return faiss


def gpu_count() -> int:
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


class FaissFlatIndex:
    """`IndexIDMap2` over `IndexFlatIP`: exact search; the CPU copy is the master."""

    def __init__(self, dim: int, *, index: Any = None, use_gpu: bool | None = None) -> None:
        faiss = _faiss()
        self.dim = dim
        self._cpu = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._gpu: Any = None
        self._gpu_res: Any = None
        self._use_gpu = gpu_count() > 0 if use_gpu is None else use_gpu
        self._gpu_stale = True

    @classmethod
    def load(cls, path: Path, *, use_gpu: bool | None = None) -> FaissFlatIndex:
        faiss = _faiss()
        index = faiss.read_index(str(path))
        return cls(index.d, index=index, use_gpu=use_gpu)

    def __len__(self) -> int:
        return int(self._cpu.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self._cpu.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32),
                np.ascontiguousarray(ids, dtype=np.int64),
            )
            self._gpu_stale = True

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            faiss = _faiss()
            self._cpu.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))
            self._gpu_stale = True

    def ids(self) -> np.ndarray:
        faiss = _faiss()
        return faiss.vector_to_array(self._cpu.id_map).astype(np.int64)

    def _searcher(self) -> Any:
        if not self._use_gpu:
            return self._cpu
        if self._gpu_stale:
            faiss = _faiss()
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._cpu)
            self._gpu_stale = False
        return self._gpu

    def search(
        self, queries: np.ndarray, k: int, subset: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(k, len(self)))
        if len(self) == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if subset is None:
            scores, ids = self._searcher().search(q, k)
        else:
            # Pre-filter: faiss skips ids outside the selector while scanning, so the top-k
            # are the true top-k of the subset. GPU indexes take no selector; search the master.
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(subset, dtype=np.int64))
            scores, ids = self._cpu.search(q, k, params=faiss.SearchParameters(sel=sel))
        return scores, ids

    def save(self, path: Path) -> None:
        faiss = _faiss()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            faiss.write_index(self._cpu, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
