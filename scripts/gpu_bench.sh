#!/usr/bin/env bash
# The GPU benchmark in two device commands, and their CPU rehearsal (issue 14).
#
#   bash scripts/gpu_bench.sh             first command: preflight, GPU tests, eager and CUDA graphs at
#                                         batch 1/4/8/16, the daemon with 4×720p cameras for 15 s.
#                                         Budget 300 s by its sections (hard stop at 330 s).
#                                         Writes $OUT/gpu_bench.json, gpu_bench.log, gpu_tests.log, daemon.log
#   bash scripts/gpu_bench.sh --second    second command: ONNX (GPU provider only) and torch.compile.
#                                         Budget 300 s (hard stop at 330 s).
#                                         Writes $OUT/gpu_bench_second.json, gpu_bench_second.log
#   bash scripts/gpu_bench.sh --dry-run   both, on CPU with the narrow model (what `make test` runs)
#
# On the device: carry .whl (made here by scripts/prepare_gpu_wheels.sh): it holds the wheels
# the GPU host lacks and the CLIP vocabulary. $OUT defaults to out/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash scripts/gpu_bench.sh [--second] [--dry-run]"
stages=first
dry=""
for arg in "$@"; do
  case "$arg" in
    --second) stages=second ;;
    --dry-run) dry=--dry-run ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "gpu_bench.sh: unknown option '$arg'; $usage" >&2; exit 2 ;;
  esac
done
# A dry run rehearses both commands unless --second asks for that one alone.
[ -n "$dry" ] && [ "$stages" = first ] && stages="first second"

OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export GPU_BENCH_PIDFILE=${TMPDIR:-/tmp}/iseg-gpu-bench-$$.pids
if [ -z "$dry" ]; then
  export ISEG_CACHE_DIR=${ISEG_CACHE_DIR:-/tmp/iseg-cache} ISEG_TEST_MODEL_CACHE=${ISEG_TEST_MODEL_CACHE:-/tmp/iseg-tests}
  hard_limit=330
else
  # One thread per process: on a shared 2-core box, torch's second OpenMP thread waits on a
  # descheduled peer at every barrier (measured: 60× slower UNet forwards).
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  hard_limit=600
fi

# Whatever happens to the Python process, no daemon it started outlives this script.
kill_leftovers() {
  if [ -f "$GPU_BENCH_PIDFILE" ]; then
    while read -r group; do kill -KILL -- "-$group" 2>/dev/null; done <"$GPU_BENCH_PIDFILE"
    rm -f "$GPU_BENCH_PIDFILE"
  fi
}
trap kill_leftovers EXIT

install_wheels() {
  ls .whl/*.whl >/dev/null 2>&1 || return 0
  echo "[gpu_bench] installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  if ! timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
    echo "preflight: FAILED: the carried wheels in .whl/ did not install (two versions of one package? rerun scripts/prepare_gpu_wheels.sh)"
    return 1
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}

run_stage() {
  local stage=$1 name=gpu_bench
  [ "$stage" = second ] && name=gpu_bench_second
  {
    echo "[gpu_bench] $(date -u +%FT%TZ) stage $stage ${dry:-(device)} on $(hostname), OUT=$OUT"
    if [ -z "$dry" ]; then
      install_wheels || exit 3
      [ -f .whl/bpe_simple_vocab_16e6.txt.gz ] && export ISEG_CLIP_VOCAB=$PWD/.whl/bpe_simple_vocab_16e6.txt.gz
      [ -d .whl/iseg-tests ] && mkdir -p "$ISEG_TEST_MODEL_CACHE" && cp -r .whl/iseg-tests/. "$ISEG_TEST_MODEL_CACHE/"
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    timeout -k 10 "$hard_limit" "$PYTHON" scripts/gpu_bench.py --out-dir "$OUT" --stage "$stage" $dry
    code=$?
    [ "$code" = 124 ] && echo "[gpu_bench] stage $stage hit the hard limit of $hard_limit s; $OUT/$name.json holds what was measured"
    kill_leftovers
    exit "$code"
  } 2>&1 | tee "$OUT/$name.log"
}

status=0
for stage in $stages; do
  run_stage "$stage"
  code=$?
  [ "$code" -gt "$status" ] && status=$code
  [ "$code" = 3 ] && break  # preflight failed: the next stage would fail the same way
done
exit "$status"
