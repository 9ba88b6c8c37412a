#!/usr/bin/env bash
# Fill .whl/ (git-ignored, carried to the GPU host) with what its image lacks: diffusers,
# pyzmq, and the CLIP BPE vocabulary. onnxruntime-gpu (255 MB) exceeds the 64 MiB carry
# limit, so the GPU host runs ONNX only where its own onnxruntime has a CUDA provider.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
  "diffusers==0.42.1" "pyzmq==27.1.0" "importlib_metadata" "zipp"
$PY - <<'PYEOF'
import shutil
from engine.model.clip_vocab import locate_vocab
shutil.copy(locate_vocab(), ".whl/bpe_simple_vocab_16e6.txt.gz")
PYEOF
du -sh .whl
