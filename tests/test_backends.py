"""The Milvus vector store: URIs, filters as expressions, index choice, and the engine's
guarantees on it (repair after loss or a kill, readers during writes, a server that several
processes share). The engine tests that run on every store are in test_engine.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tgfr_search import EnrollItem, SearchEngine
from tgfr_search.index.milvus import (
    FLAT_MAX,
    VectorsConfig,
    choose_index,
    filter_expression,
    parse_vectors_uri,
)

HOSTILE = [
    'quote"inside',
    "back\\slash",
    "'; DROP TABLE faces; --",
    'x" or identity != "',
    "名字 ünïcode",
    "new\nline",
]


def _spawn_args() -> dict:
    # Outside the checkout: `python -c` puts the working directory first on sys.path.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return {"env": env, "cwd": tempfile.gettempdir(), "capture_output": True, "text": True}


@pytest.fixture(scope="module")
def milvus_lite():
    pytest.importorskip("pymilvus", reason="pymilvus not installed (the dev extra has it)")
    pytest.importorskip("milvus_lite", reason="milvus-lite not installed (the dev extra has it)")


@pytest.fixture(scope="module")
def crops(lfw: Path, raw_people) -> list[tuple[str, list[Path]]]:
    """Aligned crops of 16 people outside the raw set, at least two each."""
    out = []
    for person in sorted((lfw / "aligned112").iterdir()):
        photos = sorted(person.glob("*.jpg"))
        if person.name not in raw_people and len(photos) >= 2:
            out.append((person.name, photos[:2]))
        if len(out) == 16:
            return out
    pytest.skip("not enough aligned people")


# -- URIs, expressions, index choice --------------------------------------------------------------


def test_vectors_uris() -> None:
    assert parse_vectors_uri("faiss") == VectorsConfig("faiss")
    lite = parse_vectors_uri("milvus-lite:////data/vectors.db")
    assert (lite.kind, lite.target) == ("milvus-lite", "/data/vectors.db")
    assert parse_vectors_uri("milvus-lite:///data/vectors.db").target == "/data/vectors.db"
    server = parse_vectors_uri(
        "https://milvus.example:19530?prefix=cams&index=gpu_cagra&partition_key=site"
        "&consistency=bounded&db=faces"
    )
    assert server == VectorsConfig(
        "milvus", "https://milvus.example:19530", "cams", "faces", "GPU_CAGRA", "site", "Bounded"
    )
    assert parse_vectors_uri(server.uri) == server
    for bad, why in [
        ("milvus-lite://relative.db", "absolute path"),
        ("http://user:secret@host:19530", "TGFR_MILVUS_TOKEN"),
        ("http://host:19530?index=ANNOY", "index 'ANNOY'"),
        ("http://host:19530?prefix=no-dash", "prefix"),
        ("http://host:19530?colour=red", "unknown option 'colour'"),
        ("redis://host", "expected faiss"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_vectors_uri(bad)


def test_filters_become_milvus_expressions() -> None:
    assert filter_expression({"identity": 'a"b', "camera": "north", "n": 3, "ok": True}) == (
        'identity == "a\\"b" and meta["camera"] == "north" and meta["n"] == 3 '
        'and meta["ok"] == true'
    )
    assert filter_expression({"site": "x"}, partition_key="site") == (
        'partition_key == "x" and meta["site"] == "x"'
    )
    assert filter_expression({"tags": ["a"]}) is None  # no literal: the engine sends the ids


def test_index_follows_collection_size() -> None:
    assert choose_index(1000, lite=True)[0] == "FLAT"
    kind, build, search = choose_index(FLAT_MAX + 1, lite=True)
    assert kind == "IVF_FLAT" and search["nprobe"] >= build["nlist"] // 4
    assert choose_index(10_000_000, lite=False)[0] == "HNSW"
    assert choose_index(10, lite=False, requested="GPU_CAGRA")[0] == "GPU_CAGRA"


# -- the engine on Milvus Lite --------------------------------------------------------------------


def _lite(tmp_path: Path, name: str = "db", query: str = "") -> dict[str, str]:
    return {"vectors": f"milvus-lite://{tmp_path / (name + '-vectors.db')}{query}"}


def _check_consistent(db: Path, opts: dict[str, str]) -> int:
    """The collection holds exactly the store's faces, each found at rank 1 by its own crop."""
    with SearchEngine(db, **opts) as engine:
        ids, _ = engine.store.vectors("face", dim=512)
        space = engine._index("face")
        assert space.sync().ids().tolist() == sorted(ids.tolist())
        crops = engine.store.crops_of(ids.tolist())
        info = engine.store.face_info(ids.tolist())
        for face_id in ids.tolist():
            top = engine.query(crops[face_id], aligned=True, k=1)[0]
            assert (top.face_id, top.identity) == (face_id, info[face_id].identity)
        return len(ids)


def test_hostile_identities_and_values_filter_exactly(milvus_lite, crops, tmp_path) -> None:
    with SearchEngine(tmp_path / "db", **_lite(tmp_path)) as engine:
        items = [
            EnrollItem(photos[0], name, metadata={"tag": name})
            for name, (_, photos) in zip(HOSTILE, crops)
        ]
        assert engine.enroll_many(items, aligned=True).enrolled == len(HOSTILE)
        probe = crops[0][1][1]
        for name in HOSTILE:
            for filters in ({"identity": name}, {"tag": name}):
                found = engine.query(probe, aligned=True, k=5, filters=filters)
                assert [m.identity for m in found] == [name]


def test_partition_key_routes_and_filters_tenants(milvus_lite, crops, tmp_path) -> None:
    opts = _lite(tmp_path, query="?partition_key=site")
    with SearchEngine(tmp_path / "db", **opts) as engine:
        engine.enroll_many(
            [
                EnrollItem(photos[0], name, metadata={"site": "a" if i % 2 else "b"})
                for i, (name, photos) in enumerate(crops[:8])
            ],
            aligned=True,
        )
        space = engine._index("face")
        fields = space.client.describe_collection(space.name)["fields"]
        assert any(f.get("is_partition_key") for f in fields)
        name, photos = crops[1]  # site a
        found = engine.query(photos[1], aligned=True, k=8, filters={"site": "a"})
        assert found[0].identity == name and len(found) == 4
        assert {m.metadata["site"] for m in found} == {"a"}


def test_lost_or_tampered_collection_is_rebuilt_with_a_warning(milvus_lite, crops, tmp_path):
    opts = _lite(tmp_path)
    db = tmp_path / "db"
    with SearchEngine(db, **opts) as engine:
        engine.enroll_many([EnrollItem(p[0], n) for n, p in crops[:6]], aligned=True)
        space = engine._index("face")
        space.client.delete(space.name, ids=[1, 2])  # rows gone behind the engine's back
    with SearchEngine(db, **opts) as engine:
        assert engine.query(crops[0][1][0], aligned=True, k=1)[0].identity == crops[0][0]
        assert any("disagrees with the database" in w for w in engine.warnings)
        space = engine._index("face")
        space.client.drop_alias(space.name)
        for name in space.client.list_collections():
            space.client.drop_collection(name)
    with SearchEngine(db, **opts) as engine:
        assert engine.query(crops[1][1][0], aligned=True, k=1)[0].identity == crops[1][0]
        assert any("missing; rebuilt" in w for w in engine.warnings)
    assert _check_consistent(db, opts) == 6


_KILL_AT = textwrap.dedent(
    """
    import os, signal, sys
    when, rest = sys.argv[1], sys.argv[2:]
    from tgfr_search.index import milvus
    name, _, nth = when.partition("#")
    orig, calls = getattr(milvus.MilvusSpace, name), [0]

    def die_on_nth_call(self, *a, **k):
        calls[0] += 1
        if calls[0] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, *a, **k)

    setattr(milvus.MilvusSpace, name, die_on_nth_call)
    from tgfr_search.cli import main
    sys.argv = ["tgfr-search", *rest]
    main()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "when, command",
    [
        ("committed#2", "enroll"),  # the second batch committed to the database, not to Milvus
        ("_record#3", "enroll"),  # the second batch upserted, its generation not yet recorded
        ("forget#1", "delete"),  # the delete committed to the database, not to Milvus
        ("_reindex#1", "reindex"),  # a rebuild's new collection filled, the alias not moved
    ],
)
def test_kill_between_database_and_milvus(milvus_lite, crops, tmp_path, when, command) -> None:
    gallery = tmp_path / "gallery"
    for name, photos in crops[:6]:
        (gallery / name).mkdir(parents=True)
        for photo in photos:
            (gallery / name / photo.name).symlink_to(photo.resolve())
    db, opts = tmp_path / "db", _lite(tmp_path)
    cli = ["--db", str(db), "--vectors", opts["vectors"]]
    enroll = [*cli, "enroll", "--aligned", "--batch-size", "2", str(gallery)]
    if command != "enroll":  # the gallery is there before the killed command
        done = subprocess.run([sys.executable, "-m", "tgfr_search.cli", *enroll], **_spawn_args())
        assert done.returncode == 0, done.stderr
    args = {"enroll": enroll, "delete": [*cli, "delete", "--yes", crops[0][0]]}
    args["reindex"] = [*cli, "reindex"]
    died = subprocess.run([sys.executable, "-c", _KILL_AT, when, *args[command]], **_spawn_args())
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    left = _check_consistent(db, opts)
    again = subprocess.run(
        [sys.executable, "-m", "tgfr_search.cli", *enroll, "--json"], **_spawn_args()
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["enrolled"] == 12 - left
    assert _check_consistent(db, opts) == 12
    with SearchEngine(db, **opts) as engine:  # nothing left over from the killed rebuild
        collections = engine._index("face").client.list_collections()
        assert len(collections) == len(engine._spaces())  # one per vector space


@pytest.mark.slow
def test_reader_threads_while_a_writer_enrolls_and_deletes(milvus_lite, crops, tmp_path) -> None:
    """Milvus Lite is single-process: readers are threads, the writer another engine object."""
    opts = _lite(tmp_path)
    stable, doomed, new = crops[:4], crops[4:7], crops[7:]
    reader = SearchEngine(tmp_path / "db", **opts)
    reader.enroll_many([EnrollItem(p[0], n) for n, p in stable + doomed], aligned=True)
    stop, errors, seen = threading.Event(), [], set()

    def read() -> None:
        while not stop.is_set():
            for name, photos in stable:
                try:
                    found = reader.query(photos[0], aligned=True, k=20)
                    if found[0].identity != name:
                        errors.append(f"{name} -> {found[0].identity}")
                    seen.update(m.identity for m in found)
                except Exception as e:  # the test's point: no reader ever fails
                    errors.append(repr(e))

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        with SearchEngine(tmp_path / "db", **opts) as writer:
            for name, photos in new:
                writer.enroll_many([EnrollItem(photos[0], name)], aligned=True)
            for name, _ in doomed:
                writer.delete(name)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    assert {n for n, _ in new} & seen  # readers saw faces enrolled while they ran
    final = {m.identity for m in reader.query(stable[0][1][0], aligned=True, k=50)}
    assert final == {n for n, _ in stable + new}
    reader.close()


def test_index_moves_to_ivf_as_the_collection_grows(milvus_lite, tmp_path, monkeypatch) -> None:
    """Past FLAT_MAX the collection is re-indexed IVF_FLAT; each vector still finds itself."""
    from tgfr_search.index import milvus
    from tgfr_search.store import NewFace, Store, sqlite_url

    monkeypatch.setattr(milvus, "FLAT_MAX", 300)
    store = Store(sqlite_url(tmp_path / "m.db"))
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((600, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    conn = milvus.MilvusVectors(parse_vectors_uri(_lite(tmp_path)["vectors"]))
    space = conn.space(store, "face", 32, lambda: __import__("contextlib").nullcontext(True))
    kinds = []
    for start in range(0, 600, 200):
        store.add_faces(
            [
                NewFace(f"p{i}", f"h{i}", b"", {"face": vecs[i]}, meta={"even": i % 2 == 0})
                for i in range(start, start + 200)
            ]
        )
        space.committed()
        kinds.append(space.index_type)
    assert kinds == ["FLAT", "IVF_FLAT", "IVF_FLAT"] and len(space) == 600
    scores, ids = space.search(vecs[:50], 10)
    assert ids[:, 0].tolist() == list(range(1, 51))
    exact = np.argsort(-(vecs[:50] @ vecs.T), axis=1)[:, :10] + 1
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
    assert recall >= 0.95, recall
    even = store.matching({"even": True})
    _, ids = space.search(vecs[:20], 5, even)
    assert np.all(ids % 2 == 1)  # face ids are 1-based: even rows have odd ids
    conn.close()
    store.close()


# -- a Milvus server that several processes share -------------------------------------------------


@pytest.fixture
def milvus_server(milvus_lite, tmp_path):
    """`milvus-lite server`: the Milvus gRPC protocol on loopback, as a real server speaks it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("milvus-lite")
    cmd = [str(exe), "server", "--data-dir", str(tmp_path / "server"), "--host", "127.0.0.1"]
    spawn = {k: v for k, v in _spawn_args().items() if k in ("env", "cwd")}
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **spawn
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"milvus-lite server did not start: {proc.communicate()[1][-2000:]}")
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)


@pytest.mark.slow
def test_processes_share_a_milvus_server(milvus_server, crops, tmp_path) -> None:
    opts = {"vectors": milvus_server}
    db = tmp_path / "db"
    with SearchEngine(db, **opts) as engine:
        engine.enroll_many([EnrollItem(p[0], n) for n, p in crops[:6]], aligned=True)
        assert engine.info()["vectors"] == milvus_server
        name, photos = crops[2]
        code = (
            "import json, sys; from tgfr_search import SearchEngine\n"
            "with SearchEngine(sys.argv[1], vectors=sys.argv[2]) as e:\n"
            "    m = e.query(sys.argv[3], aligned=True, k=1)[0]\n"
            "    e.delete(sys.argv[4]); print(json.dumps([m.identity, e.info()['faces']]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(db), milvus_server, str(photos[1]), crops[0][0]],
            **_spawn_args(),
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout) == [name, 5]
        # The other process deleted in place: this one sees it without rebuilding anything.
        found = engine.query(crops[0][1][0], aligned=True, k=10)
        assert crops[0][0] not in [m.identity for m in found] and len(found) == 5
        assert engine.warnings == []


def test_cli_takes_vectors_and_metadata_options(milvus_lite, crops, tmp_path) -> None:
    from tgfr_search.cli import cli

    gallery = tmp_path / "gallery"
    for name, photos in crops[:3]:
        (gallery / name).mkdir(parents=True)
        (gallery / name / photos[0].name).symlink_to(photos[0].resolve())
    opts = ["--db", str(tmp_path / "db"), "--vectors", _lite(tmp_path)["vectors"]]
    runner = CliRunner()
    out = runner.invoke(cli, [*opts, "enroll", "--aligned", str(gallery), "--json"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(
        cli, [*opts, "query", "--aligned", str(crops[1][1][1]), "--json", "-k", "1"]
    )
    assert json.loads(out.stdout)["results"][0]["identity"] == crops[1][0]
    info = json.loads(runner.invoke(cli, [*opts, "info", "--json"]).stdout)
    assert info["vectors"] == _lite(tmp_path)["vectors"] and info["faces"] == 3
    bad = runner.invoke(
        cli, ["--db", str(tmp_path / "x"), "--vectors", "milvus-lite://rel", "info"]
    )
    assert bad.exit_code == 1 and "absolute path" in bad.output
    bad = runner.invoke(cli, ["--db", str(tmp_path / "y"), "--metadata", "nope", "info"])
    assert bad.exit_code == 1 and "not a SQLAlchemy database URL" in bad.output
    down = ["--db", str(tmp_path / "z"), "--vectors", "http://127.0.0.1:1", "info"]
    bad = runner.invoke(cli, down)
    assert bad.exit_code == 1 and "cannot reach Milvus at http://127.0.0.1:1" in bad.output


def test_milvus_lite_is_single_process(milvus_lite, tmp_path) -> None:
    opts = _lite(tmp_path)
    code = (
        "import sys; from tgfr_search import SearchEngine, BackendUnavailable\n"
        "try:\n    SearchEngine(sys.argv[1], vectors=sys.argv[2])\n"
        "except BackendUnavailable as e:\n    print(e)"
    )
    with SearchEngine(tmp_path / "db", **opts):
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "other"), opts["vectors"]],
            **_spawn_args(),
        )
    assert "another process has it open" in out.stdout, out.stderr[-2000:]


def test_every_query_mode_ranks_as_on_faiss(milvus_lite, raw_people, tmp_path) -> None:
    """image, fused, refine and text (the TGFR spaces: fused, aligned and any other) and a
    filter, on Milvus Lite and on faiss: the same identities in the same order, same scores."""
    people = list(raw_people.items())[:12]
    captions = ["a man with short grey hair", "a young woman with long dark hair", "a smiling man"]
    items = [
        EnrollItem(p[0], n, caption=captions[i % 3], metadata={"half": i % 2})
        for i, (n, p) in enumerate(people)
    ]
    with (
        SearchEngine(tmp_path / "f") as faiss,
        SearchEngine(tmp_path / "m", **_lite(tmp_path)) as milvus,
    ):
        if faiss.tgfr is None:
            pytest.skip(f"no TGFR model to search its spaces with: {faiss._tgfr_problem}")
        faiss.enroll_many(items)
        milvus.enroll_many(items)
        assert milvus._spaces() == faiss._spaces() and len(faiss._spaces()) > 1
        for _, photos in people[:4]:
            for mode, image, caption in [
                ("image", photos[1], None),
                ("fused", photos[1], captions[0]),
                ("refine", photos[1], captions[1]),
                ("text", None, captions[2]),
            ]:
                for filters in (None, {"half": 1}):
                    a, b = (
                        e.query(image, caption=caption, mode=mode, k=5, filters=filters)
                        for e in (faiss, milvus)
                    )
                    assert [m.identity for m in a] == [m.identity for m in b], (mode, filters)
                    assert np.allclose([m.score for m in a], [m.score for m in b], atol=1e-5)
