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
    assert schema_revision(store.engine) == head_revision() == "0002"
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


def test_upgrade_from_0001_rewrites_float32_vectors_as_float16_and_back(url: str) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import insert, select

    from tgfr_search.store.schema import Face, Identity, Vector
    from tgfr_search.store.store import _migrations_dir, make_engine

    cfg = Config()
    cfg.set_main_option("script_location", _migrations_dir())

    def migrate(to: str, how=command.upgrade) -> None:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            how(cfg, to)

    engine = make_engine(url)
    migrate("0001")  # a store of the first release: float32 blobs
    vecs = np.random.default_rng(1).standard_normal((7, 512)).astype(np.float32)
    halved = vecs.astype(np.float16).astype(np.float32)
    with engine.begin() as conn:
        conn.execute(insert(Identity.__table__), [{"name": "a"}])
        conn.execute(
            insert(Face.__table__),
            [
                {"identity_id": 1, "content_hash": f"h{i}", "crop": b"x", "meta": {}}
                | {"face_index": 0, "n_faces": 1, "generation": 1}
                for i in range(7)
            ],
        )
        rows = [{"face_id": i + 1, "vector": v.tobytes()} for i, v in enumerate(vecs)]
        conn.execute(insert(Vector.__table__), [r | {"space": sp} for r in rows for sp in "ab"])
    engine.dispose()
    s = Store(url)  # opening it upgrades it
    assert schema_revision(s.engine) == "0002"
    for space in "ab":
        ids, mat = s.vectors(space, dim=512)
        assert ids.tolist() == list(range(1, 8))
        assert np.array_equal(mat, halved)
    assert np.abs(mat - vecs).max() < 1e-3 * np.abs(vecs).max()
    s.close()
    migrate("0001", command.downgrade)
    with engine.connect() as conn:
        blobs = conn.execute(select(Vector.vector).order_by(Vector.face_id, Vector.space)).scalars()
        back = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(7, 2, 512)
    assert np.array_equal(back[:, 0], halved)
    engine.dispose()


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


def test_checkpoints_aside_leave_every_row_in_the_database_file(tmp_path: Path) -> None:
    import shutil
    import sqlite3

    db = tmp_path / "m.db"
    s = Store(sqlite_url(db))
    rng = np.random.default_rng(0)
    with s.checkpoints_aside():  # 6 commits of 200 faces: ~1,000 pages of WAL
        for b in range(6):
            s.add_faces(
                [
                    face(f"p{i % 7}", f"h{b}-{i}", rng.standard_normal(512), caption="x" * 40)
                    for i in range(200)
                ]
            )
    assert Path(f"{db}-wal").stat().st_size == 0  # folded in and emptied on the way out
    shutil.copy(db, tmp_path / "alone.db")  # the file without its WAL holds every row
    with sqlite3.connect(tmp_path / "alone.db") as con:
        assert con.execute("SELECT count(*) FROM faces").fetchone()[0] == 1200
        assert con.execute("SELECT count(*) FROM vectors").fetchone()[0] == 1200
    s.add_faces([face("a", "after", [1, 0])])  # and writes after the block work as before
    assert s.counts() == (1201, 8)
    s.close()


def test_bad_or_unreachable_metadata_urls_say_so_in_one_line() -> None:
    from tgfr_search import BackendUnavailable, MissingDependency

    with pytest.raises(ValueError, match="not a SQLAlchemy database URL"):
        Store("no url at all")
    with pytest.raises(MissingDependency, match=r"tgfr-search\[postgres\]"):
        Store("nosuchdialect://x/y")
    with pytest.raises(BackendUnavailable, match="cannot open the metadata database"):
        Store("postgresql+psycopg://nobody@127.0.0.1:1/none")
