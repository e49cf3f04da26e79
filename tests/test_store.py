from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import inspect

from tgfr_search.errors import NotFound
from tgfr_search.store import NewFace, Store, sqlite_url
from tgfr_search.store.store import head_revision, schema_revision


def face(identity: str, h: str, vec: list[float], **kw) -> NewFace:
    return NewFace(
        identity=identity, content_hash=h, crop=b"png", vectors={"face": np.array(vec)}, **kw
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests on SQLite and, when a server is available, PostgreSQL."""
    if request.param == "postgresql":
        return request.getfixturevalue("pg_database")()
    return sqlite_url(tmp_path / "m.db")


@pytest.fixture
def store(url: str) -> Store:
    s = Store(url)
    yield s
    s.close()


def test_migrations_create_schema_at_head(store: Store, tmp_path: Path) -> None:
    assert schema_revision(store.engine) == head_revision() == "0001"
    tables = set(inspect(store.engine).get_table_names())
    assert {"identities", "faces", "vectors", "settings", "alembic_version"} <= tables
    if store.engine.dialect.name == "sqlite":
        assert stat.S_IMODE((tmp_path / "m.db").stat().st_mode) == 0o600


def test_add_read_delete(store: Store) -> None:
    ids = store.add_faces(
        [
            face("alice", "h1", [1, 0], meta={"cam": "7", "n": 3}, caption="a woman"),
            face("alice", "h2", [0, 1]),
            face("bob", "h3", [1, 1]),
        ]
    )
    assert ids == [1, 2, 3]
    assert store.counts() == (3, 2)
    assert store.identities() == [("alice", 2), ("bob", 1)]
    got_ids, mat = store.vectors("face", dim=2)
    assert got_ids.tolist() == ids and mat.dtype == np.float32 and mat[2].tolist() == [1, 1]
    assert store.face_info([1])[1].caption == "a woman"
    assert store.matching({"cam": "7"}).tolist() == [1]
    assert store.matching({"n": 3}).tolist() == [1]
    assert store.matching({"identity": "alice"}).tolist() == [1, 2]
    assert store.matching({"cam": "7", "n": 3}).filters == {"cam": "7", "n": 3}
    batches = list(store.iter_rows("face", dim=2, up_to=store.generation(), batch=2))
    assert [b[0].tolist() for b in batches] == [[1, 2], [3]]
    assert batches[0][2] == ["alice", "alice"] and batches[0][3][0] == {"cam": "7", "n": 3}
    assert batches[1][1].tolist() == [[1, 1]]
    assert store.existing([("h1", 0), ("h9", 0)]) == {("h1", 0)}
    assert store.delete_identity("alice") == [1, 2]
    assert store.counts() == (1, 1)
    assert store.vectors("face", dim=2)[0].tolist() == [3]
    with pytest.raises(NotFound, match="no identity named 'alice'"):
        store.delete_identity("alice")


def test_generations_track_additions_and_deletes(store: Store) -> None:
    assert store.generation() == 0
    store.add_faces([face("a", "h1", [1, 0])])
    store.add_faces([face("b", "h2", [0, 1])])
    assert store.generation() == 2
    assert store.vectors("face", dim=2, after=1)[0].tolist() == [2]
    assert store.vectors("face", dim=2, up_to=1)[0].tolist() == [1]
    store.delete_identity("a")
    assert store.generation() == 3 and store.get("delete_generation") == 3


def test_same_content_twice_is_refused_by_the_schema(store: Store) -> None:
    from sqlalchemy.exc import IntegrityError

    store.add_faces([face("a", "h1", [1, 0])])
    with pytest.raises(IntegrityError):
        store.add_faces([face("b", "h1", [0, 1])])
    assert store.counts() == (1, 1)  # the failed batch left nothing behind


def test_reopen_keeps_rows(url: str) -> None:
    s = Store(url)
    s.add_faces([face("a", "h1", [1, 0])])
    s.close()
    s2 = Store(url)
    assert s2.counts() == (1, 1)
    s2.close()


def test_new_sqlite_files_get_16k_pages_and_old_ones_keep_theirs(tmp_path: Path) -> None:
    import sqlite3

    def page_size(path: Path) -> int:
        with sqlite3.connect(path) as con:
            return int(con.execute("PRAGMA page_size").fetchone()[0])

    new = tmp_path / "new.db"
    Store(sqlite_url(new)).close()
    assert page_size(new) == 16384
    old = tmp_path / "old.db"  # made before 16 KB pages: 4 KB, in WAL mode already
    with sqlite3.connect(old) as con:
        con.execute("PRAGMA page_size=4096")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE t (x)")
    s = Store(sqlite_url(old))
    s.add_faces([face("a", "h1", [1, 0])])
    s.close()
    assert page_size(old) == 4096
    s = Store(sqlite_url(old))
    assert s.counts() == (1, 1)
    s.close()


def test_bad_or_unreachable_metadata_urls_say_so_in_one_line() -> None:
    from tgfr_search import BackendUnavailable, MissingDependency

    with pytest.raises(ValueError, match="not a SQLAlchemy database URL"):
        Store("no url at all")
    with pytest.raises(MissingDependency, match=r"tgfr-search\[postgres\]"):
        Store("nosuchdialect://x/y")
    with pytest.raises(BackendUnavailable, match="cannot open the metadata database"):
        Store("postgresql+psycopg://nobody@127.0.0.1:1/none")
