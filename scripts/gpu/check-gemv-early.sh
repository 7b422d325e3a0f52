#!/usr/bin/env bash
# check-gemv-early.sh: the small-batch GEMV's weight stream started before the wait for
# the kernel ahead of it (kernels.cu gemv_kernel `early`; docs/results/cuda-model.md), in
# one device call on one GPU: builds with the gathered Debian prefix; runs
# test_backend_cuda (every op against its CPU twin) with early on (the default) and off
# (PDSERVE_CUDA_GEMV_EARLY=0), and test_forward_cuda against transformers bf16 made on
# this GPU, on and off; then times the 8B decode step (bench_model_cuda --no-prefill) in
# the order: the defaults (early on; auto: the GEMV for every small-batch matmul on a
# card under 4 TB/s of peak DRAM bandwidth, else only up to 32M weights), the GEMV only
# up to 32M weights (PDSERVE_CUDA_GEMV=small: gate_up, down and lm_head on cuBLAS), the
# GEMV everywhere (=1), early off, then the first three again: A/B runs in one call on
# one card, the repeated ones showing the card's drift.
# What to look for: B=1 ctx=128 under 1.2x the floor with the defaults; no loss at B=64.
# Logs go under $OUT (or build-gpu/out) as check-gemv-early.tgz beside env.txt and
# summary.txt; the summary is printed last.
#
# Usage (repository root, on the GPU machine; carry .deps/prefix):
#   scripts/gpu/check-gemv-early.sh          NO_TESTS=1 for the timings alone
# Exit status: 0 when every test passed and every bench run ended, 77 without a GPU,
# else 1 (2: build failed). Reads the GPU's state and never changes it.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build, gpu_run
gpu_header | tee "$out/env.txt"
command -v nvidia-smi >/dev/null 2>&1 || { echo "no GPU"; exit 77; }
gpu_build "$out/build.log" test_backend_cuda test_forward_cuda bench_model_cuda || exit 2
export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/build-gpu
status=0
summary=()
if [ "${NO_TESTS:-0}" != 1 ]; then
  gpu_run test_backend_cuda 240 build-gpu/test_backend_cuda
  gpu_run test_backend_cuda_early0 240 env PDSERVE_CUDA_GEMV_EARLY=0 build-gpu/test_backend_cuda
  ref=build-gpu/gpu-ref
  [ -d "$ref" ] || gpu_run gpu_reference 300 python3 tests/fixtures/models/gpu_reference.py "$ref"
  PDSERVE_GPU_REF=$ref gpu_run test_forward_cuda 240 build-gpu/test_forward_cuda
  PDSERVE_GPU_REF=$ref gpu_run test_forward_cuda_early0 240 env PDSERVE_CUDA_GEMV_EARLY=0 build-gpu/test_forward_cuda
fi
variants=(auto1:1:auto small1:1:small all1:1:1 early0:0:auto auto2:1:auto small2:1:small all2:1:1)
for v in "${variants[@]}"; do
  IFS=: read -r tag early gemv <<<"$v"
  if [ "$gemv" = auto ]; then
    gpu_run "bench_$tag" 200 env PDSERVE_CUDA_GEMV_EARLY=$early build-gpu/bench_model_cuda --no-prefill
  else
    gpu_run "bench_$tag" 200 env PDSERVE_CUDA_GEMV_EARLY=$early PDSERVE_CUDA_GEMV=$gemv \
      build-gpu/bench_model_cuda --no-prefill
  fi
done
{
  echo
  echo "== runs =="
  printf '%s\n' "${summary[@]}"
  for f in test_backend_cuda test_backend_cuda_early0 test_forward_cuda test_forward_cuda_early0; do
    [ -f "$out/$f.log" ] && grep -E '^FAIL|failed' "$out/$f.log" | head -n 8 | sed "s/^/$f: /"
  done
  for v in "${variants[@]}"; do
    IFS=: read -r tag early gemv <<<"$v"
    echo
    echo "-- bench_model_cuda --no-prefill, PDSERVE_CUDA_GEMV_EARLY=$early PDSERVE_CUDA_GEMV=$gemv ($tag) --"
    grep -E '^\||floor|ceiling' "$out/bench_$tag.log" | head -n 30
  done
} | tee "$out/summary.txt"
tgz=$(mktemp "${TMPDIR:-/tmp}/check-gemv-early.XXXXXX")
(cd "$out" && tar -czf "$tgz" --exclude=env.txt --exclude=summary.txt . &&
  find . -maxdepth 1 -type f ! -name env.txt ! -name summary.txt -delete &&
  mv "$tgz" check-gemv-early.tgz)
exit "$status"
