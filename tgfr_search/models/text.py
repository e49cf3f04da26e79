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

__all__ = ["MiniLM", "TextEncoder", "TextEncoding", "Tokens"]

# A model input's name -> the field of a `tokenizers.Encoding` that holds it.
_ENCODING_FIELDS = {
    "input_ids": "ids",
    "token_type_ids": "type_ids",
    "attention_mask": "attention_mask",
}

# Tokenising a pathological multi-megabyte string costs seconds; far fewer characters than this
# already fill max_length tokens for any real description.
_CHARS_PER_TOKEN_CAP = 200

# Bumped when the exported graph changes, so that older cached files are no longer used.
_ONNX_FORMAT = 1
# Exported graphs agree with torch to ~3e-6 on the token states; more means a broken export.
_ONNX_TOLERANCE = 1e-4


@dataclass
class TextEncoding:
    """Encoder output for N texts: per-token states, their mask, and unit sentence vectors."""

    tokens: np.ndarray
    """(N, L, dim) float32 last hidden states, padded to the longest text."""
    mask: np.ndarray
    """(N, L) bool, True on real tokens (including [CLS] and [SEP])."""
    sentence: np.ndarray
    """(N, dim) float32 mean of the masked tokens, L2-normalised."""


@dataclass(frozen=True)
class Tokens:
    """Texts tokenised ahead of their encoding (`MiniLM.tokenize`), a row of inputs each."""

    rows: dict[str, int]
    """Each (sanitised) text's row in `inputs`."""
    inputs: dict[str, np.ndarray]

    def take(self, clean: Sequence[str]) -> dict[str, np.ndarray] | None:
        """The inputs of these texts, padded to the longest of them (None: one is missing)."""
        if not clean or any(c not in self.rows for c in clean):
            return None
        at = [self.rows[c] for c in clean]
        batch = {k: v[at] for k, v in self.inputs.items()}
        if "attention_mask" not in batch:
            return batch
        length = int(batch["attention_mask"].sum(axis=1).max())
        return {k: v[:, :length] for k, v in batch.items()}


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
    CUDA device the weights run in fp16 through torch (`half=None` means: fp16 on CUDA, float32
    on CPU); pooling and normalisation stay in float32. On the CPU in float32 the model runs on
    ONNX Runtime (`backend="auto"`): one caption took 5.7 ms there against 13.9 ms in torch on
    one thread (2-core VM), with the same token states to ~3e-6. The graph is exported from the
    local weights on first use, checked against torch, and kept in `cache_dir()/text` under the
    model's fingerprint; `backend="torch"` keeps torch, as does a failed export (with a warning).
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
        backend: str = "auto",
        threads: int | None = None,
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
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend must be auto or torch, not {backend!r}")
        self.backend = (
            "onnxruntime" if backend == "auto" and not on_gpu and not self.half else "torch"
        )
        """`onnxruntime` or `torch`: what runs the model (torch after a failed export)."""
        self.threads = threads
        """ONNX Runtime threads within each operator (default: all cores)."""
        self._model: Any = None
        self._tokenizer: Any = None
        self._fast: Any = None  # the Rust tokenizer itself, padding and truncating (see _tokenize)
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
        """(tokenizer, model): an ONNX Runtime session or a torch module, as `backend` says."""
        with self._lock:
            if self._model is None:
                from transformers import AutoTokenizer
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()  # a local load needs no "Loading weights" bar
                tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
                if getattr(tokenizer, "is_fast", False) and set(tokenizer.model_input_names) <= set(
                    _ENCODING_FIELDS
                ):
                    from tokenizers import Tokenizer

                    # A copy: padding and truncation are settings of the object, and the
                    # wrapper sets its own on the original at each call.
                    fast = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
                    fast.enable_truncation(self.max_length)
                    fast.enable_padding(
                        pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token
                    )
                    self._fast = fast
                model = self._onnx_session(tokenizer) if self.backend == "onnxruntime" else None
                if model is None:
                    self.backend = "torch"
                    model = self._torch_model()
                self._tokenizer, self._model = tokenizer, model
        return self._tokenizer, self._model

    def _torch_model(self) -> Any:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(self.model_dir, local_files_only=True)
        model.eval().to(self.device)
        if self.half:
            model.half()
        return model

    def _onnx_session(self, tokenizer: Any) -> Any:
        """The model on ONNX Runtime, exported once into the cache; None if it cannot export."""
        from filelock import FileLock

        from tgfr_search.models.registry import cache_dir, make_session

        key = hashlib.sha256(f"{self.fingerprint}|onnx{_ONNX_FORMAT}".encode()).hexdigest()[:16]
        path = cache_dir() / "text" / f"{self.name}-{key}.onnx"
        data: bytes | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with FileLock(f"{path}.lock", timeout=600):  # one process exports, the others wait
                if path.is_file():
                    try:
                        return make_session(path, self.threads)
                    except Exception:  # ORT's errors derive from Exception alone
                        path.unlink()  # a damaged file: made again below
                data = self._export(tokenizer)
                if data is None:
                    return None
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)  # readers see the whole file or none
        except OSError:  # no writable cache: this process keeps its export in memory
            data = data or self._export(tokenizer)
        return None if data is None else make_session(data, self.threads)

    def _export(self, tokenizer: Any) -> bytes | None:
        """The float32 model as ONNX bytes, checked against torch; None (and a warning) if not."""
        import warnings

        import torch

        try:
            with torch.inference_mode(False):  # a first encode may come inside inference mode
                return _export_onnx(self._torch_model(), tokenizer)
        except Exception as e:  # the exporter fails in many ways across torch versions
            warnings.warn(f"{self.name} stays on torch: ONNX export failed ({e})", stacklevel=2)
            return None

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """The model's inputs for texts, to pass to `encode`/`encode_tensors` later as `ready`.

        Tokenising thousands of captions takes tens of milliseconds: GPU enrollment does it
        for the next batch in a thread while the GPU works on this one.
        """
        clean = sorted({self._clean(t) for t in texts})
        tokenizer, _ = self._load()
        inputs = self._tokenize(tokenizer, clean) if clean else {}
        return Tokens({c: i for i, c in enumerate(clean)}, inputs)

    def _clean(self, text: str) -> str:
        return _sanitise(text, self.max_length * _CHARS_PER_TOKEN_CAP)

    def _inputs(self, tokenizer: Any, clean: list[str], ready: Tokens | None) -> Any:
        taken = ready.take(clean) if ready is not None else None
        return taken if taken is not None else self._tokenize(tokenizer, clean)

    def encode_tensors(
        self, texts: Sequence[str], *, tokens: bool = True, ready: Tokens | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """`encode` as float32 tensors left on the device: (tokens or None, mask, sentence).

        `tokens=False` skips the per-token states (N x L x dim floats) for callers that need the
        sentence vectors alone; `ready` holds the texts' inputs when `tokenize` made them.
        """
        import torch

        if self.device == "cpu":
            enc = self.encode(texts, ready=ready)
            sentence = torch.from_numpy(enc.sentence)
            mask = torch.from_numpy(enc.mask)
            return (torch.from_numpy(enc.tokens) if tokens else None), mask, sentence
        if isinstance(texts, str):
            texts = [texts]
        clean = [self._clean(t) for t in texts]
        if not clean:
            return (
                torch.zeros((0, 0, self.dim), device=self.device) if tokens else None,
                torch.zeros((0, 0), dtype=torch.bool, device=self.device),
                torch.zeros((0, self.dim), device=self.device),
            )
        tokenizer, model = self._load()
        batch = {
            k: torch.from_numpy(v).to(self.device, non_blocking=True)
            for k, v in self._inputs(tokenizer, clean, ready).items()
        }
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

    def encode(self, texts: Sequence[str], *, ready: Tokens | None = None) -> TextEncoding:
        """Encode texts; long ones are truncated to `max_length` tokens, empty ones are fine.

        `ready`: the texts' inputs, made ahead by `tokenize`.
        """
        if self.device != "cpu":
            states, mask_t, sentence_t = self.encode_tensors(texts, ready=ready)
            assert states is not None
            return TextEncoding(
                tokens=states.cpu().numpy(),
                mask=mask_t.cpu().numpy(),
                sentence=sentence_t.cpu().numpy(),
            )

        if isinstance(texts, str):
            texts = [texts]
        clean = [self._clean(t) for t in texts]
        if not clean:
            empty = np.zeros((0, self.dim), dtype=np.float32)
            return TextEncoding(
                tokens=np.zeros((0, 0, self.dim), dtype=np.float32),
                mask=np.zeros((0, 0), dtype=bool),
                sentence=empty,
            )
        tokenizer, model = self._load()
        batch = self._inputs(tokenizer, clean, ready)
        mask = batch["attention_mask"].astype(bool)
        tokens = np.empty((*mask.shape, self.dim), dtype=np.float32)
        for start in range(0, len(clean), self.batch_size):
            part = {k: v[start : start + self.batch_size] for k, v in batch.items()}
            tokens[start : start + len(part["input_ids"])] = self._forward(model, part)
        tokens[~mask] = 0.0
        # Pooling as sentence-transformers' all-MiniLM-L6-v2: masked mean, then unit norm.
        pooled = tokens.sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norm = np.linalg.norm(pooled, axis=1, keepdims=True)
        sentence = (pooled / np.maximum(norm, 1e-12)).astype(np.float32)
        return TextEncoding(tokens=tokens, mask=mask, sentence=sentence)

    def _tokenize(self, tokenizer: Any, clean: list[str]) -> dict[str, np.ndarray]:
        """The model's inputs as int64 arrays, padded to the longest text, truncated to max_length.

        Straight from the Rust tokenizer where there is one: `transformers`' wrapper spends
        Python on every text, which at GPU enrollment rates (thousands of captions a second)
        held up the thread that feeds the GPU. The ids are the wrapper's (tests/test_text.py).
        """
        if self._fast is None:
            batch = tokenizer(
                clean,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="np",
            )
            return {k: v.astype(np.int64) for k, v in batch.items()}
        encodings = self._fast.encode_batch(clean)
        return {
            name: np.array([getattr(e, _ENCODING_FIELDS[name]) for e in encodings], dtype=np.int64)
            for name in tokenizer.model_input_names
        }

    def _forward(self, model: Any, part: dict[str, np.ndarray]) -> np.ndarray:
        """(n, L, dim) float32 last hidden states of one batch of token arrays, on the CPU."""
        if self.backend == "onnxruntime":
            return model.run(None, part)[0]
        import torch

        with torch.inference_mode(), few_threads(len(part["input_ids"])):
            feed = {k: torch.from_numpy(v) for k, v in part.items()}
            return model(**feed).last_hidden_state.float().numpy()


def _export_onnx(model: Any, tokenizer: Any) -> bytes:
    """A torch BERT's last hidden states as an ONNX graph (batch and length dynamic).

    Raises ValueError when the graph's output differs from the model's on a padded batch.
    """
    import inspect
    import io
    import warnings

    import torch

    from tgfr_search.models.registry import make_session

    sample = tokenizer(["a face", "a man with glasses"], padding=True, return_tensors="pt")
    names = list(sample.keys())

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, inputs))).last_hidden_state

    # torch >= 2.5 defaults to the dynamo exporter, which needs onnxscript; the tracer does not.
    export: Any = torch.onnx.export  # typed for file paths; the tracer writes to a BytesIO too
    tracer = {"dynamo": False} if "dynamo" in inspect.signature(export).parameters else {}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python control flow
        export(
            Hidden().eval(),
            tuple(sample[k] for k in names),
            buffer,
            input_names=names,
            output_names=["hidden"],
            dynamic_axes={k: {0: "batch", 1: "length"} for k in [*names, "hidden"]},
            opset_version=17,
            **tracer,
        )
    data = buffer.getvalue()
    check = tokenizer(
        ["", "A young woman with blond hair and a big smile.", "an old man"],
        padding=True,
        return_tensors="np",
    )
    feed = {k: check[k].astype(np.int64) for k in names}
    got = make_session(data, 1).run(None, feed)[0]
    with torch.inference_mode():
        want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state
    real = check["attention_mask"].astype(bool)
    error = float(np.abs(got - want.numpy())[real].max())
    if not error <= _ONNX_TOLERANCE:
        raise ValueError(f"the exported graph differs from torch by {error:.2g}")
    return data


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
