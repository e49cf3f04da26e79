"""FAISS backends: exact flat, PQ fast-scan + re-rank, IVF-Flat and HNSW; CPU copy as master.

Every index here is a CPU faiss index (the master: it takes adds and removes, answers filtered
searches and is what `save` writes). Where faiss sees GPUs, flat and IVF indexes also keep a
GPU copy for unfiltered search: `index_cpu_to_gpu` on one card (adds are applied to both),
or the sharded cloner (`GpuMultipleClonerOptions(shard=True)`) across all of them (remade on
the first search after a change). PQ fast-scan and HNSW have no faiss GPU form; the factory
picks neither where faiss has GPUs. The GPU code follows faiss's documented API; no machine
here had faiss-gpu to run it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tgfr_search.errors import MissingDependency
from tgfr_search.index.base import as_queries, atomic_write, empty_result

# faiss GPU indexes select at most 2048 results (and probe at most 2048 lists) per query.
GPU_MAX_K = 2048


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a base dependency
        raise MissingDependency(
            "faiss is not installed: pip install faiss-cpu (or faiss-gpu for your CUDA)"
        ) from e
    return faiss


def gpu_count() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu)."""
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run faiss on one OpenMP thread for a while (process-wide setting).

    PQ training runs 256 tiny k-means (16 centroids in 2 dims); OpenMP's per-call fork/join
    costs more than the work, and on a busy 2-core box spinning threads made it 17x slower.
    """
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _ids64(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)


class _GpuCopy:
    """A GPU copy of a CPU index: on one card, or sharded across `ngpu` cards."""

    def __init__(self, ngpu: int, *, float16: bool = False) -> None:
        self.ngpu, self.float16 = ngpu, float16
        self._res: list[Any] = []  # kept alive as long as the GPU indexes that use them
        self.index: Any = None

    def clone(self, cpu_index: Any, nprobe: int | None = None) -> Any:
        faiss = _faiss()
        if not self._res:
            self._res = [faiss.StandardGpuResources() for _ in range(self.ngpu)]
        self.index = None  # free the old copy's memory first
        if self.ngpu == 1:
            co = faiss.GpuClonerOptions()
            co.useFloat16 = self.float16
            self.index = faiss.index_cpu_to_gpu(self._res[0], 0, cpu_index, co)
        else:
            co = faiss.GpuMultipleClonerOptions()
            co.shard = True
            co.useFloat16 = self.float16
            self.index = faiss.index_cpu_to_gpu_multiple_py(
                self._res, cpu_index, co, list(range(self.ngpu))
            )
        if nprobe is not None:
            faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)
        return self.index


class _FaissIndex:
    """What the faiss backends share: the master, its GPU copy, save and load."""

    kind = ""

    def __init__(self, dim: int, index: Any, use_gpu: bool | None, gpu_float16: bool) -> None:
        self.dim = dim
        self._cpu = index
        ngpu = gpu_count() if use_gpu is None or use_gpu else 0
        if use_gpu and ngpu == 0:
            raise MissingDependency(
                "use_gpu=True but the installed faiss sees no GPU: install faiss-gpu"
            )
        self._gpu = _GpuCopy(ngpu, float16=gpu_float16) if ngpu else None
        self._gpu_stale = True

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    def __len__(self) -> int:
        return int(self._cpu.ntotal)

    def _gpu_searcher(self, k: int) -> Any:
        """The GPU copy, remade if stale; None where unfiltered search stays on the CPU."""
        if self._gpu is None or k > GPU_MAX_K:
            return None
        if self._gpu_stale:
            self._gpu.clone(self._cpu, self._gpu_nprobe())
            self._gpu_stale = False
        return self._gpu.index

    def _gpu_nprobe(self) -> int | None:
        return None

    def _gpu_add(self, ids: np.ndarray, x: np.ndarray) -> None:
        """Apply an add to a fresh single-card copy too; otherwise mark the copy stale."""
        if self._gpu is not None and not self._gpu_stale and self._gpu.ngpu == 1:
            self._gpu.index.add_with_ids(x, ids)
        else:
            self._gpu_stale = True

    def save(self, path: Path) -> None:
        faiss = _faiss()
        atomic_write(path, lambda tmp: faiss.write_index(self._cpu, tmp))

    def _k(self, k: int) -> int:
        return max(1, min(int(k), len(self)))


class FaissFlatIndex(_FaissIndex):
    """`IndexIDMap2` over `IndexFlatIP`: exact search."""

    kind = "flat"

    def __init__(
        self,
        dim: int,
        *,
        index: Any = None,
        use_gpu: bool | None = None,
        gpu_float16: bool = False,
    ) -> None:
        faiss = _faiss()
        if index is None:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        super().__init__(dim, index, use_gpu, gpu_float16)

    @classmethod
    def load(cls, path: Path, *, use_gpu: bool | None = None) -> FaissFlatIndex:
        """Read an exact index file: float32 as it is, fp16 (`write_fp16`) into float32."""
        faiss = _faiss()
        index = faiss.read_index(str(path))
        if hasattr(index, "id_map") and isinstance(
            faiss.downcast_index(index.index), faiss.IndexFlat
        ):
            return cls(index.d, index=index, use_gpu=use_gpu)
        dim, ids, vectors = read_exact(path, index)
        flat = cls(dim, use_gpu=use_gpu)
        flat.add(ids, vectors)
        return flat

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            x, ids = np.ascontiguousarray(vectors, dtype=np.float32), _ids64(ids)
            self._cpu.add_with_ids(x, ids)
            self._gpu_add(ids, x)

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            self._cpu.remove_ids(_faiss().IDSelectorBatch(_ids64(ids)))
            self._gpu_stale = True

    def ids(self) -> np.ndarray:
        return _faiss().vector_to_array(self._cpu.id_map).astype(np.int64)

    def vectors(self) -> np.ndarray:
        """A read-only view of the stored vectors, in the order of `ids()`."""
        flat = _faiss().downcast_index(self._cpu.index)
        return _flat_view(flat)

    def search(
        self, queries: np.ndarray, k: int, subset: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        q = as_queries(queries)
        if len(self) == 0:
            return empty_result(len(q))
        k = self._k(k)
        if subset is None:
            gpu = self._gpu_searcher(k)
            scores, ids = (self._cpu if gpu is None else gpu).search(q, k)
        else:
            # Pre-filter: faiss skips ids outside the selector while scanning, so the top-k
            # are the true top-k of the subset. GPU indexes take no selector; search the master.
            sel = faiss.IDSelectorBatch(_ids64(subset))
            scores, ids = self._cpu.search(q, k, params=faiss.SearchParameters(sel=sel))
        return scores, ids


def is_exact(index: Any) -> bool:
    """Whether a faiss index read from a file is one `read_exact` takes."""
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else None
    if inner is None or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
        return False
    return isinstance(inner, faiss.IndexFlat) or (
        isinstance(inner, faiss.IndexScalarQuantizer)
        and inner.sq.qtype == faiss.ScalarQuantizer.QT_fp16
    )


def read_exact(path: Path, index: Any = None) -> tuple[int, np.ndarray, np.ndarray]:
    """(dim, ids, vectors) of a saved exact index (`index`: the file, already read).

    Exact indexes are saved as `IndexIDMap2` over `IndexFlatIP` (float32 vectors) or over an
    fp16 `IndexScalarQuantizer` (what `TorchIndex` holds on CUDA: half the bytes, and the same
    values, as the store keeps float16 too); the vectors come back as float32 or float16.
    """
    faiss = _faiss()
    if index is None:
        index = faiss.read_index(str(path))
    if not is_exact(index):
        raise ValueError(f"{path}: not an exact (flat) index file")
    inner = faiss.downcast_index(index.index)
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    dtype = np.float32 if isinstance(inner, faiss.IndexFlat) else np.float16
    codes = faiss.vector_to_array(inner.codes)  # a copy: `index` is freed on return
    return int(inner.d), ids, codes.view(dtype).reshape(-1, int(inner.d))


def write_fp16(path: Path, dim: int, blocks: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
    """Save (ids, float16 vectors) blocks as an exact fp16 index file, atomically."""
    faiss = _faiss()
    sq = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexIDMap2(sq)
    for ids, vectors in blocks:
        codes = np.ascontiguousarray(vectors, dtype=np.float16).view(np.uint8)
        index.add_sa_codes(codes, _ids64(ids))  # the fp16 codes are the vectors' own bytes
    atomic_write(path, lambda tmp: faiss.write_index(index, tmp))


def _flat_view(flat: Any) -> np.ndarray:
    faiss = _faiss()
    n, d = int(flat.ntotal), int(flat.d)
    if n == 0:
        return np.zeros((0, d), np.float32)
    view = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
    view.flags.writeable = False
    return view


def default_nlist(n: int) -> int:
    """Inverted lists for `n` vectors: about 4 sqrt(n), a power of two, 64..65536."""
    return int(min(65536, max(64, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))


class FaissIVFIndex(_FaissIndex):
    """`IndexIVFFlat` (inner product, spherical k-means): approximate, trained on the data.

    The index trains on its first `add` (or `train`), with `nlist` lowered to what that batch
    can support (39 points per list); `tgfr_search.index.build_index` trains on the whole
    gallery. Filtered search: subsets up to `exact_fraction` of the index are scanned exactly
    (every list probed, non-members skipped by the selector); larger ones raise nprobe by
    len / |subset| so about as many members are visited as in an unfiltered search.
    """

    kind = "ivf"

    def __init__(
        self,
        dim: int,
        *,
        nlist: int | None = None,
        nprobe: int | None = None,
        exact_fraction: float = 0.1,
        index: Any = None,
        use_gpu: bool | None = None,
        gpu_float16: bool = False,
        train_size: int = 64,
        seed: int = 1234,
    ) -> None:
        loaded = index is not None
        if index is None:
            index = self._new(dim, nlist or 1024)
        super().__init__(dim, index, use_gpu, gpu_float16)
        self.exact_fraction = exact_fraction
        self.train_size, self.seed = train_size, seed
        # nprobe is saved in the faiss file: a loaded index keeps its tuned value.
        self.set_nprobe(nprobe or (int(index.nprobe) if loaded else default_nprobe(self.nlist)))

    @staticmethod
    def _new(dim: int, nlist: int) -> Any:
        faiss = _faiss()
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        quantizer.this.disown()  # the IVF index owns and frees its quantizer
        index.own_fields = True
        index.cp.spherical = True  # centroids stay unit vectors: right for cosine data
        return index

    @classmethod
    def load(cls, path: Path, *, use_gpu: bool | None = None, **kw: Any) -> FaissIVFIndex:
        index = _faiss().read_index(str(path))
        if not isinstance(index, _faiss().IndexIVF):
            raise ValueError(f"{path} holds a {type(index).__name__}, not an IVF index")
        return cls(index.d, index=index, use_gpu=use_gpu, **kw)

    @property
    def nlist(self) -> int:
        return int(self._cpu.nlist)

    @property
    def is_trained(self) -> bool:
        return bool(self._cpu.is_trained)

    def _gpu_nprobe(self) -> int | None:
        return min(self.nprobe, GPU_MAX_K)

    def set_nprobe(self, nprobe: int) -> None:
        self.nprobe = max(1, min(int(nprobe), self.nlist))
        self._cpu.nprobe = self.nprobe
        self._params = _faiss().SearchParametersIVF(nprobe=self.nprobe)
        self._gpu_stale = True

    def train(self, vectors: np.ndarray) -> None:
        """Train the coarse quantizer on (a sample of) `vectors`; lowers nlist for few vectors."""
        if self._cpu.ntotal:
            raise ValueError("train an empty index (build_index makes and trains a new one)")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        nlist = min(self.nlist, max(1, len(x) // 39))
        if nlist != self.nlist:
            self._cpu = self._new(self.dim, nlist)
            self.set_nprobe(self.nprobe)
        self._cpu.cp.seed = self.seed
        cap = self.train_size * nlist
        if len(x) > cap:
            rng = np.random.default_rng(self.seed)
            x = x[np.sort(rng.choice(len(x), cap, replace=False))]
        self._cpu.train(x)
        self._gpu_stale = True

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(ids):
            return
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self.is_trained:
            self.train(x)
        self._cpu.add_with_ids(x, _ids64(ids))
        self._gpu_add(_ids64(ids), x)

    def remove(self, ids: np.ndarray) -> None:
        if len(ids) and self.is_trained:
            self._cpu.remove_ids(_faiss().IDSelectorBatch(_ids64(ids)))
            self._gpu_stale = True

    def ids(self) -> np.ndarray:
        faiss = _faiss()
        lists = self._cpu.invlists
        out = [np.zeros(0, np.int64)]
        for i in range(self.nlist):
            size = lists.list_size(i)
            if size:
                out.append(faiss.rev_swig_ptr(lists.get_ids(i), size).astype(np.int64))
        return np.concatenate(out)

    def search(
        self, queries: np.ndarray, k: int, subset: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        q = as_queries(queries)
        if len(self) == 0:
            return empty_result(len(q))
        k = self._k(k)
        if subset is None:
            gpu = self._gpu_searcher(k)
            if gpu is not None:
                return gpu.search(q, k)
            return self._cpu.search(q, k, params=self._params)
        subset = _ids64(subset)
        if len(subset) <= self.exact_fraction * len(self):
            nprobe = self.nlist
        else:
            nprobe = min(self.nlist, math.ceil(self.nprobe * len(self) / max(len(subset), 1)))
        sel = faiss.IDSelectorBatch(subset)
        params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        return self._cpu.search(q, k, params=params)


def default_nprobe(nlist: int) -> int:
    """Lists probed by default: half of them.

    On face-like vectors a probe's top-10 mixes its own identity with the best impostors,
    which lie in any list: nprobe = nlist/2 gave recall@10 0.97 (search_scale.md). That is
    why the factory never picks IVF on its own.
    """
    return max(1, nlist // 2)


class _Tombstoned(_FaissIndex):
    """An `IndexIDMap` whose inner index cannot remove: removed ids become -1 (tombstones).

    The vector stays in place (a graph keeps it as a waypoint) and searches skip -1; the id map,
    -1s included, is saved with the index. `needs_rebuild` asks for a rebuild once tombstones
    pass a fraction. Filtered search by small subsets scans the subset exactly over the stored
    vectors, selected by a bitmap of their positions.
    """

    def __init__(self, dim: int, index: Any, exact_fraction: float) -> None:
        super().__init__(dim, index, False, False)  # no faiss GPU form: search the CPU master
        self.exact_fraction = exact_fraction
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None
        self._tomb = int(np.count_nonzero(self._id_view() == -1))

    def _flat(self) -> Any:
        """The faiss IndexFlat holding every stored vector, by position."""
        raise NotImplementedError

    def _id_view(self) -> np.ndarray:
        n = int(self._cpu.ntotal)
        if n == 0:
            return np.zeros(0, np.int64)
        return _faiss().rev_swig_ptr(self._cpu.id_map.data(), n)

    @property
    def tombstones(self) -> int:
        return self._tomb

    def __len__(self) -> int:
        return int(self._cpu.ntotal) - self._tomb

    def _add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = _ids64(ids)
        if (ids < 0).any():
            raise ValueError("ids must be non-negative (-1 marks a removed vector)")
        self._cpu.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        self._sorted = None

    def remove(self, ids: np.ndarray) -> None:
        if not len(ids) or not self._cpu.ntotal:
            return
        view = self._id_view()
        hit = np.isin(view, _ids64(ids)) & (view != -1)
        view[hit] = -1
        self._tomb += int(hit.sum())
        self._sorted = None

    def ids(self) -> np.ndarray:
        view = self._id_view()
        return view[view != -1].copy()

    def vectors(self) -> np.ndarray:
        """A read-only view of every stored vector by position (tombstones included)."""
        return _flat_view(self._flat())

    def _members(self, ids: np.ndarray) -> np.ndarray:
        """A mask over positions: True where a live vector has one of these ids.

        Database ids are mostly dense (SQLite rowids), so a table from id to position (8
        bytes per id up to the largest) answers in one gather; sparse ids use a sorted copy.
        """
        mask = np.zeros(int(self._cpu.ntotal), bool)
        ids = _ids64(ids)
        ids = ids[ids >= 0]
        if self._sorted is None:
            view = self._id_view()
            top = int(view.max(initial=-1))
            if top < 4 * len(view) + (1 << 20):
                table = np.full(top + 1, -1, np.int64)
                live = np.flatnonzero(view >= 0)
                table[view[live]] = live
                self._sorted = (table, np.zeros(0, np.int64))
            else:
                order = np.argsort(view, kind="stable")
                self._sorted = (view[order], order)
        keys, order = self._sorted
        if not len(keys) or not len(ids):
            return mask
        if not len(order):  # the dense table
            pos = keys[ids[ids < len(keys)]]
            mask[pos[pos >= 0]] = True
        else:
            at = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
            mask[order[at[keys[at] == ids]]] = True
        return mask

    def _exact(self, q: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among the vectors where `mask` is True: a bitmap-filtered flat scan."""
        faiss = _faiss()
        bitmap = np.packbits(mask, bitorder="little")
        sel = faiss.IDSelectorBitmap(bitmap)
        scores, pos = self._flat().search(q, k, params=faiss.SearchParameters(sel=sel))
        return scores, self._to_ids(pos)

    def _to_ids(self, pos: np.ndarray) -> np.ndarray:
        view = self._id_view()
        return np.where(pos >= 0, view[np.maximum(pos, 0)], -1)


class FaissHNSWIndex(_Tombstoned):
    """`IndexIDMap` over `IndexHNSWFlat` (inner product): approximate, no training.

    HNSW cannot remove points: removed ids are tombstones (see `_Tombstoned`). Filtered search:
    subsets up to `exact_fraction` of the index are scanned exactly; larger ones search the
    graph with the selector and efSearch raised by len / |subset|.
    """

    kind = "hnsw"

    def __init__(
        self,
        dim: int,
        *,
        m: int = 32,
        ef_construction: int = 80,
        ef_search: int | None = None,
        exact_fraction: float = 0.1,
        index: Any = None,
        use_gpu: bool | None = None,
    ) -> None:
        faiss = _faiss()
        if use_gpu:
            raise MissingDependency("faiss has no GPU form of HNSW: use kind='flat' on GPUs")
        loaded = index is not None
        if index is None:
            inner = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = ef_construction
            index = faiss.IndexIDMap(inner)
            inner.this.disown()
            index.own_fields = True
        super().__init__(dim, index, exact_fraction)
        # efSearch is saved in the faiss file: a loaded index keeps its tuned value.
        hnsw = faiss.downcast_index(self._cpu.index).hnsw
        self.ef_search = ef_search or (int(hnsw.efSearch) if loaded else 128)

    @property
    def ef_search(self) -> int:
        return int(_faiss().downcast_index(self._cpu.index).hnsw.efSearch)

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        _faiss().downcast_index(self._cpu.index).hnsw.efSearch = int(value)

    @classmethod
    def load(cls, path: Path, *, use_gpu: bool | None = None, **kw: Any) -> FaissHNSWIndex:
        index = _faiss().read_index(str(path))
        return cls(index.d, index=index, use_gpu=use_gpu, **kw)

    def _flat(self) -> Any:
        faiss = _faiss()
        return faiss.downcast_index(faiss.downcast_index(self._cpu.index).storage)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self._add(ids, vectors)

    def search(
        self, queries: np.ndarray, k: int, subset: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        q = as_queries(queries)
        if len(self) == 0:
            return empty_result(len(q))
        k = self._k(k)
        if subset is not None:
            mask = self._members(subset)
            count = int(mask.sum())
            if count <= self.exact_fraction * len(self):
                return self._exact(q, k, mask)
            sel = faiss.IDSelectorBatch(_ids64(subset))
            ef = math.ceil(self.ef_search * len(self) / count)
        else:
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.array([-1], np.int64)))
            sel = sel if self._tomb else None
            ef = self.ef_search
        params = faiss.SearchParametersHNSW(efSearch=max(ef, k), sel=sel)
        return self._cpu.search(q, k, params=params)


class FaissPQIndex(_Tombstoned):
    """A 4-bit PQ fast-scan shortlist re-ranked exactly: `IndexIDMap(IndexRefineFlat(PQfs))`.

    Every query scans all the PQ codes (`m` 4-bit codes per vector, dim / 2 by default: 128
    bytes for 512-d, 1/16 of the float32 vectors) with SIMD lookup tables, keeps the best
    `k_factor * k` candidates, and re-ranks them exactly against the stored float32 vectors.
    On face-like vectors this keeps recall@10 >= 0.99 where IVF and HNSW need most of the
    gallery visited (benchmarks/search_scale.md). It trains (product quantizer only: 16
    centroids per 2-dim sub-space) on its first add.

    Removed ids are tombstones (see `_Tombstoned`). Filtered search: subsets up to
    `exact_fraction` of the index are scanned exactly; larger ones widen the shortlist by
    len / |subset| and keep only members before the re-rank, so about `k_factor * k` members
    are re-ranked as in an unfiltered search; a row left with fewer than k members is
    answered by the exact scan.
    """

    kind = "pq"

    def __init__(
        self,
        dim: int,
        *,
        m: int | None = None,
        k_factor: int = 30,
        min_candidates: int = 256,
        exact_fraction: float = 0.1,
        index: Any = None,
        use_gpu: bool | None = None,
        seed: int = 1234,
    ) -> None:
        faiss = _faiss()
        if use_gpu:
            raise MissingDependency("faiss has no GPU form of PQ fast-scan: use kind='flat'")
        if index is None:
            m = m or dim // 2
            if dim % m or m % 2:
                raise ValueError(f"m={m} must be even and divide dim={dim}")
            base = faiss.IndexPQFastScan(dim, m, 4, faiss.METRIC_INNER_PRODUCT)
            refine = faiss.IndexRefineFlat(base)
            base.this.disown()
            refine.own_fields = True
            index = faiss.IndexIDMap(refine)
            refine.this.disown()
            index.own_fields = True
        super().__init__(dim, index, exact_fraction)
        self.k_factor, self.min_candidates, self.seed = k_factor, min_candidates, seed

    @classmethod
    def load(cls, path: Path, *, use_gpu: bool | None = None, **kw: Any) -> FaissPQIndex:
        index = _faiss().read_index(str(path))
        return cls(index.d, index=index, use_gpu=use_gpu, **kw)

    def _refine(self) -> Any:
        return _faiss().downcast_index(self._cpu.index)

    @property
    def m(self) -> int:
        """Sub-quantizers: bytes per vector are m / 2."""
        return int(_faiss().downcast_index(self._refine().base_index).M)

    def _flat(self) -> Any:
        return _faiss().downcast_index(self._refine().refine_index)

    @property
    def is_trained(self) -> bool:
        return bool(self._cpu.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        """Train the product quantizer on (a sample of) `vectors`.

        Fewer than 1024 vectors are topped up with random unit vectors: the codes only pick
        the shortlist, the re-rank stays exact, and the factory uses exact search that small.
        """
        if self._cpu.ntotal:
            raise ValueError("train an empty index (build_index makes and trains a new one)")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        rng = np.random.default_rng(self.seed)
        if len(x) > 65536:
            x = x[np.sort(rng.choice(len(x), 65536, replace=False))]
        if len(x) < 1024:
            pad = rng.standard_normal((1024 - len(x), self.dim)).astype(np.float32)
            x = np.concatenate([x, pad / np.linalg.norm(pad, axis=1, keepdims=True)])
        with _one_thread():
            self._cpu.train(x)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(ids):
            return
        if not self.is_trained:
            self.train(vectors)
        self._add(ids, vectors)

    def search(
        self, queries: np.ndarray, k: int, subset: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        q = as_queries(queries)
        if len(self) == 0:
            return empty_result(len(q))
        k = self._k(k)
        total = int(self._cpu.ntotal)
        want = max(self.k_factor * k, self.min_candidates)
        if subset is None:
            live = len(self)
            member = self._id_view() != -1 if self._tomb else None
        else:
            member = self._members(subset)
            live = int(member.sum())
            if live <= self.exact_fraction * len(self):
                return self._exact(q, k, member)
        shortlist = math.ceil(want * total / max(live, 1))
        if 2 * shortlist >= total:  # a shortlist that long costs more than scanning exactly
            if member is None:
                scores, pos = self._flat().search(q, k)
                return scores, self._to_ids(pos)
            return self._exact(q, k, member)
        if member is None:
            params = faiss.IndexRefineSearchParameters(k_factor=want / k)
            scores, pos = self._refine().search(q, k, params=params)
            return scores, self._to_ids(pos)
        _, cand = faiss.downcast_index(self._refine().base_index).search(q, shortlist)
        return self._rerank(q, k, cand, member)

    def _rerank(
        self, q: np.ndarray, k: int, cand: np.ndarray, member: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the member candidates, top-k per row; short rows go exact."""
        xb = self.vectors()
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_p = np.full((len(q), k), -1, np.int64)
        step = max(1, (64 << 20) // max(1, cand.shape[1] * self.dim * 4))
        for r0 in range(0, len(q), step):
            c = cand[r0 : r0 + step]
            ok = (c >= 0) & member[np.maximum(c, 0)]
            s = np.einsum("rcd,rd->rc", xb[np.maximum(c, 0)], q[r0 : r0 + step])
            s[~ok] = -np.inf
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            out_s[r0 : r0 + step] = np.take_along_axis(s, top, 1)
            out_p[r0 : r0 + step] = np.where(
                np.isfinite(out_s[r0 : r0 + step]), np.take_along_axis(c, top, 1), -1
            )
        short = np.flatnonzero(out_p[:, -1] < 0)
        if len(short):  # too few members in the shortlist: answer those rows exactly
            s, p = self._exact(q[short], k, member)
            return_ids = self._to_ids(out_p)
            out_s[short] = s
            return_ids[short] = p
            return out_s, return_ids
        return out_s, self._to_ids(out_p)
