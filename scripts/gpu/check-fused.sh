#!/usr/bin/env bash
# check-fused.sh: the fused decode sequence (backend.h decode_fuse_rows; in the CUDA
# backend: rmsnorm in the GEMV's prologue before qkv and gate_up, the residual add in
# its epilogue after o and down, down split over k with swiglu computed on load) on
# the GPU, in one device call, with the separate ops as the baseline of the same call:
#   1. builds (build-gpu, the gathered Debian prefix);
#   2. test_backend_cpu and test_forward: the CPU twins, and the fused forward sequence
#      against the separate one, bit for bit;
#   3. test_backend_cuda with the fused sequence on (the default) and off
#      (PDSERVE_CUDA_DECODE_FUSE=0): every op against its CPU twin on fresh random
#      inputs, among them the GEMV split over k (test_gemv_split), rmsnorm_matmul,
#      matmul_add, rmsnorm_mlp_add (also bit for bit against the separate GPU ops where
#      the sums are the same) and their graph replay (test_fused_graph_replay);
#   4. the transformers bf16 reference on this GPU (gpu_reference.py), then
#      test_forward_cuda against it with the sequence on, off, and on with graphs off;
#      its first cases compare fused and separate decode steps bit for bit;
#   5. bench_kernels_cuda --fused: a layer's matmuls fused against separate, and the
#      GEMV split sweep against cuBLAS;
#   6. bench_model_cuda --no-prefill --cases 1x128,64x2048 --ab-fuse: the 8B decode
#      step under the separate ops, fused, fused with down unsplit, fused with every
#      matmul on the GEMV, in one process, two rounds in turn; floor and ratio beside.
# Logs go under $OUT (or build-gpu/out) as check-fused.tgz beside env.txt and
# summary.txt; the summary is printed last. About 4-6 minutes (the build is most of it).
#
# Usage (repository root, on the GPU machine; carry .deps/prefix and
# tests/.cache/tokenizers):
#   scripts/gpu/check-fused.sh
# Exit status: 0 when every test passed, 77 without a GPU, else 1 (2: build failed).
# Reads the GPU's state (nvidia-smi queries) and never changes it.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$(date +%s)

. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build
{
  gpu_header
} | tee "$out/env.txt"

gpu_build "$out/build.log" test_backend_cpu test_forward test_backend_cuda test_forward_cuda \
  bench_kernels_cuda bench_model_cuda || exit 2
export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/build-gpu
status=0
summary=()

# run NAME TIMEOUT CMD...: runs a test, logs to $out/NAME.log, records its status
run() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-34s exit %3d  %4d s' "$name" "$rc" "$(( $(date +%s) - t ))")")
  [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && status=1
  return "$rc"
}

run test_backend_cpu 120 build-gpu/test_backend_cpu
run test_forward 120 build-gpu/test_forward
run test_backend_cuda 240 build-gpu/test_backend_cuda
[ $? -eq 77 ] && { cat "$out/test_backend_cuda.log"; exit 77; }
run test_backend_cuda_fuse0 240 env PDSERVE_CUDA_DECODE_FUSE=0 build-gpu/test_backend_cuda

ref=build-gpu/gpu-ref
run gpu_reference 300 python3 tests/fixtures/models/gpu_reference.py "$ref"
PDSERVE_GPU_REF=$ref run test_forward_cuda 240 build-gpu/test_forward_cuda
PDSERVE_GPU_REF=$ref run test_forward_cuda_fuse0 240 env PDSERVE_CUDA_DECODE_FUSE=0 build-gpu/test_forward_cuda
PDSERVE_GPU_REF=$ref run test_forward_cuda_nographs 240 env PDSERVE_CUDA_GRAPHS=0 build-gpu/test_forward_cuda

run bench_kernels_fused 180 build-gpu/bench_kernels_cuda --fused
run bench_model_ab 240 build-gpu/bench_model_cuda --no-prefill --cases 1x128,64x2048 --ab-fuse

{
  echo
  echo "== tests =="
  printf '%s\n' "${summary[@]}"
  echo
  echo "-- test_backend_cuda --"
  grep -E '^(ok  |FAIL)|failed|differ' "$out/test_backend_cuda.log" | head -n 60
  echo "-- test_backend_cuda: the fused sequence at the 8B-like shapes, T = 1 and 8 --"
  grep -E '^  (gemv split [0-9]+ T=1 77x14336|rmsnorm_matmul(\(gemv on\))? T=[18] C=4096 N=1000 |matmul_add T=[18] (4096x4096|300x14336)|rmsnorm_mlp_add(\(gemv on\))? T=[18] C=(4096|2048) |graph replay [0-9]: rms)' \
    "$out/test_backend_cuda.log" | head -n 40
  for f in test_backend_cuda_fuse0 test_backend_cpu test_forward; do
    echo "-- $f --"; grep -E '^FAIL|failed' "$out/$f.log" | head -n 12
  done
  for f in test_forward_cuda test_forward_cuda_fuse0 test_forward_cuda_nographs; do
    echo "-- $f --"
    grep -E '^(ok  |FAIL)|^case|failed|graphs vs|fused vs|float32' "$out/$f.log" | head -n 30
  done
  echo
  echo "-- bench_kernels_cuda --fused --"
  grep -E '^\||ceiling|fused decode|GEMV split' "$out/bench_kernels_fused.log"
  echo
  echo "-- bench_model_cuda --no-prefill --cases 1x128,64x2048 --ab-fuse --"
  grep -vE '^decode: ' "$out/bench_model_ab.log"
  echo
  echo "total: $(( $(date +%s) - start )) s"
} | tee "$out/summary.txt"
# the tarball is written beside $out first: tar of "." must not read the file it writes
tgz=$(mktemp "${TMPDIR:-/tmp}/check-fused.XXXXXX")
(cd "$out" && tar -czf "$tgz" --exclude=env.txt --exclude=summary.txt . &&
  find . -maxdepth 1 -type f ! -name env.txt ! -name summary.txt -delete &&
  mv "$tgz" check-fused.tgz)
exit "$status"
