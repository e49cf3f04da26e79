"""The one small interface every vector index backend implements, and helpers they share."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

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
