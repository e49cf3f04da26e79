"""Text encoders: word-level hidden states and a sentence vector for each description."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from tgfr_search.models._threads import few_threads

if TYPE_CHECKING:
    import torch

__all__ = ["MiniLM", "TextEncoder", "TextEncoding"]

# Tokenising a pathological multi-megabyte string costs seconds; far fewer characters than this
# already fill max_length tokens for any real description.
_CHARS_PER_TOKEN_CAP = 200


@dataclass
class TextEncoding:
    """Encoder output for N texts: per-token states, their mask, and unit sentence vectors."""

    tokens: np.ndarray
    """(N, L, dim) float32 last hidden states, padded to the longest text."""
    mask: np.ndarray
    """(N, L) bool, True on real tokens (including [CLS] and [SEP])."""
    sentence: np.ndarray
    """(N, dim) float32 mean of the masked tokens, L2-normalised."""


@runtime_checkable
class TextEncoder(Protocol):
    """Encodes descriptions into token states and sentence vectors."""

    @property
    def name(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> TextEncoding: ...


class MiniLM:
    """A BERT-family sentence encoder from a local folder (all-MiniLM-L6-v2 by default).

    torch and transformers are imported on the first `encode`, not when this module is. On a
    CUDA device the weights run in fp16 (`half=None` means: fp16 on CUDA, float32 on CPU);
    pooling and normalisation stay in float32.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        max_length: int = 64,
        batch_size: int | None = None,
        device: str = "cpu",
        half: bool | None = None,
        name: str = "minilm",
    ) -> None:
        self.model_dir = Path(model_dir)
        config_path = self.model_dir / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            from tgfr_search.errors import ModelFileError

            raise ModelFileError(f"cannot read text model config {config_path}: {exc}") from None
        self.dim = int(config["hidden_size"])
        self.max_length = int(max_length)
        on_gpu = device != "cpu"
        self.batch_size = max(1, int(batch_size or (1024 if on_gpu else 64)))
        self.device = device
        self.half = on_gpu if half is None else bool(half)
        self.name = name
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MiniLM({str(self.model_dir)!r}, max_length={self.max_length})"

    @cached_property
    def fingerprint(self) -> str:
        """`name:weights-sha256:config-hash`; hashing the weights is deferred to first use."""
        from tgfr_search.models.registry import file_sha256

        files = sorted(
            p
            for p in self.model_dir.iterdir()
            if p.suffix in (".safetensors", ".bin")
            or p.name in ("vocab.txt", "tokenizer.json", "config.json")
        )
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
        config = {"max_length": self.max_length, "pooling": "mean", "l2": True}
        cfg = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.name}:{digest.hexdigest()[:16]}:{cfg}"

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                from transformers import AutoModel, AutoTokenizer
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()  # a local load needs no "Loading weights" bar
                tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
                model = AutoModel.from_pretrained(self.model_dir, local_files_only=True)
                model.eval().to(self.device)
                if self.half:
                    model.half()
                self._tokenizer, self._model = tokenizer, model
        return self._tokenizer, self._model

    def encode_tensors(
        self, texts: Sequence[str], *, tokens: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """`encode` as float32 tensors left on the device: (tokens or None, mask, sentence).

        `tokens=False` skips the per-token states (N x L x dim floats) for callers that need the
        sentence vectors alone.
        """
        import torch

        if isinstance(texts, str):
            texts = [texts]
        clean = [_sanitise(t, self.max_length * _CHARS_PER_TOKEN_CAP) for t in texts]
        if not clean:
            return (
                torch.zeros((0, 0, self.dim), device=self.device) if tokens else None,
                torch.zeros((0, 0), dtype=torch.bool, device=self.device),
                torch.zeros((0, self.dim), device=self.device),
            )
        tokenizer, model = self._load()
        batch = tokenizer(
            clean, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        states, pooled_parts = [], []
        with torch.inference_mode():
            for start in range(0, len(clean), self.batch_size):
                part = {k: v[start : start + self.batch_size] for k, v in batch.items()}
                hidden = model(**part).last_hidden_state.float()
                mask = part["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled_parts.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
                if tokens:
                    states.append(hidden * mask)
        mask_t = batch["attention_mask"].bool()
        return (torch.cat(states) if tokens else None), mask_t, torch.cat(pooled_parts)

    def encode(self, texts: Sequence[str]) -> TextEncoding:
        """Encode texts; long ones are truncated to `max_length` tokens, empty ones are fine."""
        if self.device != "cpu":
            states, mask_t, sentence_t = self.encode_tensors(texts)
            assert states is not None
            return TextEncoding(
                tokens=states.cpu().numpy(),
                mask=mask_t.cpu().numpy(),
                sentence=sentence_t.cpu().numpy(),
            )

        if isinstance(texts, str):
            texts = [texts]
        clean = [_sanitise(t, self.max_length * _CHARS_PER_TOKEN_CAP) for t in texts]
        if not clean:
            empty = np.zeros((0, self.dim), dtype=np.float32)
            return TextEncoding(
                tokens=np.zeros((0, 0, self.dim), dtype=np.float32),
                mask=np.zeros((0, 0), dtype=bool),
                sentence=empty,
            )
        tokenizer, model = self._load()
        with few_threads(len(clean)):
            return self._encode_cpu(tokenizer, model, clean)

    def _encode_cpu(self, tokenizer: Any, model: Any, clean: list[str]) -> TextEncoding:
        import torch

        batch = tokenizer(
            clean,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        n, length = batch["input_ids"].shape
        tokens = np.empty((n, length, self.dim), dtype=np.float32)
        sentence = np.empty((n, self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                part = {
                    k: v[start : start + self.batch_size].to(self.device) for k, v in batch.items()
                }
                hidden = model(**part).last_hidden_state.float()
                mask = part["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                # Pooling as sentence-transformers' all-MiniLM-L6-v2: masked mean, then unit norm.
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                tokens[start : start + len(hidden)] = hidden.cpu().numpy()
                sentence[start : start + len(hidden)] = pooled.cpu().numpy()
        mask_np = batch["attention_mask"].numpy().astype(bool)
        tokens[~mask_np] = 0.0
        return TextEncoding(tokens=tokens, mask=mask_np, sentence=sentence)


def _sanitise(text: str, max_chars: int) -> str:
    """Make any str safe for the Rust tokenizer: lone surrogates cannot be UTF-8 encoded."""
    if not isinstance(text, str):
        raise TypeError(f"texts must be str, got {type(text).__name__}")
    text = text[:max_chars]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text
