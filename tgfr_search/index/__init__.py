"""Vector index backends behind one small interface."""

from tgfr_search.index.base import VectorIndex
from tgfr_search.index.faiss_index import FaissFlatIndex

__all__ = ["FaissFlatIndex", "VectorIndex"]
