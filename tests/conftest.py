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


# The stores an engine test can run against (see `make_engine`), each a (vectors, metadata) pair:
# faiss + SQLite (the default), Milvus Lite + SQLite, faiss + PostgreSQL.
STORES = ("faiss", "milvus-lite", "postgresql")
PG_URL = os.environ.get("TGFR_TEST_PG_URL")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`@pytest.mark.stores(...)` runs a test that uses `make_engine` once per named store."""
    marker = metafunc.definition.get_closest_marker("stores")
    if marker is not None and "make_engine" in metafunc.fixturenames:
        unknown = set(marker.args) - set(STORES)
        assert not unknown, f"unknown stores {unknown}"
        metafunc.parametrize("make_engine", marker.args, indirect=True)


def _pg_admin():
    """An autocommit connection to the test server, or a pytest.skip saying why there is none."""
    if not PG_URL:
        pytest.skip(
            'no PostgreSQL server: set TGFR_TEST_PG_URL (e.g. eval "$(bash .ci/postgres.sh)"; '
            ".ci/run does this)"
        )
    psycopg = pytest.importorskip("psycopg", reason="psycopg not installed (the dev extra has it)")
    from sqlalchemy import make_url

    url = make_url(PG_URL)
    try:
        return psycopg.connect(
            host=url.host, port=url.port, user=url.username, password=url.password,
            dbname=url.database, autocommit=True, connect_timeout=5,
        )  # fmt: skip
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL at TGFR_TEST_PG_URL not reachable: {str(e).strip()[:200]}")


@pytest.fixture
def pg_database():
    """`make()` creates a fresh PostgreSQL database and returns its URL; all dropped after."""
    import secrets

    from sqlalchemy import make_url

    admin = _pg_admin()
    made: list[str] = []

    def make() -> str:
        name = f"tgfr_test_{secrets.token_hex(6)}"
        admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)

    yield make
    for name in made:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture
def make_engine(request: pytest.FixtureRequest, tmp_path: Path):
    """Engines in a temporary folder, on the store the test is parametrised with (default
    faiss + SQLite); the engine caches loaded models per process.

    `make(name)` again opens the same engine (same folder, vectors and database);
    `make.options(name)` gives the vectors/metadata keywords to open it some other way.
    """
    from tgfr_search import SearchEngine

    store = getattr(request, "param", "faiss")
    databases: dict[str, str] = {}
    if store == "milvus-lite":
        for module in ("pymilvus", "milvus_lite"):
            pytest.importorskip(module, reason=f"{module} not installed (the dev extra has it)")
    new_database = request.getfixturevalue("pg_database") if store == "postgresql" else None
    opened = []

    def options(name: str = "db") -> dict[str, str]:
        if store == "milvus-lite":
            return {"vectors": f"milvus-lite://{tmp_path / (name + '-vectors.db')}"}
        if store == "postgresql":
            if name not in databases:
                databases[name] = new_database()
            return {"metadata": databases[name]}
        return {}

    def make(name: str = "db", **kw):
        engine = SearchEngine(tmp_path / name, **{**options(name), **kw})
        opened.append(engine)
        return engine

    make.store = store
    make.options = options
    yield make
    for e in opened:
        e.close()
