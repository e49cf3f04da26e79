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


def test_delete_leaves_no_trace_in_the_database_files(make_engine, raw_people, tmp_path) -> None:
    engine = make_engine("forget")
    (name, photos), (other, others) = list(raw_people.items())[:2]
    secret = "zebra-striped scarf worn by the witness 7f3a9"
    engine.enroll(photos[0], identity=name, caption=secret, metadata={"case": "x-41923"})
    engine.enroll(others[0], identity=other)
    crop = engine.store.crops_of([1])[1]
    engine.delete(name)
    blobs = b"".join(p.read_bytes() for p in (tmp_path / "forget").glob("metadata.db*"))
    assert secret.encode() not in blobs
    assert b"x-41923" not in blobs and name.encode() not in blobs
    assert crop[-4096:] not in blobs  # the aligned crop's bytes are gone too
    assert name not in [m.identity for m in engine.query(photos[1], k=5)]


def test_audit_log_records_who_did_what_but_no_images(make_engine, raw_people) -> None:
    engine = make_engine("audit")
    name, photos = next(iter(raw_people.items()))
    engine.enroll(photos[0], identity=name)
    engine.query(photos[1], k=3, filters={"identity": name})
    engine.delete(name)
    entries = engine.audit.entries()
    assert [e["event"] for e in entries] == ["enroll", "search", "delete"]
    assert entries[0]["identities"] == [name] and entries[2]["identity"] == name
    assert entries[1]["mode"] == "image" and entries[1]["results"] == [name]
    raw = (engine.path / "audit.log").read_bytes()
    assert len(raw) < 4096 and b"\x89PNG" not in raw and b"JFIF" not in raw
