"""The CUDA path of the ONNX face models: each graph converted to a torch module, run in fp16.

ONNX Runtime stays the CPU backend (its wheels here have no CUDA provider). On a GPU the same
ONNX file is converted by `onnx2torch` (the `gpu` extra) into a torch module whose weights are
the file's, cast to fp16; the model's fingerprint is the file's, so vectors from either backend
may share a gallery. `tests/test_gpu.py` holds fp16 embeddings to within 1e-3 cosine of the
fp32 ONNX Runtime output.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tgfr_search.errors import MissingDependency

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = ["CropFeeder", "TorchGraph", "cuda_available", "resolve_device"]

GPU_EXTRA = "pip install 'tgfr-search[gpu]'"


@lru_cache(maxsize=1)
def cuda_available() -> bool:
    """Whether torch sees a CUDA device; never imports torch on a machine without a driver."""
    if importlib.util.find_spec("torch") is None:
        return False
    if sys.platform.startswith("linux") and not any(
        Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl", "/proc/driver/nvidia")
    ):
        return False  # importing torch costs a second or more; without a driver it finds nothing
    import torch

    return bool(torch.cuda.is_available())


def _has_onnx2torch() -> bool:
    return importlib.util.find_spec("onnx2torch") is not None


def resolve_device(device: str = "auto") -> str:
    """'cpu' or a CUDA device name for `device` ('auto', 'cpu', 'cuda' or 'cuda:N').

    'auto' picks CUDA only when torch sees a GPU and the `gpu` extra (onnx2torch) is installed,
    so a CUDA machine without the extra keeps the CPU backend instead of failing.
    """
    if device == "cpu":
        return "cpu"
    if device == "auto":
        return "cuda" if cuda_available() and _has_onnx2torch() else "cpu"
    if device != "cuda" and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if not cuda_available():
        raise MissingDependency(f"device={device!r} but torch sees no CUDA device")
    if not _has_onnx2torch():
        raise MissingDependency(
            f"running the ONNX face models on {device} needs onnx2torch: {GPU_EXTRA}"
        )
    return device


def _onnx2torch() -> Any:
    try:
        import onnx2torch
    except ImportError as e:  # onnx2torch also needs torchvision
        raise MissingDependency(
            f"the CUDA backend of the face models needs onnx2torch ({e}): {GPU_EXTRA}"
        ) from e
    return onnx2torch


class TorchGraph:
    """An ONNX graph as a torch module on a CUDA device, weights in fp16.

    Calling it returns the graph outputs in the graph's order, as torch tensors on the device.
    """

    def __init__(
        self, model: onnx.ModelProto, device: str, *, half: bool = True, channels_last: bool = False
    ) -> None:
        import torch

        onnx2torch = _onnx2torch()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = onnx2torch.convert(model)
        self.output_names = [o.name for o in model.graph.output]
        self.device = torch.device(device)
        self.dtype = torch.float16 if half else torch.float32
        self.module = module.eval().to(self.device, self.dtype)
        # Channels-last is the usual advice for fp16 convolutions, but on an H100 it made
        # w600k_mbf 30% slower (16.9k vs 24.0k faces/s at batch 1024, benchmarks/gpu_models.py).
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.module = self.module.to(memory_format=self.memory_format)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        import torch

        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # onnx2torch's Slice indexes with a list
            out = self.module(x.to(self.dtype).contiguous(memory_format=self.memory_format))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class CropFeeder:
    """Moves batches of BGR uint8 crops to the GPU as normalised RGB NCHW float tensors.

    The crops are stacked into pinned host memory (two buffers, alternated, so stacking the next
    batch overlaps the copy of this one) and normalised on the device: (x - mean) / std, the
    arithmetic of `cv2.dnn.blobFromImages` that the CPU path uses.
    """

    def __init__(self, device: str, size: tuple[int, int], mean: float, std: float) -> None:
        self.device = device
        self.cuda = device.startswith("cuda")
        self.width, self.height = size
        self.mean, self.scale = float(mean), 1.0 / float(std)
        self._buffers: list[Any] = [None, None]
        self._events: list[Any] = [None, None]
        self._turn = 0
        self.lock = threading.Lock()
        """Held by callers around feeding and running one batch: buffers are shared."""

    def __call__(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, 3, H, W) float32 on the device for N crops of (H, W, 3) uint8 BGR."""
        import torch

        n = len(crops)
        slot = self._turn
        self._turn ^= 1
        buf = self._buffers[slot]
        if buf is None or buf.shape[0] < n:
            shape = (n, self.height, self.width, 3)
            buf = torch.empty(shape, dtype=torch.uint8, pin_memory=self.cuda)
            self._buffers[slot] = buf
            self._events[slot] = None
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # the copy that last read this buffer is done
        host = buf[:n]
        np.stack(crops, out=host.numpy())
        if not self.cuda:
            x = host.clone()
        else:
            x = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._events[slot] = event
        x = x.permute(0, 3, 1, 2).flip(1).float()  # NHWC BGR -> NCHW RGB
        return (x - self.mean) * self.scale
