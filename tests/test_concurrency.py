"""Concurrency: one writer at a time; readers (threads and processes) keep answering correctly
while a writer enrolls and deletes (issue 6, item 2).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from tgfr_search import EnrollItem, LockTimeout, SearchEngine

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
STABLE, DOOMED, NEW = 10, 3, 40  # people enrolled before the writer; deleted by it; added by it


def _spawn_args() -> dict[str, Any]:
    # Outside the checkout: `python -c` puts the working directory first on sys.path.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return {"env": env, "cwd": tempfile.gettempdir()}


@pytest.fixture(scope="module")
def people(lfw: Path, raw_people) -> list[tuple[str, list[Path]]]:
    """Aligned crops of people outside the raw set, at least two crops each."""
    out = []
    for person in sorted((lfw / "aligned112").iterdir()):
        crops = sorted(person.glob("*.jpg"))
        if person.name not in raw_people and len(crops) >= 2:
            out.append((person.name, crops[:3]))
        if len(out) == STABLE + DOOMED + NEW:
            return out
    pytest.skip("not enough aligned people")


def _count(db: Path) -> int:
    with closing(sqlite3.connect(db / "metadata.db", timeout=30)) as con:
        return con.execute("SELECT count(*) FROM faces").fetchone()[0]


# -- one writer at a time ------------------------------------------------------------------------


def _second_writer_fails(db: Path, crop: Path) -> str:
    t0 = time.monotonic()
    # From the constructor or from enroll: either is fine.
    with pytest.raises(LockTimeout) as err, SearchEngine(db, lock_timeout=0.5) as second:
        second.enroll(crop, identity="second writer", aligned=True)
    waited = time.monotonic() - t0
    assert 0.5 <= waited < 10, waited
    message = str(err.value)
    assert "\n" not in message and str(db) in message and "writing" in message
    assert isinstance(err.value, TimeoutError)
    return message


def test_second_writer_fails_with_a_clear_message(people, tmp_path: Path) -> None:
    db = tmp_path / "db"
    with SearchEngine(db) as engine:
        engine.enroll_many([EnrollItem(c[0], n) for n, c in people[:3]], aligned=True)
    before = _count(db)
    crop = people[5][1][0]

    # Held directly, as any process holding write.lock would.
    lock = FileLock(str(db / "write.lock"))
    with lock:
        _second_writer_fails(db, crop)
    assert _count(db) == before

    # Held by a real enrollment in another process: wait for its first commit, then try.
    gallery = tmp_path / "gallery"
    for name, crops in people[10:]:
        (gallery / name).mkdir(parents=True)
        for c in crops:
            (gallery / name / c.name).symlink_to(c)
    cmd = [sys.executable, "-m", "tgfr_search.cli", "--db", str(db), "enroll", "--aligned"]
    proc = subprocess.Popen(
        [*cmd, "--batch-size", "4", str(gallery)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **_spawn_args(),
    )
    try:
        deadline = time.monotonic() + 120
        while _count(db) == before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the enrollment finished before it could be raced"
        _second_writer_fails(db, crop)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # A killed writer's lock dies with it: the next writer gets in at once.
    with SearchEngine(db, lock_timeout=5) as third:
        assert third.enroll(crop, identity="third writer", aligned=True)


def test_reader_opens_and_queries_while_a_writer_holds_the_lock(people, tmp_path) -> None:
    db = tmp_path / "db"
    name, crops = people[0]
    with SearchEngine(db) as engine:
        engine.enroll(crops[0], identity=name, aligned=True)
    with FileLock(str(db / "write.lock")):
        t0 = time.monotonic()
        with SearchEngine(db, lock_timeout=2) as reader:
            assert reader.query(crops[0], aligned=True, k=1)[0].identity == name
        assert time.monotonic() - t0 < 2


# -- readers during writes -----------------------------------------------------------------------


def _gone(markers: Path) -> set[str]:
    """Identities whose deletion has committed (the writer marks them after delete returns)."""
    return {p.read_text(encoding="utf-8") for p in markers.glob("deleted-*")}


def reader_loop(
    engine: SearchEngine,
    probes: list[tuple[str, str, bool]],
    markers: Path,
    stop: Callable[[], bool],
) -> dict[str, Any]:
    """Query each probe in turn until told to stop; record anything wrong."""
    stats: dict[str, Any] = {"queries": 0, "after_delete": 0, "errors": [], "wrong": []}
    n = 0
    while not stop():
        crop, identity, doomed = probes[n % len(probes)]
        n += 1
        gone = _gone(markers)  # read before the query: these deletions have committed
        try:
            names = [m.identity for m in engine.query(crop, aligned=True, k=5)]
        except Exception as e:  # the test is that there are none
            stats["errors"].append(f"{identity}: {type(e).__name__}: {e}")
            continue
        stats["queries"] += 1
        if stale := gone & set(names):
            stats["wrong"].append(f"{identity}: deleted {sorted(stale)} returned")
        if not doomed and names[:1] != [identity]:
            stats["wrong"].append(f"{identity}: rank 1 was {names[:1]}")
        stats["after_delete"] += doomed and identity in gone
        time.sleep(0.02)
    return stats


_READER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from tgfr_search import SearchEngine
    from test_concurrency import reader_loop

    db, plan, me = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), sys.argv[3]
    markers = Path(plan["markers"])
    with SearchEngine(db) as engine:
        probes = [tuple(p) for p in plan["probes"]]
        engine.query(probes[0][0], aligned=True, k=1)  # models loaded: ready
        (markers / f"ready-{me}").write_text("")
        stats = reader_loop(engine, probes, markers, lambda: (markers / "done").exists())
    (markers / f"stats-{me}.json").write_text(json.dumps(stats))
    """
)

_WRITER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from tgfr_search import EnrollItem, SearchEngine

    db, plan = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    markers = Path(plan["markers"])

    def mark(name, text):
        tmp = markers / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, markers / name)

    with SearchEngine(db) as engine:
        for n, (op, arg) in enumerate(plan["ops"]):
            if op == "enroll":
                items = [EnrollItem(path, name) for path, name in arg]
                engine.enroll_many(items, aligned=True, batch_size=4)
            else:
                engine.delete(arg)
                mark(f"deleted-{n}", arg)  # only now has the deletion committed
    mark("done", "")
    """
)


def test_readers_keep_answering_while_a_writer_enrolls_and_deletes(people, tmp_path) -> None:
    db, markers = tmp_path / "db", tmp_path / "markers"
    markers.mkdir()
    stable, doomed, new = people[:STABLE], people[STABLE : STABLE + DOOMED], people[-NEW:]
    probes = [(str(c[0]), n, False) for n, c in stable] + [(str(c[0]), n, True) for n, c in doomed]

    # The writer: enroll the new people in chunks, deleting the doomed (and one of its own).
    chunks = [new[i : i + 8] for i in range(0, NEW, 8)]
    ops: list[tuple[str, Any]] = []
    for i, chunk in enumerate(chunks):
        ops.append(("enroll", [(str(c), n) for n, cs in chunk for c in cs]))
        if i < DOOMED:
            ops.append(("delete", doomed[i][0]))
        if i == 2:
            ops.append(("delete", chunks[0][0][0]))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"markers": str(markers), "probes": probes, "ops": ops}))

    with SearchEngine(db) as engine:
        engine.enroll_many([EnrollItem(c[0], n) for n, c in stable + doomed], aligned=True)
        assert engine.info()["faces"] == STABLE + DOOMED

        readers = [
            subprocess.Popen(
                [sys.executable, "-c", _READER, str(db), str(plan), str(i)], **_spawn_args()
            )
            for i in range(2)
        ]
        deadline = time.monotonic() + 180
        while not all((markers / f"ready-{i}").exists() for i in range(2)):
            assert all(r.poll() is None for r in readers), "a reader process died"
            assert time.monotonic() < deadline, "reader processes never got ready"
            time.sleep(0.05)

        done = threading.Event()
        thread_stats: list[dict[str, Any]] = []

        def read() -> None:
            thread_stats.append(reader_loop(engine, probes, markers, done.is_set))

        threads = [threading.Thread(target=read) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            writer = subprocess.run(
                [sys.executable, "-c", _WRITER, str(db), str(plan)],
                capture_output=True,
                text=True,
                timeout=600,
                **_spawn_args(),
            )
        finally:  # whatever happened, stop the readers
            done.set()
            (markers / "done").touch()
            for t in threads:
                t.join()
            for r in readers:
                try:
                    r.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    r.kill()
                    r.wait()
        assert writer.returncode == 0, writer.stderr[-3000:]
        assert [r.returncode for r in readers] == [0, 0]

        stats = thread_stats + [
            json.loads((markers / f"stats-{i}.json").read_text()) for i in range(2)
        ]
        for s in stats:
            assert s["errors"] == [], s["errors"][:5]
            assert s["wrong"] == [], s["wrong"][:5]
            assert s["queries"] >= 3, "a reader did not overlap the writer"
        assert sum(s["after_delete"] for s in stats) > 0, "no query after a deletion"
        print("queries per reader (3 threads, 2 processes):", [s["queries"] for s in stats])
        print("queries for a deleted person:", sum(s["after_delete"] for s in stats))

        # Afterwards: exactly the expected people, and an index that matches the database.
        deleted = {n for n, _ in doomed} | {chunks[0][0][0]}
        expected = {n: 1 for n, _ in stable} | {n: len(cs) for n, cs in new if n not in deleted}
        assert dict(engine.identities()) == expected
        with closing(sqlite3.connect(db / "metadata.db")) as con:
            ids = sorted(i for (i,) in con.execute("SELECT id FROM faces"))
        assert sorted(engine._index("face").sync().ids().tolist()) == ids
        for crop, identity, was_doomed in probes:
            names = [m.identity for m in engine.query(crop, aligned=True, k=5)]
            assert (identity in names) != was_doomed
