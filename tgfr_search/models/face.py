"""Face embeddings: ArcFace recognisers over ONNX Runtime, fed aligned 112x112 crops."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import onnx
    import onnxruntime
    import torch

    from tgfr_search.models.torch_onnx import TorchGraph

__all__ = ["ArcFaceONNX", "FaceEncoder"]


@runtime_checkable
class FaceEncoder(Protocol):
    """Maps aligned BGR uint8 face crops to L2-normalised float32 rows of width `dim`."""

    @property
    def name(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def dim(self) -> int: ...

    def embed(self, crops: Sequence[np.ndarray] | np.ndarray) -> np.ndarray: ...


class ArcFaceONNX:
    """An insightface ArcFace recogniser (w600k_mbf, w600k_r50, glintr100, ...) run in batches.

    On CPU the model runs on ONNX Runtime in float32. With `device="cuda"` (or "auto" where a
    GPU and the `gpu` extra are there) the same file runs through torch in fp16 (see
    `torch_onnx`); the fingerprint does not depend on the device. The default batch is small on
    CPU on purpose: batches of 4-8 crops ran about 8% faster per face than 64 (activations stay
    in cache); on a GPU it is 1024.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        batch_size: int | None = None,
        threads: int | None = None,
        input_mean: float = 127.5,
        input_std: float = 127.5,
        name: str | None = None,
        sha256: str | None = None,
        device: str = "cpu",
    ) -> None:
        from tgfr_search.models.registry import file_sha256, make_session
        from tgfr_search.models.torch_onnx import resolve_device

        self.model_path = Path(model_path)
        self.device = resolve_device(device)
        if batch_size is None:
            batch_size = 8 if self.device == "cpu" else 1024
        self.batch_size = max(1, int(batch_size))
        self.input_mean = float(input_mean)
        self.input_std = float(input_std)
        self.name = name or self.model_path.stem
        self.sha256 = sha256 or file_sha256(self.model_path)
        self._graph: TorchGraph | None = None
        if self.device == "cpu":
            self.session: onnxruntime.InferenceSession | None = make_session(
                _with_dynamic_batch(self.model_path), threads
            )
            inp = self.session.get_inputs()[0]
            out = self.session.get_outputs()[0]
            self.input_name = inp.name
            self.output_name = out.name
            height, width = inp.shape[2], inp.shape[3]
            dim = out.shape[-1]
        else:
            import onnx

            proto = onnx.load_from_string(_with_dynamic_batch(self.model_path))
            self.session = None
            weights = {init.name for init in proto.graph.initializer}
            inp_v = next(v for v in proto.graph.input if v.name not in weights)
            out_v = proto.graph.output[0]
            self.input_name, self.output_name = inp_v.name, out_v.name
            height, width = (_dim(inp_v, 2), _dim(inp_v, 3))
            dim = _dim(out_v, -1)
        if not (isinstance(height, int) and isinstance(width, int)):
            raise ValueError(f"{self.model_path.name}: recogniser input size is not fixed")
        self.input_size = (width, height)
        self.dim = int(dim)
        if self.device != "cpu":
            self._use_graph(proto)
        config = {
            "input_size": list(self.input_size),
            "mean": self.input_mean,
            "std": self.input_std,
            "rgb": True,
            "l2": True,
        }
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        self.fingerprint = f"{self.name}:{self.sha256[:16]}:{digest}"

    def __repr__(self) -> str:
        return f"ArcFaceONNX({self.model_path.name!r}, fingerprint={self.fingerprint!r})"

    def blob(self, chunk: Sequence[np.ndarray]) -> np.ndarray:
        """The network input for BGR crops (N, 3, H, W): RGB, scaled by the model's mean/std."""
        # Same arithmetic as insightface's get_feat, so embeddings match theirs bit for bit.
        import cv2

        return cv2.dnn.blobFromImages(
            list(chunk),
            1.0 / self.input_std,
            self.input_size,
            (self.input_mean, self.input_mean, self.input_mean),
            swapRB=True,
        )

    def _check(self, crops: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """The crops as a list, each verified to be an aligned BGR uint8 face of input size."""
        items = list(crops)
        width, height = self.input_size
        for i, crop in enumerate(items):
            if crop.shape != (height, width, 3) or crop.dtype != np.uint8:
                raise ValueError(
                    f"crop {i}: expected a BGR uint8 {height}x{width}x3 aligned face, "
                    f"got {crop.dtype} {crop.shape}"
                )
        return items

    def _use_graph(self, proto: onnx.ModelProto) -> None:
        """Run `proto` through torch on `self.device` from now on (the CUDA backend)."""
        from tgfr_search.models.torch_onnx import CropFeeder, TorchGraph

        self._graph = TorchGraph(proto, self.device)
        self._feeder = CropFeeder(self.device, self.input_size, self.input_mean, self.input_std)

    def run_tensors(
        self, crops: Sequence[np.ndarray], outputs: Sequence[str]
    ) -> list[torch.Tensor]:
        """The named graph outputs for checked crops, float32 tensors on the device (CUDA only)."""
        import torch

        assert self._graph is not None, "run_tensors is the CUDA backend's"
        where = [self._graph.output_names.index(name) for name in outputs]
        parts: list[list[torch.Tensor]] = [[] for _ in outputs]
        for start in range(0, len(crops), self.batch_size):
            chunk = list(crops[start : start + self.batch_size])
            # The first batch of each new size cost ~0.6 s on an H100 (benchmarks/first_call.py):
            # chunks are padded up to a power of two, so a process meets few sizes.
            n = len(chunk)
            size = min(self.batch_size, 1 << (n - 1).bit_length())
            with self._feeder.lock:  # the pinned staging buffers are shared
                result = self._graph(self._feeder(chunk + [chunk[-1]] * (size - n)))
            for part, i in zip(parts, where):
                part.append(result[i][:n])
        return [torch.cat(p).float() if len(p) > 1 else p[0].float() for p in parts]

    def embed_tensor(self, crops: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
        """Like `embed`, as a float32 tensor left on the device (CUDA backend only)."""
        items = self._check(crops)
        if not items:
            import torch

            return torch.empty((0, self.dim), device=self.device)
        (raw,) = self.run_tensors(items, [self.output_name])
        return raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def embed(self, crops: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Embed aligned crops (a sequence, or an N x H x W x 3 array) into (N, dim) unit rows."""
        if self._graph is not None:
            return self.embed_tensor(crops).cpu().numpy()
        items = self._check(crops)
        assert self.session is not None
        out = np.empty((len(items), self.dim), dtype=np.float32)
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            out[start : start + len(chunk)] = self.session.run(
                [self.output_name], {self.input_name: self.blob(chunk)}
            )[0]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.maximum(norms, 1e-12)
        return out


def _dim(value: onnx.ValueInfoProto, axis: int) -> int | str:
    """One dimension of a graph input or output: its size, or its symbolic name."""
    d = value.type.tensor_type.shape.dim[axis]
    return int(d.dim_value) if d.HasField("dim_value") else d.dim_param


def _with_dynamic_batch(path: Path) -> bytes:
    """Return the model with a symbolic batch dimension on its inputs and outputs.

    insightface's exports declare the output as [1, 512]; ORT then warns on every batch of N > 1.
    """
    import onnx

    model = onnx.load(str(path))
    # Old exports list weights among the graph inputs; their shapes must stay as they are.
    weights = {init.name for init in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in weights]
    for value in inputs + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 0:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
    # Intermediate shapes were recorded for batch 1 too; ORT re-infers them when they are gone.
    del model.graph.value_info[:]
    return model.SerializeToString()
