"""The CUDA backend (fp16 through torch) against the fp32 ONNX Runtime backend, on real LFW faces.

Each check holds GPU vectors to within 1e-3 cosine of the CPU ones (issue 5) and the two
backends to one fingerprint, so a gallery enrolled on a GPU can be searched on a CPU.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from tgfr_search.models.torch_onnx import cuda_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_available(), reason="needs CUDA (torch sees no GPU)"),
    pytest.mark.skipif(
        importlib.util.find_spec("onnx2torch") is None,
        reason="needs onnx2torch: pip install 'tgfr-search[gpu]'",
    ),
]

LFW = Path(
    os.environ.get("TGFR_LFW", Path(__file__).resolve().parents[1].parent / "shared/datasets/lfw")
)
COSINE_TOL = 1e-3
CAPTIONS = [
    "A young man with short black hair and a beard.",
    "She is an older woman with grey hair, wearing eyeglasses.",
    "A smiling person with blond wavy hair.",
    None,
    "This bald man has a double chin and bushy eyebrows.",
    "",
]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(na * nb, 1e-12)


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    import cv2

    files = sorted((LFW / "aligned112").glob("*/*.jpg"))[:300]
    if not files:
        pytest.skip(f"LFW aligned crops not found under {LFW} (set TGFR_LFW)")
    return [cv2.imread(str(f)) for f in files]


@pytest.fixture(scope="module")
def packs():
    from tgfr_search.models import load_models

    return load_models(device="cpu"), load_models(device="cuda")


def test_auto_picks_cuda() -> None:
    from tgfr_search.models.torch_onnx import resolve_device

    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu"


def test_face_globals_match_onnxruntime(packs, crops) -> None:
    cpu, gpu = packs
    assert gpu.face.device == "cuda" and cpu.face.session is not None
    assert gpu.face.fingerprint == cpu.face.fingerprint
    ref, got = cpu.face.embed(crops), gpu.face.embed(crops)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (1 - _cosines(got, ref)).max() <= COSINE_TOL
    # Batches of one and a ragged tail give the same vectors as one large batch (300 and 257
    # crops run padded to 512, one crop alone).
    assert (1 - _cosines(gpu.face.embed(crops[:1]), got[:1])).max() <= 1e-4
    assert (1 - _cosines(gpu.face.embed(crops[:257]), got[:257])).max() <= 1e-4


def test_regions_match_onnxruntime(crops) -> None:
    from tgfr_search.models.regions import ArcFaceRegions

    cpu, gpu = ArcFaceRegions(), ArcFaceRegions(device="cuda")
    assert gpu.fingerprint == cpu.fingerprint
    e_ref, n_ref, r_ref = cpu.embed_full(crops[:64])
    e_got, n_got, r_got = gpu.embed_full(crops[:64])
    assert (1 - _cosines(e_got, e_ref)).max() <= COSINE_TOL
    assert np.abs(n_got / n_ref - 1).max() <= 1e-2
    assert r_got.shape == r_ref.shape
    assert (1 - _cosines(r_got, r_ref)).mean() <= COSINE_TOL


def test_fused_and_aligned_match_cpu(packs, crops) -> None:
    from tgfr_search.models.fusion import TGFRRuntime, default_checkpoint

    checkpoint = default_checkpoint()
    if checkpoint is None:
        pytest.skip("this build ships no TGFR checkpoint")
    cpu_pack, gpu_pack = packs
    cpu = TGFRRuntime(checkpoint, cpu_pack.face, cpu_pack.text, device="cpu")
    gpu = TGFRRuntime(checkpoint, gpu_pack.face, gpu_pack.text, device="cuda")
    assert gpu.fingerprint == cpu.fingerprint
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(len(crops))]
    ref, ref_norms = cpu.embed(crops, captions)
    got, got_norms = gpu.embed(crops, captions)
    assert set(got) == set(ref)
    for space, vectors in ref.items():
        assert got[space].shape == vectors.shape and got[space].dtype == np.float32, space
        real = np.linalg.norm(vectors, axis=1) > 0  # caption vectors are zero without one
        assert (np.linalg.norm(got[space], axis=1) > 0).tolist() == real.tolist(), space
        assert (1 - _cosines(got[space][real], vectors[real])).max() <= COSINE_TOL, space
    assert np.abs(got_norms / ref_norms - 1).max() <= 1e-2
    ahead, _ = gpu.embed(crops, captions, gpu.tokenize(captions + ["another caption"]))
    for space, vectors in got.items():  # captions tokenised ahead, as GPU enrollment does
        np.testing.assert_array_equal(ahead[space], vectors, err_msg=space)
    later = gpu.embed_later(crops, captions, gpu.tokenize(captions))()  # float16, not waited for
    assert set(later) == set(got)
    for space, vectors in got.items():
        assert later[space].dtype == np.float16, space
        assert np.abs(later[space].astype(np.float32) - vectors).max() <= 1e-3, space
    texts = ["a man with a moustache", "an old woman"]
    assert (1 - _cosines(gpu.caption_vectors(texts), cpu.caption_vectors(texts))).max() <= (
        COSINE_TOL
    )


def test_detector_matches_onnxruntime(packs) -> None:
    import cv2

    files = sorted((LFW / "raw").glob("*/*.jpg"))[:48]
    if not files:
        pytest.skip(f"LFW raw photos not found under {LFW}")
    images = [cv2.imread(str(f)) for f in files]
    cpu, gpu = packs
    assert gpu.detector.fingerprint == cpu.detector.fingerprint
    ref, got = cpu.detector.detect(images), gpu.detector.detect(images)
    for r, g in zip(ref, got):
        assert len(g) >= 1 and len(r) >= 1
        # The most prominent face: same place to within a pixel or two of a 250x250 photo.
        assert np.abs(g[0].box - r[0].box).max() <= 2.0
        assert np.abs(g[0].landmarks - r[0].landmarks).max() <= 2.0


def test_gallery_enrolled_on_gpu_is_searched_on_cpu(tmp_path: Path, crops) -> None:
    from tgfr_search import EnrollItem, SearchEngine

    files = sorted((LFW / "aligned112").glob("*/*.jpg"))[:60]
    items = [
        EnrollItem(f, f.parent.name, caption=CAPTIONS[i % len(CAPTIONS)])
        for i, f in enumerate(files)
    ]
    with SearchEngine(tmp_path / "db", device="cuda") as engine:
        report = engine.enroll_many(items, aligned=True)
        assert report.enrolled == len(files)
    with SearchEngine(tmp_path / "db", device="cpu") as engine:  # no ModelMismatch
        for i in (0, 17, 42):
            hit = engine.query(files[i], aligned=True, mode="image", k=1)[0]
            assert hit.identity == files[i].parent.name and hit.score > 0.999
