#!/usr/bin/env bash
# Fill .whl/ (git-ignored; name it in the device run's carry) with what the GPU host lacks:
#   - wheels for Python 3.12 / manylinux x86_64 of the packages its image does not have
#     (diffusers, pyzmq, importlib_metadata; torch, transformers, onnx, pytest... are there);
#   - the CLIP BPE vocabulary (the GPU host cannot fetch it);
#   - the tiny test model tests/test_gpu.py uses, prebuilt (building it there costs test time).
# .whl/ is emptied first: two versions of one wheel make the device's pip install fail.
# onnxruntime-gpu (over 200 MB) exceeds the 64 MiB carry limit, so the GPU host runs ONNX only
# where its own onnxruntime has a CUDA provider.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# pydantic and its helpers: the daemon's config is pydantic models (the GPU image has none).
WHEELS=("diffusers==0.42.1" "pyzmq==27.1.0" "importlib_metadata==8.7.0" "pydantic==2.14.4" "pydantic_core==2.50.5"
        "annotated-types==0.8.0" "typing-inspection==0.4.5" "typing_extensions==4.16.0")
LIMIT_MB=48  # of the 64 MiB a device call carries, leave room for the working tree

rm -rf .whl
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${WHEELS[@]}"

PYTHONPATH=$PWD "$PY" - "${WHEELS[@]}" <<'PYEOF'
import re
import shutil
import sys
from pathlib import Path

from engine.model.clip_vocab import VOCAB_NAME, locate_vocab, read_merges
from tests.conftest import tiny_model_path

folder = Path(".whl")
vocab = folder / VOCAB_NAME
shutil.copy(locate_vocab(), vocab)
read_merges(vocab)
built = tiny_model_path("sd21")  # from this machine's test model cache, built there if absent
model = folder / "iseg-tests" / built.name
shutil.copytree(built, model)

wheels = sorted(folder.glob("*.whl"))
names = [re.sub(r"[-_.]+", "_", w.name.split("-")[0]).lower() for w in wheels]
wanted = [re.sub(r"[-_.]+", "_", spec.split("==")[0]).lower() for spec in sys.argv[1:]]
duplicates = sorted({n for n in names if names.count(n) > 1})
missing = sorted(set(wanted) - set(names))
if duplicates or missing:
    sys.exit(f"prepare_gpu_wheels: .whl/ is wrong: duplicates {duplicates}, missing {missing}")
for wheel in wheels:
    if not ("cp312" in wheel.name or "py3-none-any" in wheel.name or "abi3" in wheel.name):
        sys.exit(f"prepare_gpu_wheels: {wheel.name} is not for CPython 3.12")
print(f"prepare_gpu_wheels: {len(wheels)} wheels, {vocab.name}, tiny model {model.name}")
PYEOF

size_mb=$(du -sm .whl | cut -f1)
ls -la .whl
echo "prepare_gpu_wheels: .whl/ is ${size_mb} MB"
if [ "$size_mb" -gt "$LIMIT_MB" ]; then
  echo "prepare_gpu_wheels: .whl/ is over ${LIMIT_MB} MB; a device call carries 64 MiB in all" >&2
  exit 1
fi
