"""The TGFR model as the engine uses it: vectors for the fused and aligned spaces, query scores.

The heads (`tgfr.py`) work on torch tensors of frozen features; this wraps them with the
frozen encoders (ArcFace with its region map, MiniLM) so the engine hands in crops and
captions and gets numpy vectors back.
"""

from __future__ import annotations

import importlib.resources
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tgfr_search.errors import ModelFileError
from tgfr_search.models._threads import few_threads

_RECENT = 64  # captions remembered between a query's two text encodings

FUSED = "fused"
ALIGNED = "aligned"
CAPTION = "caption"


def default_checkpoint() -> Path | None:
    """The TGFR checkpoint shipped inside the package, if this build has one."""
    folder = Path(str(importlib.resources.files("tgfr_search.weights")))
    return folder if (folder / "model.safetensors").is_file() else None


class TGFRRuntime:
    """Fused (face + caption) and aligned (caption <-> face) vectors from crops and captions.

    On CPU the recogniser runs on ONNX Runtime and the heads in float32 torch. On CUDA
    (`device="cuda"`, or "auto" where torch sees a GPU and the `gpu` extra is installed) the
    recogniser runs in fp16 through torch and the heads in float32 on the same GPU; features stay
    on the device until the finished vectors come back. The fingerprint is the same on both.
    """

    def __init__(
        self, checkpoint: str | Path, face: Any, text: Any, *, device: str = "auto"
    ) -> None:
        import torch

        from tgfr_search.models.regions import ArcFaceRegions
        from tgfr_search.models.tgfr import TGFR
        from tgfr_search.models.torch_onnx import resolve_device

        self.model = TGFR.load(checkpoint)
        fps = self.model.fingerprints
        expected = fps.get("face_global", fps.get("face"))  # "face" also names the region map
        if expected is not None and expected != face.fingerprint:
            raise ModelFileError(
                f"the TGFR checkpoint in {checkpoint} was trained on {expected}, "
                f"not on the loaded face model {face.fingerprint}"
            )
        self.device = resolve_device(device)
        if self.device == "cpu":
            self.regions = ArcFaceRegions(face.model_path, sha256=face.sha256)
        else:
            self.regions = ArcFaceRegions(face.model_path, sha256=face.sha256, device=self.device)
        self.text = text
        self._torch = torch
        cfg = self.model.config
        self.summary: dict[str, Any] = self.model.summary
        self.dims = {FUSED: cfg.fused_dim, ALIGNED: cfg.embed_dim}
        # Gallery captions in the aligned space serve text mode only where val gave them weight.
        if self.summary.get("text", {}).get("caption_weight", 0.0) > 0:
            self.dims[CAPTION] = cfg.embed_dim
        self.fingerprint = f"{self.model.fingerprint}|{text.fingerprint}"
        # A query encodes its caption in `embed` and again in `caption_vectors`: the second
        # one is served from here (one MiniLM forward saved).
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        self._recent_lock = threading.Lock()
        if self.device != "cpu":
            self.model.to(self.device)  # after the fingerprint, which hashes the CPU weights

    def tokenize(self, captions: Sequence[str | None]) -> Any:
        """Captions tokenised ahead of `embed(..., ready=)` (None: this text encoder cannot)."""
        tokenize = getattr(self.text, "tokenize", None)
        return None if tokenize is None else tokenize(_texts(captions))

    def _text_parts(self, captions: Sequence[str], ready: Any = None) -> dict[str, Any]:
        if self.device != "cpu":
            parts = self._text_parts_on_device(captions, ready)
        else:
            enc = self._encode(captions, ready)
            t = self._torch
            parts = self.model.encode_text(
                t.from_numpy(enc.tokens), t.from_numpy(enc.mask), t.from_numpy(enc.sentence)
            )
        self._remember(captions, parts["sentence"])
        return parts

    def _remember(self, captions: Sequence[str], sentence: Any) -> None:
        """Keep the aligned-space vectors of the last few small caption batches."""
        if len(captions) > _RECENT:
            return
        rows = sentence.detach().float().cpu().numpy()
        with self._recent_lock:
            for caption, row in zip(captions, rows):
                self._recent[caption] = row
                self._recent.move_to_end(caption)
            while len(self._recent) > _RECENT:
                self._recent.popitem(last=False)

    def _encode(self, captions: Sequence[str], ready: Any) -> Any:
        if ready is None:
            return self.text.encode(list(captions))
        return self.text.encode(list(captions), ready=ready)

    def _text_parts_on_device(self, captions: Sequence[str], ready: Any = None) -> dict[str, Any]:
        t = self._torch
        words = self.model.config.use_regions  # the global-only heads read sentence vectors alone
        if hasattr(self.text, "encode_tensors"):
            tokens, mask, sentence = self.text.encode_tensors(
                list(captions), tokens=words, ready=ready
            )
        else:
            enc = self._encode(captions, ready)
            tokens, mask, sentence = (t.from_numpy(x) for x in (enc.tokens, enc.mask, enc.sentence))
        with t.inference_mode():
            return self.model.encode_text(
                None if tokens is None else tokens.to(self.device),
                mask.to(self.device),
                sentence.to(self.device),
            )

    def embed(
        self, crops: Sequence[np.ndarray], captions: Sequence[str | None], ready: Any = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Vectors of every space for aligned crops and their captions (None: no caption).

        Returns ({"face": (N,512), "fused": (N,D), "aligned": (N,256), "caption": (N,256)},
        ArcFace norms (N,)): "aligned" is the face and "caption" its caption (zero without one)
        in the caption <-> face space. `ready`: the captions as `tokenize` made them ahead.
        """
        t = self._torch
        if self.device != "cpu":
            return self._embed_on_device(crops, captions, ready)
        globals_, norms, regions = self.regions.embed_full(crops)
        with t.inference_mode(), few_threads(len(crops)):
            image = self.model.encode_image(
                t.from_numpy(globals_), t.from_numpy(norms), t.from_numpy(regions)
            )
            texts = _texts(captions)
            # Each distinct caption is encoded once (a gallery without captions: just "").
            distinct = sorted(set(texts))
            pos = {x: i for i, x in enumerate(distinct)}
            where = t.tensor([pos[x] for x in texts])
            text = {k: v[where] for k, v in self._text_parts(distinct, ready).items()}
            has_text = t.tensor([bool(x) for x in texts])
            fused = self.model.fuse(image, text, has_text=has_text)
            caption = text["sentence"] * has_text[:, None].to(text["sentence"].dtype)
        out = {
            "face": globals_,
            FUSED: fused.numpy(),
            ALIGNED: image["global"].numpy(),
            CAPTION: caption.numpy(),
        }
        return {k: v for k, v in out.items() if k == "face" or k in self.dims}, norms

    def _embed_on_device(
        self, crops: Sequence[np.ndarray], captions: Sequence[str | None], ready: Any = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """`embed` on the GPU: one copy back per space, the region map only where used."""
        out, norms = self._on_device(crops, captions, ready)
        return {k: v.cpu().numpy() for k, v in out.items()}, norms.cpu().numpy()

    def _on_device(
        self, crops: Sequence[np.ndarray], captions: Sequence[str | None], ready: Any
    ) -> tuple[dict[str, Any], Any]:
        """The vectors of every space and the norms as tensors on the GPU, maybe not done yet.

        The captions go first: MiniLM waits for the GPU (transformers checks its padding
        mask), so the recogniser's batch is queued after it and runs while the caller goes on.
        """
        t = self._torch
        texts = _texts(captions)
        distinct = sorted(set(texts))
        pos = {x: i for i, x in enumerate(distinct)}
        text_parts = self._text_parts(distinct, ready)
        # From pinned memory without waiting: a plain copy to the device would wait for the
        # recogniser queued below, and with it this thread.
        where = t.tensor([pos[x] for x in texts]).pin_memory().to(self.device, non_blocking=True)
        has_text = t.tensor([bool(x) for x in texts]).pin_memory()
        has_text = has_text.to(self.device, non_blocking=True)
        needs = self.model.config.needs_regions
        globals_, norms, regions = self.regions.embed_full_tensors(crops, regions=needs)
        with t.inference_mode():
            image = self.model.encode_image(globals_, norms, regions)
            text = {k: v[where] for k, v in text_parts.items()}
            fused = self.model.fuse(image, text, has_text=has_text)
            out = {"face": globals_, FUSED: fused, ALIGNED: image["global"]}
            if CAPTION in self.dims:
                out[CAPTION] = text["sentence"] * has_text[:, None].to(text["sentence"].dtype)
            return out, norms

    def embed_later(
        self, crops: Sequence[np.ndarray], captions: Sequence[str | None], ready: Any = None
    ) -> Callable[[], dict[str, np.ndarray]]:
        """`embed`'s vectors rounded to float16 (as the store keeps them), without waiting.

        On a GPU the work and the copies back are queued and this returns at once; calling the
        result (from any thread) waits for this batch alone. Enrollment prepares the next batch
        meanwhile. On the CPU the vectors are computed before it returns.
        """
        t = self._torch
        if self.device == "cpu":
            vectors, _ = self.embed(crops, captions, ready)
            half = {k: t.from_numpy(v).half().numpy() for k, v in vectors.items()}
            return lambda: half
        out, _ = self._on_device(crops, captions, ready)
        with t.inference_mode():
            # Non-blocking copies to the host land in pinned memory; the event marks them done.
            host = {k: v.half().to("cpu", non_blocking=True) for k, v in out.items()}
            done = t.cuda.Event()
            done.record()

        def result() -> dict[str, np.ndarray]:
            done.synchronize()
            return {k: v.numpy() for k, v in host.items()}

        return result

    def caption_vectors(self, captions: Sequence[str]) -> np.ndarray:
        """Captions in the aligned space: their inner product with a face's aligned vector."""
        with self._recent_lock:
            known = [self._recent.get(c) for c in captions]
        if captions and all(v is not None for v in known):
            return np.stack(known)  # type: ignore[arg-type]
        with self._torch.inference_mode(), few_threads(len(captions), self.device):
            return self._text_parts(captions)["sentence"].cpu().numpy()


def _texts(captions: Sequence[str | None]) -> list[str]:
    """Captions as the text encoder gets them: a missing or blank one is ""."""
    return [c if c and c.strip() else "" for c in captions]
