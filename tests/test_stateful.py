"""The Python API driven by random operations against a simple model of what it should hold.

A hypothesis state machine enrolls aligned LFW crops (one at a time, in batches, again as
duplicates), deletes identities (known and unknown), queries and reopens the engine; after every
step the engine's counts, identities and index must match the model, every enrolled face's own
crop must find its identity at rank 1, and no deleted identity may ever come back (issue 6).
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tgfr_search import EnrollItem, NotFound, SearchEngine

# Labels the engine must keep verbatim; each stands for one real person of the pool.
ODD_LABELS = ["O'Brien; DROP TABLE faces; --", "a/b/../c", "名前 😀", "  padded  "]


def _pool(lfw: Path, size: int = 20) -> list[tuple[str, list[Path]]]:
    people = []
    for person in sorted((lfw / "aligned112").iterdir()):
        crops = sorted(person.glob("*.jpg"))
        if len(crops) >= 3:
            people.append(crops[:3])
        if len(people) == size:
            break
    labels = [c[0].parent.name for c in people]
    labels[: len(ODD_LABELS)] = ODD_LABELS
    return list(zip(labels, people))


class EngineMachine(RuleBasedStateMachine):
    """One engine in a fresh folder per example; `model` is what it should hold."""

    pool: list[tuple[str, list[Path]]] = []

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="tgfr-stateful-"))
        self.engine = SearchEngine(self.dir / "db")
        self.faces: dict[str, tuple[str, Path]] = {}  # content hash -> (identity, crop)
        self.deleted: set[str] = set()
        self.checked: set[str] = set()  # faces whose own crop was queried since the last change

    enrolled = Bundle("enrolled")

    def teardown(self) -> None:
        try:
            self._check_every_face()
        finally:
            self.engine.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- the model ------------------------------------------------------------------------------
    def identities(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for identity, _ in self.faces.values():
            out[identity] = out.get(identity, 0) + 1
        return out

    def _add(self, identity: str, crop: Path) -> bool:
        digest = hashlib.sha256(crop.read_bytes()).hexdigest()
        if digest in self.faces:  # the same file is a duplicate whoever it is enrolled as
            return False
        self.faces[digest] = (identity, crop)
        self.deleted.discard(identity)
        return True

    def _query_own(self, crop: Path, identity: str) -> None:
        matches = self.engine.query(crop, aligned=True, k=len(self.identities()) + 1)
        names = [m.identity for m in matches]
        assert names[0] == identity, (crop.name, names[:3])
        assert not self.deleted & set(names), f"deleted {self.deleted & set(names)} came back"

    def _check_every_face(self) -> None:
        for digest, (identity, crop) in self.faces.items():
            if digest not in self.checked:
                self._query_own(crop, identity)
                self.checked.add(digest)

    # -- rules ----------------------------------------------------------------------------------
    @initialize()
    def start(self) -> None:
        assert self.engine.info()["faces"] == 0

    @rule(target=enrolled, who=st.integers(0, 19), which=st.integers(0, 2))
    def enroll_one(self, who: int, which: int):
        identity, crops = self.pool[who]
        crop = crops[which]
        ids = self.engine.enroll(crop, identity=identity, aligned=True)
        expected_new = self._add(identity, crop)
        assert len(ids) == int(expected_new)
        if expected_new:
            self._query_own(crop, identity)  # the new face is found at once
        return identity

    @rule(
        target=enrolled,
        picks=st.lists(st.tuples(st.integers(0, 19), st.integers(0, 2)), min_size=1, max_size=6),
    )
    def enroll_batch(self, picks: list[tuple[int, int]]):
        items = [EnrollItem(self.pool[w][1][i], self.pool[w][0]) for w, i in picks]
        report = self.engine.enroll_many(items, aligned=True, batch_size=4)
        new = sum(self._add(it.identity, Path(it.image)) for it in items)
        assert (report.enrolled, len(report.duplicates), report.skipped) == (
            new,
            len(items) - new,
            [],
        )
        return multiple(*{it.identity for it in items})

    @precondition(lambda self: bool(self.faces))
    @rule(data=st.data(), other=st.integers(0, 19))
    def enroll_duplicate(self, data, other: int) -> None:
        """An enrolled file again, under its own or another identity: nothing changes."""
        _, crop = data.draw(st.sampled_from(sorted(self.faces.values())))
        assert self.engine.enroll(crop, identity=self.pool[other][0], aligned=True) == []

    @rule(identity=consumes(enrolled))
    def delete(self, identity: str) -> None:
        mine = [d for d, (i, _) in self.faces.items() if i == identity]
        if not mine:  # deleted already, through another copy of the name in the bundle
            with pytest.raises(NotFound):
                self.engine.delete(identity)
            return
        assert self.engine.delete(identity) == len(mine)
        for d in mine:
            del self.faces[d]
        self.deleted.add(identity)
        self.checked.clear()  # a deletion rebuilds the index: look at every face again
        self._check_every_face()

    @rule(name=st.sampled_from(["nobody", "", "%", "名前 😀 (not enrolled)"]))
    def delete_unknown(self, name: str) -> None:
        with pytest.raises(NotFound):
            self.engine.delete(name)

    @precondition(lambda self: bool(self.faces))
    @rule(data=st.data())
    def query_one(self, data) -> None:
        identity, crop = data.draw(st.sampled_from(sorted(self.faces.values())))
        self._query_own(crop, identity)

    @rule()
    def reopen(self) -> None:
        self.engine.close()
        self.engine = SearchEngine(self.dir / "db")
        self.checked.clear()
        self._check_every_face()

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def counts_and_identities_match(self) -> None:
        info = self.engine.info()
        expected = self.identities()
        assert (info["faces"], info["identities"]) == (len(self.faces), len(expected))
        assert dict(self.engine.identities()) == expected
        assert not self.deleted & set(expected)

    @invariant()
    def index_holds_exactly_the_stored_faces(self) -> None:
        if not self.faces:
            return
        with closing(sqlite3.connect(self.dir / "db" / "metadata.db")) as con:
            ids = sorted(i for (i,) in con.execute("SELECT id FROM faces"))
        assert sorted(self.engine._index("face").sync().ids().tolist()) == ids


def test_engine_state_machine(lfw: Path) -> None:
    EngineMachine.pool = _pool(lfw)
    if len(EngineMachine.pool) < 20:
        pytest.skip("not enough aligned people with three crops")
    run_state_machine_as_test(
        EngineMachine,
        settings=settings(
            max_examples=15,
            stateful_step_count=12,
            deadline=None,
            database=None,  # no .hypothesis/ folder in the checkout
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
