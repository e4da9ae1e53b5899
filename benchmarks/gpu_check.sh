#!/usr/bin/env bash
# GPU evidence for the Triton and CUDA kernels in one call (the device tool returns at most 8
# files from $OUT): build with CUDA, GPU tests, compute-sanitizer (memcheck, racecheck) on the
# CUDA kernel, and the gpu-layers suite (fp16) at batch 64 and 1, Triton and CUDA kernels.
#
# The device has no network: carry the official bsconv wheel (pure Python) in .whl/, e.g.
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps -d .whl bsconv==0.4.0
# and run with carry [".whl"]:  bash benchmarks/gpu_check.sh
# Results: commit $OUT's JSON plus a short table under benchmarks/results/ (device, commit, date).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%F)"
} > "$OUT/device.txt" 2>&1

if ! BSCONV_FAST_FORCE_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1; then
  tail -60 /tmp/build.log | tee "$OUT/build-failed.log"
  exit 1
fi

timeout 900 python3 -m pytest -q tests/test_triton_kernel.py tests/test_cuda_kernel.py tests/test_ops_autograd.py \
  > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"

{
  echo "== memcheck"
  timeout 600 compute-sanitizer --tool memcheck python3 -m pytest -q -x tests/test_cuda_kernel.py -k matches 2>&1 | tail -15
  echo "== racecheck"
  timeout 600 compute-sanitizer --tool racecheck python3 -m pytest -q -x tests/test_cuda_kernel.py -k "matches and float16" 2>&1 | tail -15
} > "$OUT/sanitizer.log" 2>&1

bench() {  # name, extra args...
  local name=$1
  shift
  timeout 1500 python3 -m bsconv_fast bench --device cuda --suite gpu-layers --dtype float16 --reps 50 \
    --json "$OUT/$name.json" "$@" 2>&1 | grep -v -i warn | tee -a "$OUT/tables.txt"
}
bench gpu-layers-b64 --batch 64
bench gpu-layers-b1 --batch 1 --no-compile
BSCONV_FAST_GPU_KERNEL=cuda bench gpu-layers-b1-cuda --batch 1 --no-compile
BSCONV_FAST_GPU_KERNEL=cuda bench gpu-layers-b8-cuda --batch 8 --no-compile
