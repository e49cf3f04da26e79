"""tgfr-search: embedded text-guided face search.

The public names are loaded on first use, so `tgfr-search --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tgfr_search.errors import (
    BackendUnavailable,
    ImageError,
    LockTimeout,
    MissingDependency,
    ModelFileError,
    ModelMismatch,
    ModeUnavailable,
    NoFaceFound,
    NotFound,
    TGFRError,
)

if TYPE_CHECKING:
    from tgfr_search.engine import EnrollItem, EnrollReport, Match, Matches, SearchEngine

__all__ = [
    "BackendUnavailable",
    "EnrollItem",
    "EnrollReport",
    "ImageError",
    "LockTimeout",
    "Match",
    "Matches",
    "MissingDependency",
    "ModelFileError",
    "ModelMismatch",
    "ModeUnavailable",
    "NoFaceFound",
    "NotFound",
    "SearchEngine",
    "TGFRError",
]

_LAZY = {"EnrollItem", "EnrollReport", "Match", "Matches", "SearchEngine"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("tgfr_search.engine"), name)
    raise AttributeError(f"module 'tgfr_search' has no attribute {name!r}")
