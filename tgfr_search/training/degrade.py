"""Low-quality face images: the fixed evaluation protocol and random training augmentation."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np

__all__ = ["LEVELS", "degrade", "random_degrade"]

#: Protocol levels: (downscale size S in pixels, Gaussian blur sigma, noise std on a 0..1 scale).
LEVELS: dict[int, tuple[int, float, float]] = {
    1: (32, 0.8, 0.02),
    2: (24, 1.2, 0.04),
    3: (16, 1.6, 0.06),
}

_SIZE = 112

# Ranges for random_degrade. They cover the protocol (S 16..32, sigma 0.8..1.6, noise
# 0.02..0.06) and reach past its hardest level, so a model trained on them does not meet
# level 3 at the edge of what it has seen.
SIGMA_RANGE = (0.0, 2.4)  # uniform; below 0.3 the blur is skipped as invisible
SIZE_RANGE = (12, 112)  # log-uniform, so ~45% of draws fall in the protocol's 12..32 band
NOISE_RANGE = (0.0, 0.09)  # uniform std on a 0..1 scale
JPEG_PROB, JPEG_QUALITY = 0.5, (20, 95)  # CCTV and web photos are mostly JPEG re-encoded
GRAY_PROB = 0.1  # some cameras and archives only hold grayscale


def degrade(img: np.ndarray, level: int, relative_path: str) -> np.ndarray:
    """Degrade an aligned 112x112 BGR uint8 crop to a protocol level, deterministically.

    `relative_path` (`<Person>/<file>.jpg`) seeds the noise, so every run and every machine
    produces the same probe for the same image and level; level 0 returns `img` unchanged.
    """
    if level == 0:
        return img
    if level not in LEVELS:
        raise ValueError(f"degradation level must be 0 or one of {sorted(LEVELS)}, not {level!r}")
    size, sigma, noise = LEVELS[level]
    rng = np.random.default_rng(int(hashlib.md5(relative_path.encode()).hexdigest()[:8], 16))
    x = cv2.GaussianBlur(img, (0, 0), sigma)
    x = cv2.resize(
        cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA),
        (_SIZE, _SIZE),
        interpolation=cv2.INTER_LINEAR,
    )
    x = x.astype(np.float32) / 255 + rng.normal(0, noise, x.shape)
    # Truncation (not rounding) is part of the protocol: changing it would move every probe.
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def random_degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply a random blur, downscale, noise, optional JPEG and optional grayscale (training).

    Returns a uint8 image of the same shape as `img`; the ranges are the module constants.
    """
    h, w = img.shape[:2]
    x = img
    sigma = rng.uniform(*SIGMA_RANGE)
    if sigma >= 0.3:
        x = cv2.GaussianBlur(x, (0, 0), sigma)
    size = int(round(np.exp(rng.uniform(np.log(SIZE_RANGE[0]), np.log(SIZE_RANGE[1])))))
    if size < min(h, w):
        # Varying the interpolations keeps the model from learning one resampler's artefacts.
        down = (cv2.INTER_AREA, cv2.INTER_LINEAR, cv2.INTER_CUBIC)[rng.integers(3)]
        up = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_NEAREST)[rng.integers(3)]
        small = cv2.resize(x, (max(1, size * w // h), size), interpolation=down)
        x = cv2.resize(small, (w, h), interpolation=up)
    noise = rng.uniform(*NOISE_RANGE)
    x = x.astype(np.float32) / 255 + rng.normal(0, noise, x.shape)
    x = (np.clip(x, 0, 1) * 255).astype(np.uint8)
    if rng.random() < JPEG_PROB:
        quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        ok, buf = cv2.imencode(".jpg", x, [cv2.IMWRITE_JPEG_QUALITY, quality])
        decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else None
        if decoded is not None:
            x = decoded.reshape(x.shape)
    if rng.random() < GRAY_PROB and x.ndim == 3 and x.shape[2] == 3:
        x = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(x)
