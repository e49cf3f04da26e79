"""The one small interface every vector index backend implements."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class VectorIndex(Protocol):
    """Inner-product search over L2-normalised float32 vectors keyed by face id."""

    dim: int

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
