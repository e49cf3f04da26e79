"""Face detection and alignment, face and text encoders, and the registry loading them by name."""

from __future__ import annotations

from tgfr_search.models.detector import SCRFD, Detection, FaceDetector, align, align_many
from tgfr_search.models.face import ArcFaceONNX, FaceEncoder
from tgfr_search.models.registry import ModelPack, load_models
from tgfr_search.models.text import MiniLM, TextEncoder, TextEncoding

__all__ = [
    "SCRFD",
    "ArcFaceONNX",
    "Detection",
    "FaceDetector",
    "FaceEncoder",
    "MiniLM",
    "ModelPack",
    "TextEncoder",
    "TextEncoding",
    "align",
    "align_many",
    "load_models",
]
