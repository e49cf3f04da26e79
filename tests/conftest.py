"""Shared fixtures: real faces from ../shared/datasets/lfw, models loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LFW = Path(
    os.environ.get("TGFR_LFW", Path(__file__).resolve().parents[1].parent / "shared/datasets/lfw")
)


@pytest.fixture(scope="session")
def lfw() -> Path:
    if not (LFW / "raw").is_dir():
        pytest.skip(f"LFW not found at {LFW} (set TGFR_LFW)")
    return LFW


@pytest.fixture(scope="session")
def raw_people(lfw: Path) -> dict[str, list[Path]]:
    """The 80 raw-photo people, each with their images sorted by name."""
    return {d.name: sorted(d.glob("*.jpg")) for d in sorted((lfw / "raw").iterdir()) if d.is_dir()}


@pytest.fixture
def make_engine(tmp_path: Path):
    """Engines in a temporary folder; the engine caches loaded models per process."""
    from tgfr_search import SearchEngine

    opened = []

    def make(name: str = "db", **kw):
        engine = SearchEngine(tmp_path / name, **kw)
        opened.append(engine)
        return engine

    yield make
    for e in opened:
        e.close()
