"""The engine end to end with the real models on real LFW faces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tgfr_search import EnrollItem, ModelMismatch, ModeUnavailable, NoFaceFound, NotFound

# Every store runs these, unless a test names fewer (see make_engine in conftest.py).
pytestmark = pytest.mark.stores("faiss", "milvus-lite", "postgresql")


@pytest.fixture(scope="module")
def ten(raw_people):
    """Ten people: their first photo enrolled, their other photos as probes."""
    names = list(raw_people)[:10]
    return {n: raw_people[n] for n in names}


def enroll_first(engine, people):
    items = [EnrollItem(p[0], name, caption=f"photo of {name}") for name, p in people.items()]
    return engine.enroll_many(items)


def test_enroll_and_identify_real_faces(make_engine, ten) -> None:
    engine = make_engine()
    report = enroll_first(engine, ten)
    assert report.enrolled == 10 and not report.skipped
    assert engine.info()["faces"] == 10 and engine.info()["identities"] == 10
    hits = total = 0
    for name, photos in ten.items():
        for probe in photos[1:]:
            matches = engine.query(probe, k=3)
            assert matches.mode == "image" and [m.rank for m in matches] == [1, 2, 3]
            assert matches[0].score >= matches[1].score >= matches[2].score
            hits += matches[0].identity == name
            total += 1
    assert hits / total >= 0.95
    top = engine.query(ten[next(iter(ten))][1], k=1)[0]
    assert top.caption == f"photo of {top.identity}" and top.source.endswith(".jpg")


def test_enrolling_twice_adds_nothing(make_engine, ten) -> None:
    engine = make_engine()
    enroll_first(engine, ten)
    before = engine.info()
    again = enroll_first(engine, ten)
    assert again.enrolled == 0 and len(again.duplicates) == 10
    after = engine.info()
    assert (after["faces"], after["identities"]) == (before["faces"], before["identities"])


def test_input_forms_agree(make_engine, ten) -> None:
    from PIL import Image

    engine = make_engine()
    enroll_first(engine, ten)
    path = next(iter(ten.values()))[1]
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    results = [
        engine.query(src, k=1)[0]
        for src in (path, str(path), path.read_bytes(), Image.open(path), rgb)
    ]
    assert len({(m.identity, round(m.score, 4)) for m in results}) == 1


def test_delete_removes_identity_from_results(make_engine, ten) -> None:
    engine = make_engine()
    enroll_first(engine, ten)
    name, photos = next(iter(ten.items()))
    assert engine.query(photos[1], k=1)[0].identity == name
    assert engine.delete(name) == 1
    assert name not in [m.identity for m in engine.query(photos[1], k=10)]
    assert engine.info()["identities"] == 9
    with pytest.raises(NotFound):
        engine.delete(name)


@pytest.mark.stores("faiss", "postgresql")  # Milvus Lite is single-process
def test_second_process_sees_the_gallery(make_engine, ten, tmp_path: Path) -> None:
    engine = make_engine("shared")
    enroll_first(engine, ten)
    name, photos = list(ten.items())[3]
    opts = json.dumps(make_engine.options("shared"))
    code = (
        "import json,sys; from tgfr_search import SearchEngine\n"
        "with SearchEngine(sys.argv[1], **json.loads(sys.argv[3])) as e:\n"
        "    m = e.query(sys.argv[2], k=1)[0]; print(json.dumps([m.identity, e.info()['faces']]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "shared"), str(photos[1]), opts],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == [name, 10]
    # ...and the first process sees what another one deleted.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys; from tgfr_search import SearchEngine\n"
            "SearchEngine(sys.argv[1], **json.loads(sys.argv[3])).delete(sys.argv[2])",
            str(tmp_path / "shared"),
            name,
            opts,
        ],
        check=True,
    )
    assert name not in [m.identity for m in engine.query(photos[1], k=10)]


@pytest.mark.stores("faiss", "postgresql")
def test_a_query_reads_the_generation_once_and_sees_other_writers(
    make_engine, ten, monkeypatch
) -> None:
    engine = make_engine("shared")
    people = list(ten.items())
    enroll_first(engine, dict(people[:5]))
    name, photos = people[5]
    reads: list[int] = []
    read = engine.store.generation
    monkeypatch.setattr(engine.store, "generation", lambda: reads.append(1) or read())
    assert engine.query(photos[1], caption="a person", k=1).mode == "fused"
    assert len(reads) == 1
    # Another engine on the folder (as another process would) enrolls: the next query sees it,
    # reading again to catch the index up; the one after reads once.
    enroll_first(make_engine("shared"), dict(people[5:6]))
    assert engine.query(photos[1], caption="a person", k=1)[0].identity == name
    assert len(reads) == 3
    engine.query(photos[1], caption="a person", k=1)
    assert len(reads) == 4


@pytest.mark.stores("faiss")
def test_an_index_newer_than_the_querys_read_is_used_not_rebuilt(
    make_engine, ten, monkeypatch
) -> None:
    import threading

    from tgfr_search import engine as engine_module

    engine = make_engine("shared")
    people = list(ten.items())
    enroll_first(engine, dict(people[:5]))
    engine.query(people[0][1][1], k=1)
    builds: list[int] = []
    build = engine_module.build_index
    monkeypatch.setattr(
        engine_module, "build_index", lambda *a, **kw: builds.append(1) or build(*a, **kw)
    )
    with engine._one_generation():  # a query has read the generation...
        enroll_first(make_engine("shared"), dict(people[5:6]))  # ...another process writes...
        catch_up = threading.Thread(target=engine._index("face").sync)  # ...a thread catches up
        catch_up.start()
        catch_up.join()
        index = engine._index("face").sync()  # the query's own search
    assert len(index) == 6 and not builds


def test_no_face_and_bad_files_are_reported_not_fatal(make_engine, ten, tmp_path: Path) -> None:
    engine = make_engine()
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 127, np.uint8))
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    good = next(iter(ten.values()))[0]
    report = engine.enroll_many(
        [EnrollItem(blank, "x"), EnrollItem(junk, "y"), EnrollItem(good, "z")]
    )
    assert report.enrolled == 1
    reasons = {Path(s.source).name: s.reason for s in report.skipped}
    assert reasons["blank.png"].startswith("no face found")
    assert "junk.jpg" in reasons["junk.jpg"]
    with pytest.raises(NoFaceFound):
        engine.query(blank)
    with pytest.raises(NoFaceFound):
        engine.enroll(blank, identity="x")


@pytest.mark.stores("faiss")  # detection only: nothing store-specific
def test_group_photo_enrolls_most_prominent_or_all(make_engine) -> None:
    from tgfr_search.demo import sample_photos

    players = next(p for p in sample_photos() if p.name == "players.jpg")
    engine = make_engine()
    one = engine.enroll_many([EnrollItem(players, "team")])
    assert one.enrolled == 1 and one.multi_face[0][1] > 3
    engine2 = make_engine("all")
    every = engine2.enroll_many([EnrollItem(players, "team")], all_faces=True)
    assert every.enrolled == one.multi_face[0][1]
    assert engine.query(players).faces_found == one.multi_face[0][1]


def test_aligned_crops_skip_detection(make_engine, lfw: Path) -> None:
    people = sorted(p for p in (lfw / "aligned112").iterdir() if len(list(p.glob("*.jpg"))) >= 2)[
        :5
    ]
    engine = make_engine()
    report = engine.enroll_many(
        [EnrollItem(sorted(p.glob("*.jpg"))[0], p.name) for p in people], aligned=True
    )
    assert report.enrolled == 5
    probe = sorted(people[2].glob("*.jpg"))[1]
    assert engine.query(probe, aligned=True, k=1)[0].identity == people[2].name


@pytest.fixture
def new_decoders():
    """Decoding processes forked by this test's runs, not left by an earlier test's."""
    import tgfr_search.engine as engine_module

    engine_module._drop_spare()
    yield
    engine_module._drop_spare()


def _both_ways(make_engine, monkeypatch: pytest.MonkeyPatch, enroll, **patches):
    """(name, engine, what `enroll(engine)` returned) for a sequential run and one forced
    through the GPU pipeline on this CPU, with `patches` to the engine module for the latter."""
    import tgfr_search.engine as engine_module

    for name in ("sequential", "overlapped"):
        engine = make_engine(name)
        with monkeypatch.context() as m:
            if name == "overlapped":
                m.setattr(engine_module, "_overlaps", lambda models: True)
                for attr, value in patches.items():
                    m.setattr(engine_module, attr, value)
            got = enroll(engine)
        yield name, engine, got


@pytest.mark.stores("faiss")
def test_the_gpu_pipeline_stores_what_the_sequential_one_does(
    make_engine, lfw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new_decoders
) -> None:
    """The overlapped stages of a GPU run (forked processes decoding into shared memory, a
    writer thread), forced on the CPU: the same rows, crops, vectors and report as one stage
    after another."""
    import tgfr_search.engine as engine_module

    files = sorted((lfw / "aligned112").rglob("*.jpg"))[:30]
    photo = next(iter(sorted((lfw / "raw").rglob("*.jpg"))))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    pixels = cv2.imread(str(files[1]))
    pixels[0, 0] ^= 1
    items = [EnrollItem(f, f.parent.name, caption=f"photo {i}") for i, f in enumerate(files)]
    items[3:3] = [
        EnrollItem(files[0], "again"),  # a duplicate within the run
        EnrollItem(broken, "broken"),
        EnrollItem(photo, "not aligned"),  # 250x250: skipped
        EnrollItem(files[5].read_bytes() + b"x", "bytes", caption="bytes"),
        EnrollItem(pixels, "array", caption="an array"),
    ]
    started, start = [], engine_module._decode_processes
    # The parent has used OpenCV's thread pool before forking (a forked worker that touched
    # the pool's settings then hung).
    cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (1000, 1000))

    def processes(workers: int, arena):
        started.append(start(workers, arena))
        return started[-1]

    def enroll(engine):
        done = []
        report = engine.enroll_many(items, aligned=True, batch_size=4, progress=done.append)
        return report, sum(done)

    runs = {}
    for name, engine, (report, done) in _both_ways(
        make_engine, monkeypatch, enroll, _decode_processes=processes
    ):
        ids = sorted(report.face_ids)
        runs[name] = (
            report.enrolled,
            sorted((s.source, s.reason) for s in report.skipped),
            report.duplicates,
            done,
            engine.store.crops_of(ids),
            {i: (f.identity, f.caption) for i, f in engine.store.face_info(ids).items()},
            {
                s: engine.store.vectors_of(s, ids, dim=engine._index(s).dim)
                for s in engine._spaces()
            },
            [m.identity for m in engine.query(files[7], aligned=True, k=3)],
        )
    assert started and started[0] is not None, "no decoding processes ran"
    seq, ovl = runs["sequential"], runs["overlapped"]
    assert seq[0] == len(files) + 2 and seq[1:6] == ovl[1:6]
    assert len(seq[1]) == 2 and seq[2] == [str(files[0])] and seq[3] == len(items)
    assert seq[6].keys() == ovl[6].keys() and len(seq[6]) >= 3
    for space in seq[6]:
        # Stored as float16: the two runs batch differently (the GPU pipeline ramps up), and a
        # last-bit float32 difference can round to the neighbouring float16 (one ulp, 2**-11).
        assert np.allclose(seq[6][space], ovl[6][space], rtol=2**-10, atol=1e-5), space
    assert seq[7] == ovl[7] and seq[7][0] == files[7].parent.name


@pytest.mark.stores("faiss")
def test_a_gpu_run_leaves_its_decoding_processes_to_the_next_run(
    make_engine, lfw: Path, monkeypatch: pytest.MonkeyPatch, new_decoders
) -> None:
    """The next run, in another engine of the process, decodes in the processes the first one
    forked (its arena's pages given back in between) and stores the same faces; a run that
    fails shuts them down."""
    import tgfr_search.engine as engine_module

    monkeypatch.setattr(engine_module, "_overlaps", lambda models: True)
    files = sorted((lfw / "aligned112").rglob("*.jpg"))[:12]
    items = [EnrollItem(f, f.parent.name, caption=f"photo {i}") for i, f in enumerate(files)]
    stored = {}
    for name in ("first", "second"):
        engine = make_engine(name)
        ids = sorted(engine.enroll_many(items, aligned=True, batch_size=4).face_ids)
        stored[name] = (
            engine.store.crops_of(ids),
            engine.store.vectors_of("fused", ids, dim=engine._index("fused").dim),
        )
        if name == "first":
            kept = engine_module._spare
            assert kept is not None and kept.pool is not None
    assert engine_module._spare is kept
    (crops, fused), (crops2, fused2) = stored["first"], stored["second"]
    assert len(crops) == len(files) and crops == crops2 and np.array_equal(fused, fused2)

    def interrupt(done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_engine("third").enroll_many(items, aligned=True, batch_size=4, progress=interrupt)
    assert engine_module._spare is None and kept.pool._processes is None


@pytest.mark.stores("faiss")
def test_the_gpu_pipeline_enrolls_raw_photos_as_the_sequential_one_does(
    make_engine, ten, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raw photos are larger than an arena slot: their pixels come back through the pipe."""
    items = [
        EnrollItem(p, name, caption=f"{name}") for name, photos in ten.items() for p in photos[:2]
    ]
    runs = {}
    for name, engine, report in _both_ways(
        make_engine, monkeypatch, lambda engine: engine.enroll_many(items, batch_size=4)
    ):
        ids = sorted(report.face_ids)
        runs[name] = (
            report.enrolled,
            engine.store.crops_of(ids),
            engine.store.vectors_of("fused", ids, dim=engine._index("fused").dim),
        )
    (n, crops, fused), (n2, crops2, fused2) = runs["sequential"], runs["overlapped"]
    assert (
        n == n2 == len(items)
        and crops == crops2
        and np.allclose(fused, fused2, rtol=2**-10, atol=1e-5)
    )


@pytest.mark.stores("faiss")
def test_a_decoding_process_that_dies_stops_the_run_and_keeps_earlier_batches(
    make_engine, lfw: Path, monkeypatch: pytest.MonkeyPatch, new_decoders
) -> None:
    """A decoder that crashes on a hostile file (here: exits) takes its worker process down,
    not the engine: one clear error, and the batches before it stay stored."""
    import os

    import tgfr_search.engine as engine_module
    from tgfr_search import ImageError, images

    files = sorted((lfw / "aligned112").rglob("*.jpg"))[:20]
    poison = files[13]
    decode = images.decode

    def crashing(src, name, keep_bytes=0):
        if name == str(poison) and os.getpid() != parent:
            os._exit(1)  # a worker process: as a segfault in a decoder would end it
        return decode(src, name, keep_bytes)

    parent = os.getpid()
    monkeypatch.setattr(engine_module, "_overlaps", lambda models: True)
    monkeypatch.setattr(images, "decode", crashing)
    engine = make_engine()
    items = [EnrollItem(f, f.parent.name) for f in files]
    with pytest.raises(
        ImageError, match="a decoding process died .* batches before them are stored"
    ):
        engine.enroll_many(items, aligned=True, batch_size=4)
    # Batches of 1, 2, 4, 4 (the ramp), then 4 with the poisoned file: those before it, all
    # four, or three when the worker died while the fourth was still decoding.
    stored = engine.info()["faces"]
    assert stored in (7, 11)
    monkeypatch.undo()
    again = engine.enroll_many(items, aligned=True, batch_size=4)
    assert again.enrolled == len(files) - stored and len(again.duplicates) == stored


def test_filters_restrict_before_ranking(make_engine, ten) -> None:
    engine = make_engine()
    names = list(ten)
    engine.enroll_many(
        [
            EnrollItem(p[0], n, metadata={"camera": "north" if i % 2 else "south"})
            for i, (n, p) in enumerate(ten.items())
        ]
    )
    probe = ten[names[0]][1]  # a "south" person
    north = engine.query(probe, k=10, filters={"camera": "north"})
    assert len(north) == 5 and all(m.metadata["camera"] == "north" for m in north)
    assert engine.query(probe, k=1, filters={"identity": names[4]})[0].identity == names[4]


def test_model_mismatch_points_at_reindex(make_engine, ten, tmp_path: Path) -> None:
    engine = make_engine("mm")
    enroll_first(engine, ten)
    engine.store.set("fingerprint:face", "w600k_mbf:0000000000000000:other")
    reopened = make_engine("mm")
    with pytest.raises(ModelMismatch, match="tgfr-search .*reindex"):
        reopened.query(next(iter(ten.values()))[1])
    reopened.close()
    fixed = make_engine("mm", check_models=False)
    assert fixed.reindex() == 10
    fixed.close()
    again = make_engine("mm")
    name, photos = next(iter(ten.items()))
    assert again.query(photos[1], k=1)[0].identity == name
    again.close()


@pytest.mark.stores("faiss")  # its Milvus twin is in test_backends.py
def test_corrupt_index_file_is_rebuilt_with_a_warning(make_engine, ten, tmp_path: Path) -> None:
    from tgfr_search import SearchEngine

    engine = make_engine("c")
    enroll_first(engine, ten)
    (tmp_path / "c" / "index-face.faiss").write_bytes(b"garbage")
    reopened = SearchEngine(tmp_path / "c")
    name, photos = next(iter(ten.items()))
    assert reopened.query(photos[1], k=1)[0].identity == name
    assert any("rebuilt" in w for w in reopened.warnings)
    reopened.close()


@pytest.mark.stores("faiss")  # refused before any search
def test_modes_that_need_the_tgfr_model_say_so(make_engine, ten) -> None:
    engine = make_engine(tgfr=None)
    with pytest.raises(ModeUnavailable, match="TGFR model"):
        engine.query(next(iter(ten.values()))[0], caption="a man", mode="fused")
    with pytest.raises(ValueError, match="unknown mode"):
        engine.query(next(iter(ten.values()))[0], mode="nope")


@pytest.mark.stores("faiss")  # 1:1, no gallery
def test_verify_same_person_scores_higher(make_engine, ten) -> None:
    engine = make_engine()
    (a, b), (c, d) = [(p[0], p[1]) for p in list(ten.values())[:2]]
    same, other = engine.verify(a, b).score, engine.verify(a, c).score
    assert same > 0.3 > other


def test_every_mode_with_the_shipped_model(make_engine, ten) -> None:
    """The packaged TGFR checkpoint fills fused, aligned and caption vectors; auto picks."""
    names = list(ten)
    captioned = make_engine("captioned")
    items = [
        EnrollItem(p[0], n, caption=f"a {'man' if i % 2 else 'woman'} in photo {i}")
        for i, (n, p) in enumerate(ten.items())
    ]
    captioned.enroll_many(items)
    assert captioned.info()["spaces"] == ["face", "fused", "aligned"]  # caption weight 0
    probe = ten[names[3]][1]
    fused = captioned.query(probe, caption="a man in a photo", k=3)
    assert fused.mode == "fused" and fused[0].identity == names[3]
    assert set(fused[0].scores) == {"face", "text", "fused"}
    assert fused.threshold == captioned.threshold("fused") and fused[0].decision is True
    assert fused.quality is not None and fused.quality.norm > 0
    text = captioned.query(caption="a man in photo 3", mode="text", k=10)
    assert text.mode == "text" and len(text) == 10 and text.quality is None
    assert {m.identity for m in text} == set(names)
    assert all(m.decision in (True, False) for m in text)

    bare = make_engine("bare")  # mugshots without descriptions: refine serves the caption
    bare.enroll_many([EnrollItem(p[0], n) for n, p in ten.items()])
    image = bare.query(probe, k=10)
    refined = bare.query(probe, caption="a man in a photo", k=10)
    assert refined.mode == "refine" and refined[0].identity == names[3]
    assert {m.identity for m in refined} == {m.identity for m in image}
    assert set(refined[0].scores) == {"face", "text", "refine"}
    assert bare.query(caption="a man", mode="text", k=2).mode == "text"


def test_thresholds_are_calibrated_per_mode_and_far(make_engine) -> None:
    engine = make_engine()
    for mode in ("image", "fused", "refine", "text"):
        loose, default, strict = (engine.threshold(mode, f) for f in (1e-2, None, 1e-4))
        assert loose < default < strict
        assert default == engine.threshold(mode, 1e-3)
    with pytest.raises(ValueError, match="no threshold calibrated at FAR 0.05"):
        engine.threshold("image", 0.05)


def test_text_mode_reads_gallery_captions_when_the_model_weights_them(
    make_engine, ten, tmp_path: Path
) -> None:
    from tgfr_search.models.fusion import default_checkpoint
    from tgfr_search.models.tgfr import TGFR

    model = TGFR.load(default_checkpoint())
    model.summary["text"] = {"caption_weight": 1.0}
    model.save(tmp_path / "ckpt")
    engine = make_engine(tgfr=tmp_path / "ckpt")
    names = list(ten)
    engine.enroll_many(
        [EnrollItem(p[0], n, caption=f"person number {i}") for i, (n, p) in enumerate(ten.items())]
    )
    assert engine.info()["spaces"] == ["face", "fused", "aligned", "caption"]
    text = engine.query(caption="person number 4", mode="text", k=3)
    assert text.mode == "text" and text[0].identity == names[4]  # its own caption, word for word


def test_gpu_batches_ramp_up_to_the_batch_size() -> None:
    import tgfr_search.engine as engine_module

    sizes = [len(c) for c in engine_module._chunks(range(30), 8, ramp=3)]
    assert sizes == [1, 2, 4, 8, 8, 7]
    assert [len(c) for c in engine_module._chunks(range(9), 4)] == [4, 4, 1]


@pytest.mark.stores("faiss")
def test_enrollment_holds_off_the_collectors_full_passes(make_engine, ten) -> None:
    """During a run the collector's automatic passes wait (the young generations are collected
    per batch); afterwards it is on again, and a caller's own gc.disable() is kept."""
    import gc

    engine = make_engine()
    items = [EnrollItem(p[0], name) for name, p in ten.items()]
    during: list[bool] = []
    report = engine.enroll_many(
        items[:4], batch_size=2, progress=lambda n: during.append(gc.isenabled())
    )
    assert report.enrolled == 4 and during == [False, False] and gc.isenabled()
    gc.disable()
    try:
        assert engine.enroll_many(items[4:6]).enrolled == 2
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_pause_nests_and_survives_errors() -> None:
    import gc

    import tgfr_search.engine as engine_module

    with engine_module._young_collections_only():
        with engine_module._young_collections_only():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer run still holds it
    assert gc.isenabled()
    with pytest.raises(KeyError), engine_module._young_collections_only():
        raise KeyError("x")
    assert gc.isenabled()
