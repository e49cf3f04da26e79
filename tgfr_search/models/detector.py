"""Face detection (SCRFD over ONNX Runtime, batched) and ArcFace 5-point alignment."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import onnxruntime

    from tgfr_search.models.torch_onnx import TorchGraph

__all__ = ["ARCFACE_TEMPLATE", "SCRFD", "Detection", "FaceDetector", "align", "align_many"]

# The 5-point template ArcFace models were trained on (eyes, nose tip, mouth corners) in 112x112.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected face: box (x1, y1, x2, y2) and 5 landmarks in original image pixels."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        """Box area in pixels, the measure of prominence detections are sorted by."""
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


@runtime_checkable
class FaceDetector(Protocol):
    """Finds faces in BGR uint8 images; one list per image, most prominent face first."""

    @property
    def name(self) -> str: ...
    @property
    def fingerprint(self) -> str:
        """Model file hash plus the settings that change detections; stored with the vectors."""
        ...

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]: ...


class SCRFD:
    """SCRFD with 5 landmarks (insightface's 'bnkps' models), run in batches on ONNX Runtime.

    Each image is resized so its long side is `min(max_size, max(long_side, min_size))`, then
    padded to a multiple of 32; images of one padded size share a call. Batches stay small by
    default: on CPU, 4 images at 320x320 per call beat both 1 and 16 (cache, again). With
    `device="cuda"` the network runs through torch in fp16 (32 images a call); decoding, NMS
    and alignment stay on the CPU.
    """

    strides = (8, 16, 32)
    anchors_per_location = 2
    input_mean = 127.5
    input_std = 128.0

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        threshold: float = 0.5,
        nms_threshold: float = 0.4,
        max_size: int = 640,
        min_size: int = 320,
        batch_size: int | None = None,
        threads: int | None = None,
        name: str | None = None,
        sha256: str | None = None,
        device: str = "cpu",
    ) -> None:
        from tgfr_search.models.registry import file_sha256, make_session
        from tgfr_search.models.torch_onnx import resolve_device

        if min_size > max_size:
            raise ValueError(f"min_size {min_size} is above max_size {max_size}")
        self.model_path = Path(model_path)
        self.threshold = float(threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_size = int(max_size)
        self.min_size = int(min_size)
        self.device = resolve_device(device)
        if batch_size is None:
            batch_size = 4 if self.device == "cpu" else 32
        self.batch_size = max(1, int(batch_size))
        self.name = name or self.model_path.stem
        self.sha256 = sha256 or file_sha256(self.model_path)
        self._graph: TorchGraph | None = None
        if self.device == "cpu":
            self.session: onnxruntime.InferenceSession | None = make_session(
                self.model_path, threads
            )
            self.input_name = self.session.get_inputs()[0].name
            outputs = [o.name for o in self.session.get_outputs()]
        else:
            import onnx

            from tgfr_search.models.torch_onnx import TorchGraph

            proto = onnx.load(str(self.model_path))
            self.session = None
            self._graph = TorchGraph(proto, self.device)
            weights = {init.name for init in proto.graph.initializer}
            self.input_name = next(v.name for v in proto.graph.input if v.name not in weights)
            outputs = list(self._graph.output_names)
        if len(outputs) != 9:
            raise ValueError(
                f"{self.model_path.name} is not an SCRFD model with landmarks "
                f"(9 outputs expected, found {len(outputs)})"
            )
        # Named exports (score_8, bbox_16, kps_32, ...) are ordered by name; the buffalo packs'
        # numbered outputs follow insightface's positional order: scores, boxes, landmarks.
        named = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in self.strides]
        self.output_names = named if set(named) == set(outputs) else outputs
        self._centers: dict[tuple[int, int], list[np.ndarray]] = {}
        config = {
            "threshold": self.threshold,
            "nms": self.nms_threshold,
            "max_size": self.max_size,
            "min_size": self.min_size,
            "mean": self.input_mean,
            "std": self.input_std,
        }
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        self.fingerprint = f"{self.name}:{self.sha256[:16]}:{digest}"

    def __repr__(self) -> str:
        return f"SCRFD({self.model_path.name!r}, fingerprint={self.fingerprint!r})"

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Return the (height, width) an image is resized to before padding to a multiple of 32."""
        long_side = max(height, width)
        target = min(self.max_size, max(long_side, self.min_size))
        # Same rounding as insightface's letterboxing, so detections match theirs.
        if height > width:
            return target, max(1, int(target / (height / width)))
        return max(1, int(target * (height / width))), target

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detect faces in each image; images of one padded size share an ONNX Runtime call."""
        import cv2

        prepared: list[tuple[np.ndarray, float, float]] = []
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"image {i}: expected a BGR uint8 HxWx3 array, got {image.dtype} {image.shape}"
                )
            h, w = image.shape[:2]
            new_h, new_w = self.target_size(h, w)
            resized = image if (new_h, new_w) == (h, w) else cv2.resize(image, (new_w, new_h))
            prepared.append((resized, new_w / w, new_h / h))
            padded = (-(-new_h // 32) * 32, -(-new_w // 32) * 32)
            groups.setdefault(padded, []).append(i)

        results: list[list[Detection]] = [[] for _ in images]
        for (pad_h, pad_w), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                canvas = np.zeros((len(chunk), pad_h, pad_w, 3), dtype=np.uint8)
                for slot, i in enumerate(chunk):
                    resized = prepared[i][0]
                    canvas[slot, : resized.shape[0], : resized.shape[1]] = resized
                # Pad with black before normalising, as insightface does: the network saw that.
                blob = cv2.dnn.blobFromImages(
                    list(canvas),
                    1.0 / self.input_std,
                    (pad_w, pad_h),
                    (self.input_mean, self.input_mean, self.input_mean),
                    swapRB=True,
                )
                outs = self._run(blob)
                for slot, i in enumerate(chunk):
                    _, scale_x, scale_y = prepared[i]
                    results[i] = self._decode(outs, slot, pad_h, pad_w, scale_x, scale_y)
        return results

    def _run(self, blob: np.ndarray) -> list[np.ndarray]:
        """The network's outputs for a blob, in `output_names` order, as float32 arrays."""
        if self._graph is None:
            assert self.session is not None
            return self.session.run(self.output_names, {self.input_name: blob})
        import torch

        result = self._graph(torch.from_numpy(blob).to(self._graph.device))
        where = [self._graph.output_names.index(name) for name in self.output_names]
        return [result[i].float().cpu().numpy() for i in where]

    def _anchor_centers(self, pad_h: int, pad_w: int) -> list[np.ndarray]:
        key = (pad_h, pad_w)
        if key not in self._centers:
            centers = []
            for stride in self.strides:
                gh, gw = pad_h // stride, pad_w // stride
                xs, ys = np.meshgrid(np.arange(gw), np.arange(gh))
                grid = np.stack([xs, ys], axis=-1).astype(np.float32)
                grid = (grid * stride).reshape(-1, 2)
                centers.append(np.repeat(grid, self.anchors_per_location, axis=0))
            self._centers[key] = centers
        return self._centers[key]

    def _decode(
        self,
        outs: list[np.ndarray],
        slot: int,
        pad_h: int,
        pad_w: int,
        scale_x: float,
        scale_y: float,
    ) -> list[Detection]:
        n = len(self.strides)
        scores_l, boxes_l, kps_l = [], [], []
        for level, (stride, centers) in enumerate(
            zip(self.strides, self._anchor_centers(pad_h, pad_w), strict=True)
        ):
            scores = outs[level][slot, :, 0]
            keep = np.nonzero(scores >= self.threshold)[0]
            if keep.size == 0:
                continue
            c = centers[keep]
            dist = outs[n + level][slot, keep] * stride
            kps = outs[2 * n + level][slot, keep] * stride
            boxes_l.append(np.concatenate([c - dist[:, :2], c + dist[:, 2:]], axis=1))
            kps_l.append(kps.reshape(-1, 5, 2) + c[:, None, :])
            scores_l.append(scores[keep])
        if not scores_l:
            return []
        scores = np.concatenate(scores_l)
        boxes = np.concatenate(boxes_l)
        kps = np.concatenate(kps_l)
        keep_idx = _nms(boxes, scores, self.nms_threshold)
        scale = np.array([scale_x, scale_y], dtype=np.float32)
        boxes = (boxes[keep_idx].reshape(-1, 2, 2) / scale).reshape(-1, 4).astype(np.float32)
        kps = (kps[keep_idx] / scale).astype(np.float32)
        scores = scores[keep_idx]
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        order = np.argsort(-areas, kind="stable")
        return [Detection(box=boxes[j], score=float(scores[j]), landmarks=kps[j]) for j in order]


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS exactly as insightface's SCRFD.nms (with its +1 pixel areas)."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter)
        order = rest[overlap <= threshold]
    return keep


def _similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama 1991), the estimate skimage makes for norm_crop."""
    src = src.astype(np.float64)
    dst = dst.astype(np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1.0
    u, s, vt = np.linalg.svd(cov)
    rank = int(np.count_nonzero(s > s.max() * 2 * np.finfo(float).eps))
    if rank == 1:
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            rot = u @ vt
        else:
            d_last, d[1] = d[1], -1.0
            rot = u @ np.diag(d) @ vt
            d[1] = d_last
    else:
        rot = u @ np.diag(d) @ vt
    var = src_c.var(axis=0).sum()
    scale = (s @ d) / var if var > 0 else 1.0
    m = np.empty((2, 3))
    m[:, :2] = rot * scale
    m[:, 2] = dst_mean - scale * (rot @ src_mean)
    return m


def align(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp the face onto the ArcFace 5-point template; the same crop as insightface's norm_crop."""
    import cv2

    if size % 112 == 0:
        dst = ARCFACE_TEMPLATE * (size / 112.0)
    elif size % 128 == 0:
        dst = ARCFACE_TEMPLATE * (size / 128.0)
        dst[:, 0] += 8.0 * size / 128.0
    else:
        raise ValueError(f"crop size must be a multiple of 112 or 128, got {size}")
    points = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    matrix = _similarity_transform(points, dst)
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def align_many(
    image: np.ndarray, detections: Sequence[Detection], size: int = 112
) -> list[np.ndarray]:
    """Aligned crops for each detection of one image, in the same order."""
    return [align(image, d.landmarks, size) for d in detections]
