"""The models alone on a GPU (fp16 through torch), with ONNX Runtime on the CPU in the same run.

For the choices in `tgfr_search/models/torch_onnx.py`: batch size, channels-last, cuDNN
autotuning. Rows:

* ArcFace w600k_mbf, `ArcFaceONNX.embed` from BGR uint8 crops in host memory to unit vectors
  in host memory (stacking, the copy, normalisation and the copy back included), and the bare
  network on a batch already on the GPU (CUDA events);
* the same file on ONNX Runtime, CPU, all cores, batch 8 (the CPU backend's default);
* SCRFD-500M on the raw 250x250 LFW photos (320x320 input), GPU fp16 vs ONNX Runtime CPU;
* MiniLM on generated captions, fp16 GPU vs float32 CPU (torch);
* `TGFRRuntime.embed` (crops + captions to face, fused, aligned and caption vectors).

    python benchmarks/gpu_models.py [--lfw DIR] [--out benchmarks/results/gpu_models.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LFW, machine, table, write_json  # noqa: E402


def rate(fn: Any, n: int, repeats: int = 5) -> float:
    """Median items/s of `fn()` (which must synchronise) over `repeats` timed calls, after one."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, default=LFW)
    ap.add_argument("--n", type=int, default=8192, help="crops per timed call")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_models.json"))
    args = ap.parse_args()

    import cv2
    import onnx
    import torch

    from tgfr_search.models import load_models
    from tgfr_search.models.face import ArcFaceONNX, _with_dynamic_batch
    from tgfr_search.models.torch_onnx import TorchGraph

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from enroll_throughput import captions_for

    files = sorted((args.lfw / "aligned112").glob("*/*.jpg"))
    real = [cv2.imread(str(f)) for f in files]
    crops = [real[i % len(real)] for i in range(args.n)]
    captions = captions_for(args.lfw, files)
    caps = [captions[i % len(captions)] for i in range(args.n)]
    rows: list[dict[str, Any]] = []

    def add(model: str, backend: str, setting: str, value: float, unit: str) -> None:
        rows.append(
            {
                "model": model,
                "backend": backend,
                "setting": setting,
                "rate": round(value, 1),
                "unit": unit,
            }
        )

    path = load_models(device="cpu", text=None).face.model_path
    # ArcFace on the GPU: batch size x channels-last x cuDNN autotuning.
    for autotune in (False, True):
        torch.backends.cudnn.benchmark = autotune
        for channels_last in (True, False):
            face = ArcFaceONNX(path, device="cuda")
            proto = onnx.load_from_string(_with_dynamic_batch(path))
            face._graph = TorchGraph(proto, "cuda", channels_last=channels_last)
            for batch in (256, 1024, 4096):
                face.batch_size = batch
                setting = f"batch {batch}, {'NHWC' if channels_last else 'NCHW'}, " + (
                    "cudnn autotune" if autotune else "no autotune"
                )
                add(
                    "arcface",
                    "torch fp16 cuda, embed()",
                    setting,
                    rate(lambda f=face: f.embed(crops), len(crops)),
                    "faces/s",
                )
                assert face._graph is not None
                x = face._feeder(crops[:batch]).contiguous()
                start, stop = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                face._graph(x)
                start.record()
                for _ in range(10):
                    face._graph(x)
                stop.record()
                stop.synchronize()
                add(
                    "arcface",
                    "torch fp16 cuda, network only",
                    setting,
                    10 * batch / (start.elapsed_time(stop) / 1000),
                    "faces/s",
                )
    torch.backends.cudnn.benchmark = False

    cpu = load_models(device="cpu", text=None)
    add(
        "arcface",
        "onnxruntime cpu",
        "batch 8, all cores",
        rate(lambda: cpu.face.embed(crops[:1024]), 1024, repeats=2),
        "faces/s",
    )

    raw = [cv2.imread(str(p)) for p in sorted((args.lfw / "raw").glob("*/*.jpg"))]
    if raw:
        gpu = load_models(device="cuda", text=None)
        add(
            "scrfd",
            "torch fp16 cuda",
            "batch 32, 320x320",
            rate(lambda: gpu.detector.detect(raw), len(raw)),
            "images/s",
        )
        add(
            "scrfd",
            "onnxruntime cpu",
            "batch 4, 320x320, all cores",
            rate(lambda: cpu.detector.detect(raw), len(raw), repeats=2),
            "images/s",
        )

    from tgfr_search.models.fusion import TGFRRuntime, default_checkpoint

    gpu_pack = load_models(device="cuda")
    text = gpu_pack.text
    text.encode(caps[:8])
    add(
        "minilm",
        "torch fp16 cuda",
        "batch 1024, sentences only",
        rate(lambda: text.encode_tensors(caps, tokens=False)[2].cpu(), len(caps)),
        "captions/s",
    )
    cpu_text = load_models(device="cpu").text
    add(
        "minilm",
        "torch fp32 cpu",
        "batch 64",
        rate(lambda: cpu_text.encode(caps[:512]), 512, repeats=2),
        "captions/s",
    )
    checkpoint = default_checkpoint()
    if checkpoint is not None:
        runtime = TGFRRuntime(checkpoint, gpu_pack.face, text, device="cuda")
        add(
            "tgfr runtime",
            "cuda",
            "crops + captions -> 4 vector spaces",
            rate(lambda: runtime.embed(crops, caps), len(crops)),
            "faces/s",
        )
    print(table(rows, ["model", "backend", "setting", "rate", "unit"]))
    write_json(args.out, {"machine": machine(), "n": len(crops), "rows": rows})


if __name__ == "__main__":
    main()
