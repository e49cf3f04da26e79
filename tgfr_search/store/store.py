"""The metadata store: the one place the engine reads and writes rows, through SQLAlchemy 2.x."""

from __future__ import annotations

import builtins
import contextlib
import importlib.resources
import itertools
import json
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy.exc
from sqlalchemy import Engine, create_engine, delete, event, func, insert, make_url, select
from sqlalchemy.orm import Session, sessionmaker

from tgfr_search.errors import BackendUnavailable, MissingDependency, NotFound
from tgfr_search.store.schema import Face, Identity, Setting, Vector

GENERATION = "generation"
DELETE_GENERATION = "delete_generation"


@dataclass
class NewFace:
    """A face ready to be stored: everything but the ids the database assigns."""

    identity: str
    content_hash: str
    crop: bytes
    """The aligned crop as an image file: an aligned file's own bytes, else a PNG."""
    vectors: dict[str, np.ndarray]
    source: str | None = None
    face_index: int = 0
    n_faces: int = 1
    box: list[float] | None = None
    det_score: float | None = None
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FaceInfo:
    """What a search result shows of a stored face."""

    face_id: int
    identity: str
    source: str | None
    caption: str | None
    meta: dict[str, Any]


def _migrations_dir() -> str:
    return str(importlib.resources.files("tgfr_search.migrations"))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # A new database gets 16 KB pages (an existing one keeps its own): a face's vector rows
    # (1-2.5 KB each) and its crop share pages instead of taking one 4 KB page each, which
    # made bulk enrollment ~40% faster and the file smaller. It must precede the first write.
    cur.execute("PRAGMA page_size=16384")
    # WAL lets readers go on while a writer commits; secure_delete overwrites deleted rows.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA secure_delete=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def sqlite_url(path: Path) -> str:
    # Quoted: a '?' would start a query string (another file!) and '%20' would turn into a space.
    return f"sqlite:///{urllib.parse.quote(str(path))}"


def make_engine(url: str) -> Engine:
    """A SQLAlchemy engine with the pragmas tgfr-search relies on for SQLite."""
    if url.startswith("sqlite:///"):
        db_file = Path(make_url(url).database or "")
        if not db_file.exists():
            # Create it readable by the owner only before SQLite opens it.
            fd = os.open(db_file, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _open_engine(url: str) -> Engine:
    """`make_engine`, with a bad URL or a missing driver said in one line."""
    try:
        return make_engine(url)
    except sqlalchemy.exc.NoSuchModuleError as e:
        raise MissingDependency(
            f"no SQLAlchemy dialect for {url.split(':', 1)[0]!r}; for PostgreSQL: "
            "pip install 'tgfr-search[postgres]' and use postgresql+psycopg://"
        ) from e
    except ModuleNotFoundError as e:
        raise MissingDependency(
            f"the database driver {e.name!r} is not installed; for PostgreSQL: "
            "pip install 'tgfr-search[postgres]'"
        ) from e
    except sqlalchemy.exc.ArgumentError as e:
        raise ValueError(f"not a SQLAlchemy database URL: {url!r}") from e


def upgrade_schema(engine: Engine) -> None:
    """Create or upgrade the schema to the newest Alembic revision, all or nothing."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", _migrations_dir())
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            # pysqlite runs DDL outside any transaction: a kill mid-migration would leave half a
            # schema that no later open can upgrade. An explicit BEGIN makes it all or nothing.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif conn.dialect.name == "postgresql":
            # Engines on other hosts share the database but not the engine directory's lock file:
            # a transaction-scoped advisory lock serialises their migrations (Alembic then sees
            # the revision the first one reached and does nothing).
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7226650)")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def schema_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", _migrations_dir())
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def _json_field(field: Any, value: Any) -> Any:
    """A JSON member cast to the SQL type of the value it is compared with, on any dialect."""
    if isinstance(value, bool):
        return field.as_boolean()
    if isinstance(value, int):
        return field.as_integer()
    if isinstance(value, float):
        return field.as_float()
    return field.as_string()


class Selection(np.ndarray):
    """Face ids that matched some filters, which ride along for stores that filter themselves.

    A plain int64 array to whoever wants ids (faiss takes them as an ID selector); a vector
    store that evaluates filters itself (Milvus) reads `filters` instead of shipping the ids.
    """

    filters: dict[str, Any]

    def __array_finalize__(self, obj: Any) -> None:
        self.filters = dict(getattr(obj, "filters", {}) or {})


# Vectors are stored as float16: half the bytes of float32 on disk and through the writer, and
# a unit vector's scores move by less than 5e-4 (11 significant bits), inside what the fp16
# GPU models already allow. The engine gives its in-memory indexes the same rounded values.
VECTOR_DTYPE = np.dtype("<f2")


def _as_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=VECTOR_DTYPE).tobytes()


def _from_blobs(blobs: Iterable[bytes], n: int, dim: int) -> np.ndarray:
    return np.frombuffer(b"".join(blobs), dtype=VECTOR_DTYPE).reshape(n, dim).astype(np.float32)


_FACE_COLUMNS = (
    "id, identity_id, source, content_hash, face_index, n_faces, box, det_score, crop, caption, "
    "meta, generation, created_at"
)


def _insert_faces_sqlite(
    s: Session, faces: Sequence[NewFace], identity_ids: Mapping[str, int], generation: int
) -> list[int]:
    """Faces and vectors as multi-row INSERTs straight to the driver (see `_insert_rows`).

    Ids are the next rowids, as SQLite would pick them: the transaction already holds the write
    lock (the generation was bumped), so no other writer can take them. Values are stored by the
    columns' own SQLAlchemy bind processors, so rows read back exactly as ORM-inserted ones do.
    """
    conn = s.connection()
    dialect = conn.dialect
    cols = Face.__table__.c
    as_json = cols.meta.type.dialect_impl(dialect).bind_processor(dialect) or (lambda v: v)
    as_time = cols.created_at.type.dialect_impl(dialect).bind_processor(dialect) or (lambda v: v)
    first = int(conn.exec_driver_sql("SELECT coalesce(max(id), 0) FROM faces").scalar() or 0) + 1
    ids = list(range(first, first + len(faces)))
    now = as_time(datetime.now(timezone.utc))
    null, empty = as_json(None), as_json({})  # most faces' box and metadata, encoded once
    _insert_rows(
        conn,
        f"INSERT INTO faces ({_FACE_COLUMNS}) VALUES ",
        [
            (
                i,
                identity_ids[f.identity],
                f.source,
                f.content_hash,
                f.face_index,
                f.n_faces,
                null if f.box is None else as_json(f.box),
                f.det_score,
                f.crop,
                f.caption,
                as_json(dict(f.meta)) if f.meta else empty,
                generation,
                now,
            )
            for i, f in zip(ids, faces)
        ],
    )
    _insert_rows(
        conn, "INSERT INTO vectors (face_id, space, vector) VALUES ", _vector_rows(ids, faces)
    )
    return ids


def _vector_rows(ids: Sequence[int], faces: Sequence[NewFace]) -> list[tuple[int, str, bytes]]:
    """(face_id, space, blob) rows, each space's vectors converted in one go, not row by row."""
    rows: list[tuple[int, str, bytes]] = []
    for space in dict.fromkeys(k for f in faces for k in f.vectors):
        have = [(i, f.vectors[space]) for i, f in zip(ids, faces) if space in f.vectors]
        data = np.stack([v for _, v in have]).astype(VECTOR_DTYPE, copy=False)
        raw, width = data.tobytes(), data.shape[1] * VECTOR_DTYPE.itemsize
        rows += [(i, space, raw[n * width : (n + 1) * width]) for n, (i, _) in enumerate(have)]
    return rows


def _insert_rows(conn: Any, head: str, rows: list[tuple[Any, ...]]) -> None:
    """Rows in multi-row INSERTs: one statement step per ~100 rows, not one each.

    Each step hands the GIL back and forth; at GPU enrollment rates, one per row left the
    writer thread queueing for the GIL behind the threads feeding the GPU.
    """
    if not rows:
        return
    width = len(rows[0])
    per = max(1, 999 // width)  # SQLite's variable limit before 3.32
    for at in range(0, len(rows), per):
        chunk = rows[at : at + per]
        values = ", ".join(["(" + ", ".join("?" * width) + ")"] * len(chunk))
        conn.exec_driver_sql(head + values, tuple(itertools.chain.from_iterable(chunk)))


class Store:
    """Identities, faces, captions, metadata and vectors in one SQL database."""

    def __init__(
        self,
        url: str,
        *,
        migration_lock: Callable[
            [], contextlib.AbstractContextManager[Any]
        ] = contextlib.nullcontext,
    ) -> None:
        self.url = url
        self.engine = _open_engine(url)
        try:
            revision = schema_revision(self.engine)
        except sqlalchemy.exc.OperationalError as e:
            self.engine.dispose()
            shown = make_url(url).render_as_string(hide_password=True)
            why = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
            raise BackendUnavailable(f"cannot open the metadata database {shown}: {why}") from e
        if revision != head_revision():
            with migration_lock():  # checked again: another process may have just migrated
                if schema_revision(self.engine) != head_revision():
                    upgrade_schema(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._committed: threading.Event | None = None  # set by add_faces in checkpoints_aside

    def close(self) -> None:
        self.engine.dispose()

    # -- settings ---------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        with self._session() as s:
            row = s.get(Setting, key)
            return default if row is None else row.value

    def _set(self, s: Session, key: str, value: Any) -> None:
        s.merge(Setting(key=key, value=value))

    def set(self, key: str, value: Any) -> None:
        with self._session.begin() as s:
            self._set(s, key, value)

    def generation(self) -> int:
        return int(self.get(GENERATION, 0))

    def _bump(self, s: Session, *, deleted: bool = False) -> int:
        # FOR UPDATE: writers on other hosts (PostgreSQL) must not both take the same number.
        row = s.get(Setting, GENERATION, with_for_update=True)
        gen = (int(row.value) if row else 0) + 1
        self._set(s, GENERATION, gen)
        if deleted:
            self._set(s, DELETE_GENERATION, gen)
        return gen

    # -- writes -----------------------------------------------------------------------------
    def existing(self, keys: Iterable[tuple[str, int]]) -> builtins.set[tuple[str, int]]:
        """Which (content_hash, face_index) pairs are already stored."""
        keys = list(keys)
        hashes = {h for h, _ in keys}
        if not hashes:
            return set()
        if self.engine.dialect.name == "sqlite":
            # The hashes as one JSON parameter: a third of the time of an IN list of thousands
            # of bound values, which GPU enrollment asks for every batch.
            with self.engine.connect() as conn:
                found = conn.exec_driver_sql(
                    "SELECT content_hash, face_index FROM faces "
                    "WHERE content_hash IN (SELECT value FROM json_each(?))",
                    (json.dumps(sorted(hashes)),),
                ).all()
            return {(h, i) for h, i in found}
        with self._session() as s:
            rows = s.execute(
                select(Face.content_hash, Face.face_index).where(Face.content_hash.in_(hashes))
            ).all()
        return {(h, i) for h, i in rows}

    def add_faces(self, faces: Sequence[NewFace]) -> list[int]:
        """Store a batch of faces in one transaction; returns their ids in order.

        Rows go in as bulk INSERTs rather than one ORM object each (on SQLite, multi-row
        statements with the ids picked here; elsewhere, ids from RETURNING): several times the
        rows per second, which GPU enrollment needs.
        """
        if not faces:
            return []
        try:
            return self._add_faces(faces)
        finally:
            if self._committed is not None:
                self._committed.set()

    def _add_faces(self, faces: Sequence[NewFace]) -> list[int]:
        with self._session.begin() as s:
            if s.get_bind().dialect.name == "sqlite":
                # A connection setting, so set on every call: 0 inside checkpoints_aside.
                pages = 0 if self._committed is not None else 1000
                s.connection().exec_driver_sql(f"PRAGMA wal_autocheckpoint={pages}")
            gen = self._bump(s)
            names = {f.identity for f in faces}
            ids = dict(
                s.execute(select(Identity.name, Identity.id).where(Identity.name.in_(names))).all()
            )
            new = sorted(names - ids.keys())
            if new:
                created = s.execute(
                    insert(Identity).returning(Identity.name, Identity.id),
                    [{"name": name} for name in new],
                ).all()
                ids.update({name: i for name, i in created})
            if s.get_bind().dialect.name == "sqlite":
                return _insert_faces_sqlite(s, faces, ids, gen)
            # RETURNING rows come back matched by the unique (content_hash, face_index) key:
            # asking SQLAlchemy to keep parameter order makes SQLite insert one row at a time.
            made = s.execute(
                insert(Face).returning(Face.content_hash, Face.face_index, Face.id),
                [
                    {
                        "identity_id": ids[f.identity],
                        "source": f.source,
                        "content_hash": f.content_hash,
                        "face_index": f.face_index,
                        "n_faces": f.n_faces,
                        "box": f.box,
                        "det_score": f.det_score,
                        "crop": f.crop,
                        "caption": f.caption,
                        "meta": dict(f.meta),
                        "generation": gen,
                    }
                    for f in faces
                ],
            ).all()
            by_key = {(h, i): face_id for h, i, face_id in made}
            face_ids = [by_key[(f.content_hash, f.face_index)] for f in faces]
            vectors = [
                {"face_id": i, "space": k, "vector": _as_blob(v)}
                for i, f in zip(face_ids, faces)
                for k, v in f.vectors.items()
            ]
            if vectors:
                s.execute(insert(Vector), vectors)
            return face_ids

    def delete_identity(self, name: str) -> list[int]:
        """Forget an identity and all its faces; returns the deleted face ids."""
        with self._session.begin() as s:
            ident = s.scalar(select(Identity).where(Identity.name == name))
            if ident is None:
                raise NotFound(f"no identity named {name!r}")
            face_ids = list(s.scalars(select(Face.id).where(Face.identity_id == ident.id)))
            s.execute(delete(Vector).where(Vector.face_id.in_(face_ids)))
            s.execute(delete(Face).where(Face.id.in_(face_ids)))
            s.execute(delete(Identity).where(Identity.id == ident.id))
            self._bump(s, deleted=True)
        return face_ids

    def replace_vectors(self, ids: Sequence[int], vectors: Mapping[str, np.ndarray]) -> None:
        """Overwrite the vectors of some faces, space by space (used by reindex)."""
        with self._session.begin() as s:
            for space, rows in vectors.items():
                for face_id, vec in zip(ids, rows):
                    s.merge(Vector(face_id=int(face_id), space=space, vector=_as_blob(vec)))
            self._bump(s, deleted=True)  # every vector changed: indexes must rebuild

    def checkpoint(self, mode: str = "TRUNCATE") -> None:
        """Fold the WAL into the database file; TRUNCATE also empties it (SQLite only)."""
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as conn:
                conn.exec_driver_sql(f"PRAGMA wal_checkpoint({mode})")

    @contextlib.contextmanager
    def checkpoints_aside(self) -> Iterator[None]:
        """Bulk writes whose WAL checkpoints run in a thread of their own (SQLite; else nothing).

        A commit folds the WAL into the database file itself once the WAL passes 1000 pages:
        about a third of a bulk writer's time. Within this block `add_faces` commits skip that,
        a second thread checkpoints (PASSIVE: it never blocks the writer) after each one, and
        the rest is folded in on the way out, so the file holds every row when the block ends.
        """
        if self.engine.dialect.name != "sqlite":
            yield
            return
        wake, stop = threading.Event(), threading.Event()

        def fold() -> None:
            while not stop.is_set():
                wake.wait()
                wake.clear()
                with contextlib.suppress(sqlalchemy.exc.OperationalError):  # tried again later
                    self.checkpoint("PASSIVE")

        thread = threading.Thread(target=fold, name="tgfr-checkpoints", daemon=True)
        thread.start()
        self._committed = wake
        try:
            yield
        finally:
            self._committed = None
            stop.set()
            wake.set()
            thread.join()
            self.checkpoint()

    # -- reads ------------------------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        with self._session() as s:
            faces = s.scalar(select(func.count(Face.id))) or 0
            idents = s.scalar(select(func.count(Identity.id))) or 0
        return faces, idents

    def identities(self) -> list[tuple[str, int]]:
        """Every identity with its number of faces, by name."""
        with self._session() as s:
            rows = s.execute(
                select(Identity.name, func.count(Face.id))
                .join(Face, isouter=True)
                .group_by(Identity.id)
                .order_by(Identity.name)
            ).all()
        return [(n, c) for n, c in rows]

    def vectors(
        self, space: str, *, dim: int, after: int = 0, up_to: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, matrix) of the vectors in a space of faces added in generations (after, up_to]."""
        q = (
            select(Vector.face_id, Vector.vector)
            .join(Face, Face.id == Vector.face_id)
            .where(Vector.space == space, Face.generation > after)
        )
        if up_to is not None:
            q = q.where(Face.generation <= up_to)
        with self._session() as s:
            rows = s.execute(q.order_by(Vector.face_id)).all()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, _from_blobs((r[1] for r in rows), len(rows), dim)

    def vectors_of(self, space: str, ids: Sequence[int], *, dim: int) -> np.ndarray:
        """The vectors of the given faces in one space, in the order of `ids` (zeros if none)."""
        with self._session() as s:
            rows = dict(
                s.execute(
                    select(Vector.face_id, Vector.vector).where(
                        Vector.space == space, Vector.face_id.in_([int(i) for i in ids])
                    )
                ).all()
            )
        out = np.zeros((len(ids), dim), dtype=np.float32)
        for n, face_id in enumerate(ids):
            if face_id in rows:
                out[n] = np.frombuffer(rows[face_id], dtype=VECTOR_DTYPE)
        return out

    def crops_of(self, ids: Sequence[int]) -> dict[int, bytes]:
        """The stored crops (image files) of the given faces."""
        with self._session() as s:
            rows = s.execute(
                select(Face.id, Face.crop).where(Face.id.in_([int(i) for i in ids]))
            ).all()
        return {r[0]: r[1] for r in rows}

    def caption_fraction(self) -> float:
        """The share of faces enrolled with a caption (0 for an empty gallery)."""
        with self._session() as s:
            total = s.scalar(select(func.count(Face.id))) or 0
            captioned = s.scalar(
                select(func.count(Face.id)).where(Face.caption.is_not(None), Face.caption != "")
            )
        return (captioned or 0) / total if total else 0.0

    def face_info(self, ids: Sequence[int]) -> dict[int, FaceInfo]:
        if not ids:
            return {}
        with self._session() as s:
            rows = s.execute(
                select(Face.id, Identity.name, Face.source, Face.caption, Face.meta)
                .join(Identity)
                .where(Face.id.in_([int(i) for i in ids]))
            ).all()
        return {r[0]: FaceInfo(r[0], r[1], r[2], r[3], r[4] or {}) for r in rows}

    def matching(self, filters: Mapping[str, Any]) -> Selection:
        """Ids of faces whose identity or metadata equal every given value (with the filters)."""
        q = select(Face.id).join(Identity).order_by(Face.id)
        for key, value in filters.items():
            if key == "identity":
                q = q.where(Identity.name == str(value))
            else:
                q = q.where(_json_field(Face.meta[key], value) == value)
        with self._session() as s:
            ids = np.fromiter(s.scalars(q), dtype=np.int64)
        out = ids.view(Selection)
        out.filters = dict(filters)
        return out

    def iter_rows(
        self, space: str, *, dim: int, after: int = 0, up_to: int, batch: int = 2048
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str], list[dict[str, Any]]]]:
        """(ids, vectors, identities, metadata) of a space's faces added in (after, up_to], in
        batches by face id: what a vector store that filters by itself needs, a batch at a time.
        """
        last = 0
        while True:
            q = (
                select(Vector.face_id, Vector.vector, Identity.name, Face.meta)
                .join(Face, Face.id == Vector.face_id)
                .join(Identity, Identity.id == Face.identity_id)
                .where(
                    Vector.space == space,
                    Face.generation > after,
                    Face.generation <= up_to,
                    Vector.face_id > last,
                )
                .order_by(Vector.face_id)
                .limit(batch)
            )
            with self._session() as s:
                rows = s.execute(q).all()
            if not rows:
                return
            last = rows[-1][0]
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            mat = _from_blobs((r[1] for r in rows), len(rows), dim)
            yield ids, mat, [r[2] for r in rows], [r[3] or {} for r in rows]

    def iter_crops(self, batch: int = 256) -> Iterator[list[tuple[int, bytes, str | None]]]:
        """(face_id, crop image file, caption) in batches, for re-embedding."""
        last = 0
        while True:
            with self._session() as s:
                rows = s.execute(
                    select(Face.id, Face.crop, Face.caption)
                    .where(Face.id > last)
                    .order_by(Face.id)
                    .limit(batch)
                ).all()
            if not rows:
                return
            last = rows[-1][0]
            yield [(r[0], r[1], r[2]) for r in rows]
