"""The one small interface every vector index backend implements, and helpers they share."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class VectorIndex(Protocol):
    """Inner-product search over L2-normalised float32 vectors keyed by face id.

    Implementations: `FaissFlatIndex` (exact), `FaissIVFIndex` and `FaissHNSWIndex`
    (approximate, for large galleries), `TorchIndex` (exact, fp16 matmul on CUDA devices).
    `tgfr_search.index.make_index` / `build_index` / `load_index` pick one by gallery size and
    hardware; every saved file reads back with `load_index`.
    """

    dim: int
    kind: str

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under the given int64 ids."""

    def remove(self, ids: np.ndarray) -> None:
        """Drop the given ids (absent ids are ignored)."""

    def search(
        self, queries: np.ndarray, k: int, subset: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row, best first; only among `subset` ids when given.

        Rows with fewer than k hits are padded with id -1.
        """

    def ids(self) -> np.ndarray:
        """Every id the index holds."""

    def save(self, path: Path) -> None:
        """Write the index to `path` atomically."""


class VectorSource(Protocol):
    """What a vector space reads from the metadata store, the source of truth for vectors."""

    def generation(self) -> int:
        """The change counter: bumped by every committed batch, delete and reindex."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def vectors(
        self, space: str, *, dim: int, after: int = 0, up_to: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def iter_rows(
        self, space: str, *, dim: int, after: int = 0, up_to: int, batch: int = 2048
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str], list[dict[str, Any]]]]: ...


class VectorSpace(Protocol):
    """One vector space ("face", "fused", ...) as the engine searches it, wherever it lives.

    A space is a cache of the metadata store's vectors, caught up by the store's generation
    counter and rebuilt from the store after deletes or when it disagrees with it. The engine's
    own is a faiss file per space (`tgfr_search.engine._SpaceIndex`); `MilvusSpace` keeps one
    Milvus collection per space (`tgfr_search.index.milvus`).
    """

    space: str
    dim: int
    rebuilt_because: str | None
    """Why the space had to be rebuilt from the store (shown as a warning), or None."""

    def sync(self) -> Sized:
        """Catch up with the store; returns something whose len() is the number of vectors."""

    def search(
        self, queries: np.ndarray, k: int, subset: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row after a sync, only among `subset` when given."""

    def committed(self) -> None:
        """The writer committed a batch: make it searchable where other processes look."""

    def forget(self, ids: Sequence[int]) -> None:
        """The writer committed the deletion of these faces."""

    def save(self) -> None:
        """Catch up and persist, at the end of a write."""

    def close(self) -> None: ...


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def as_queries(queries: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)


def empty_result(nq: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
