"""No pickle anywhere; engine files readable by the owner only (pins: test_models.py)."""

from __future__ import annotations

import re
import stat
from pathlib import Path

from tgfr_search import EnrollItem

PACKAGE = Path(__file__).resolve().parents[1] / "tgfr_search"


def test_no_pickle_in_the_package() -> None:
    risky = re.compile(
        r"import pickle|from pickle|cPickle|dill|joblib|allow_pickle\s*=\s*True"
        r"|torch\.load\((?![^)]*weights_only\s*=\s*True)"
    )
    offenders = [
        f"{p.relative_to(PACKAGE)}:{n}"
        for p in PACKAGE.rglob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if risky.search(line)
    ]
    assert offenders == []


def test_engine_files_are_owner_only(make_engine, raw_people, tmp_path: Path) -> None:
    engine = make_engine("private")
    people = list(raw_people.items())[:2]
    engine.enroll_many([EnrollItem(p[0], name) for name, p in people])
    engine.query(people[0][1][1])
    engine.delete(people[1][0])
    root = tmp_path / "private"
    assert stat.S_IMODE(root.stat().st_mode) & 0o077 == 0
    files = [p for p in root.iterdir() if p.is_file() and p.name != "write.lock"]
    assert {p.name for p in files} >= {"metadata.db", "index-face.faiss", "audit.log"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p.name
