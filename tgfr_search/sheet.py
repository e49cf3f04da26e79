"""Contact sheets: the probe (and its caption), then the top matches with scores and decisions."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tgfr_search.errors import ImageError
from tgfr_search.images import load_image

TILE = 112
PAD = 8
TEXT_H = 64
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _label(
    canvas: np.ndarray, lines: list[str], x: int, y: int, color: tuple[int, int, int]
) -> None:
    for n, line in enumerate(lines):
        cv2.putText(canvas, line, (x, y + 14 * (n + 1)), FONT, 0.38, color, 1, cv2.LINE_AA)


def contact_sheet(
    probe: np.ndarray | None,
    caption: str | None,
    matches: Any,
    crops: dict[int, bytes],
    path: str | os.PathLike[str],
) -> Path:
    """Write a PNG: probe tile first, then one tile per match (identity, scores, decision)."""
    tiles = (1 if probe is not None or caption else 0) + len(matches)
    width = PAD + tiles * (TILE + PAD)
    height = PAD + TILE + TEXT_H + PAD + 28
    canvas = np.full((height, max(width, 360), 3), 255, np.uint8)
    x = PAD
    title = f"mode: {matches.mode}"
    if matches.threshold is not None:
        title += f"   threshold {matches.threshold:.3f}"
    _label(canvas, [title], PAD, 0, (0, 0, 0))
    top = 24
    if probe is not None or caption:
        if probe is not None:
            canvas[top : top + TILE, x : x + TILE] = cv2.resize(probe, (TILE, TILE))
        else:
            cv2.rectangle(canvas, (x, top), (x + TILE - 1, top + TILE - 1), (200, 200, 200), 1)
        words = textwrap.wrap(caption or "(no caption)", 18)[:4]
        _label(canvas, ["PROBE", *words], x, top + TILE, (90, 60, 0))
        x += TILE + PAD
    for m in matches:
        tile = _tile(crops.get(m.face_id))
        if tile is not None:
            canvas[top : top + TILE, x : x + TILE] = tile
        ok = m.decision
        color = (0, 140, 0) if ok else (0, 0, 200) if ok is False else (80, 80, 80)
        cv2.rectangle(canvas, (x - 2, top - 2), (x + TILE + 1, top + TILE + 1), color, 2)
        # The score the decision was taken on first, then the face score behind it.
        decisive = "face" if matches.mode == "image" else matches.mode
        order = sorted(m.scores, key=lambda k: (k != decisive, k != "face"))
        scores = [f"{k} {m.scores[k]:.3f}" for k in order][:2]
        verdict = "match" if ok else "no match" if ok is False else ""
        _label(canvas, [f"{m.rank}. {m.identity[:16]}", *scores, verdict], x, top + TILE, color)
        x += TILE + PAD
    out = Path(path)
    if not cv2.imwrite(str(out), canvas):
        raise OSError(f"cannot write {out}")
    return out


def _tile(crop: bytes | None) -> np.ndarray | None:
    """A stored crop as a TILE x TILE BGR tile, or None when it cannot be read."""
    if crop is None:
        return None
    try:
        image = load_image(crop, name="a stored crop")
    except ImageError:
        return None
    return image if image.shape[:2] == (TILE, TILE) else cv2.resize(image, (TILE, TILE))
