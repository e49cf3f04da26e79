"""Vector index backends behind one small interface, and the factory that picks one by size."""

from tgfr_search.index.base import VectorIndex, VectorSource, VectorSpace
from tgfr_search.index.factory import (
    build_index,
    choose_kind,
    hardware,
    load_index,
    make_index,
    needs_rebuild,
)
from tgfr_search.index.faiss_index import (
    FaissFlatIndex,
    FaissHNSWIndex,
    FaissIVFIndex,
    FaissPQIndex,
)
from tgfr_search.index.milvus import open_vectors, parse_vectors_uri

__all__ = [
    "FaissFlatIndex",
    "FaissHNSWIndex",
    "FaissIVFIndex",
    "FaissPQIndex",
    "TorchIndex",
    "VectorIndex",
    "VectorSource",
    "VectorSpace",
    "build_index",
    "choose_kind",
    "hardware",
    "load_index",
    "make_index",
    "needs_rebuild",
    "open_vectors",
    "parse_vectors_uri",
]


def __getattr__(name: str) -> object:
    if name == "TorchIndex":  # lazy: torch is a heavy import
        from tgfr_search.index.torch_index import TorchIndex

        return TorchIndex
    raise AttributeError(name)
