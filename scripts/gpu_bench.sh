#!/usr/bin/env bash
# The GPU benchmark as one command on a bare H100 host with no internet (issue 4):
#   device run:  bash scripts/gpu_bench.sh      (carry: .whl, filled by scripts/prepare_gpu_wheels.sh)
# Installs the carried wheels, then runs scripts/gpu_bench.py, which writes $OUT/gpu_bench.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
[ -f .whl/bpe_simple_vocab_16e6.txt.gz ] && export ISEG_CLIP_VOCAB=$PWD/.whl/bpe_simple_vocab_16e6.txt.gz
export ISEG_CACHE_DIR=/tmp/iseg-cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
# Correctness on the GPU first (real CUDA-graph capture vs eager, tiny model): ~1 min.
timeout 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/test_gpu.py tests/test_cuda_graphs.py \
  2>&1 | tee "$OUT/gpu_tests.log"
timeout 420 python3 scripts/gpu_bench.py --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log"
