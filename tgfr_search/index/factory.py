"""Pick, build, load and re-check an index by gallery size and hardware.

The rules, measured with `benchmarks/search_scale.py` on face-like vectors (search_scale.md):

* faiss sees GPUs: exact `FaissFlatIndex` with a GPU copy (sharded over every card).
* torch sees CUDA but faiss does not: exact `TorchIndex` (fp16, one shard per device); an
  H100 scans 10M x 512 in 3.9 ms per query and answers 10.9k queries/s at batch 1024.
* CPU: exact `FaissFlatIndex` up to FLAT_MAX vectors, where one query costs ~3 ms on one
  core; past it `FaissPQIndex` (PQ fast-scan shortlist + exact re-rank), which kept recall@10
  at 0.9997-1.0 and answered 15x (100k) and 14x (1M: 15.8 vs 221 ms) faster than flat.
  IVF-Flat and HNSW needed most of the gallery visited for recall@10 >= 0.99 on these
  vectors: kinds one can ask for, never the automatic choice.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tgfr_search.index.base import VectorIndex
from tgfr_search.index.faiss_index import (
    FaissFlatIndex,
    FaissHNSWIndex,
    FaissIVFIndex,
    FaissPQIndex,
    _faiss,
    default_nlist,
    gpu_count,
    is_exact,
)

KINDS = ("auto", "flat", "pq", "hnsw", "ivf", "torch")
FLAT_MAX = 20_000  # CPU: past this, an exact query costs more than ~3 ms on one core
ANN_KIND = "pq"
REBUILD_GROWTH = 4  # IVF: rebuild when the right nlist for the size is 4x the trained one
REBUILD_TOMBSTONES = 0.2  # PQ, HNSW: rebuild when this fraction of the points are removed


@functools.lru_cache(maxsize=1)
def _torch_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    if sys.platform.startswith("linux") and not any(
        Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl", "/proc/driver/nvidia")
    ):
        return False  # no NVIDIA driver: skip importing torch (a second or more on CPU boxes)
    import torch

    return bool(torch.cuda.is_available())


def hardware(use_gpu: bool | None = None) -> str:
    """'faiss-gpu', 'torch-cuda' or 'cpu': where search runs for this `use_gpu` setting."""
    if use_gpu is False:
        return "cpu"
    if gpu_count() > 0:
        return "faiss-gpu"
    if _torch_cuda():
        return "torch-cuda"
    if use_gpu:
        from tgfr_search.errors import MissingDependency

        raise MissingDependency("use_gpu=True but neither faiss nor torch sees a GPU")
    return "cpu"


def choose_kind(expected_size: int, *, use_gpu: bool | None = None) -> str:
    """The index kind `make_index(kind="auto")` picks for a gallery of `expected_size`."""
    where = hardware(use_gpu)
    if where == "torch-cuda":
        return "torch"
    if where == "faiss-gpu":
        return "flat"
    return "flat" if expected_size <= FLAT_MAX else ANN_KIND


def make_index(
    dim: int,
    expected_size: int = 0,
    *,
    kind: str = "auto",
    use_gpu: bool | None = None,
    **params: Any,
) -> VectorIndex:
    """An empty index for about `expected_size` vectors of `dim` dimensions.

    `params` go to the chosen class (nlist/nprobe for ivf, m/ef_construction/ef_search for
    hnsw, devices/dtype for torch). An IVF index trains on its first `add`; prefer
    `build_index`, which trains on the whole gallery.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "auto":
        kind = choose_kind(expected_size, use_gpu=use_gpu)
        if kind == "pq" and dim % 4:
            kind = "flat"  # 4-bit PQ fast-scan wants an even number of 2-dim sub-spaces
    if kind == "flat":
        return FaissFlatIndex(dim, use_gpu=use_gpu, **params)
    if kind == "ivf":
        params.setdefault("nlist", default_nlist(expected_size))
        return FaissIVFIndex(dim, use_gpu=use_gpu, **params)
    if kind == "hnsw":
        return FaissHNSWIndex(dim, **params)
    if kind == "pq":
        return FaissPQIndex(dim, **params)
    from tgfr_search.index.torch_index import TorchIndex

    return TorchIndex(dim, **params)


def build_index(
    dim: int,
    ids: np.ndarray,
    vectors: np.ndarray,
    *,
    kind: str = "auto",
    use_gpu: bool | None = None,
    **params: Any,
) -> VectorIndex:
    """A new index holding (ids, vectors), sized and (for IVF) trained on all of them."""
    index = make_index(dim, len(ids), kind=kind, use_gpu=use_gpu, **params)
    if isinstance(index, (FaissIVFIndex, FaissPQIndex)) and len(ids):
        index.train(vectors)
    step = 1 << 18
    for s in range(0, len(ids), step):
        index.add(ids[s : s + step], vectors[s : s + step])
    return index


def load_index(path: Path, *, use_gpu: bool | None = None, **params: Any) -> VectorIndex:
    """Read any index this package saved, as the class its contents need.

    A saved flat index opens as a `TorchIndex` where torch has CUDA and faiss has no GPU, so a
    gallery saved on one machine searches at full speed on another.
    """
    faiss = _faiss()
    index = faiss.read_index(str(path))
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else None
    if isinstance(inner, faiss.IndexHNSW):
        return FaissHNSWIndex(index.d, index=index, use_gpu=use_gpu, **params)
    if isinstance(inner, faiss.IndexRefine):
        return FaissPQIndex(index.d, index=index, use_gpu=use_gpu, **params)
    if is_exact(index):  # float32 flat, or the fp16 file a TorchIndex on CUDA writes
        if hardware(use_gpu) == "torch-cuda":
            from tgfr_search.index.torch_index import TorchIndex

            return TorchIndex.load(path, **params)
        if isinstance(inner, faiss.IndexFlat):
            return FaissFlatIndex(index.d, index=index, use_gpu=use_gpu, **params)
        return FaissFlatIndex.load(path, use_gpu=use_gpu)
    if isinstance(index, faiss.IndexIVF):
        return FaissIVFIndex(index.d, index=index, use_gpu=use_gpu, **params)
    raise ValueError(f"{path}: unsupported faiss index type {type(index).__name__}")


def needs_rebuild(index: VectorIndex, *, use_gpu: bool | None = None) -> str | None:
    """Why the index should be rebuilt from all vectors now (None: it is fine as it is).

    Reasons: the gallery grew past the exact-search threshold; an approximate index where
    exact search now fits (a GPU, or a gallery shrunk to half the threshold); an IVF index
    that outgrew its lists; a PQ or HNSW index of which over 20% are tombstones.
    """
    n = len(index)
    want = choose_kind(n, use_gpu=use_gpu)
    approximate = index.kind in ("pq", "hnsw", "ivf")
    if index.kind == "flat" and want == ANN_KIND:
        return f"{n} vectors: past the exact-search threshold ({FLAT_MAX}), switch to {want}"
    if approximate and want == "torch":
        return f"{n} vectors: exact search on the GPU (torch)"
    if approximate and want == "flat" and (hardware(use_gpu) != "cpu" or n < FLAT_MAX // 2):
        return f"{n} vectors: exact search fits"
    if isinstance(index, FaissIVFIndex) and default_nlist(n) >= REBUILD_GROWTH * index.nlist:
        return f"{n} vectors in {index.nlist} IVF lists: retrain with more lists"
    if isinstance(index, (FaissHNSWIndex, FaissPQIndex)):
        total = n + index.tombstones
        if total and index.tombstones > REBUILD_TOMBSTONES * total:
            return f"{index.tombstones} of {total} vectors are tombstones: rebuild"
    return None
