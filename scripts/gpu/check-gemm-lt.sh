#!/usr/bin/env bash
# check-gemm-lt.sh: the matmuls through cuBLASLt by row bucket (src/backend/cuda/gemm_lt.cu)
# against cublasGemmEx, in one device call on one GPU:
#   1. bench_kernels_cuda --first-call ex, then lt, each in a process of its own: a row
#      count's first matmul, its second and its steady time, Llama-3.2-3B's shapes;
#   2. scripts/gpu/check-short-chunk.sh on the default route and on PDSERVE_CUDA_GEMM=ex
#      (GAPS=0): the serving engine's prefill of a chunk whose row count is new;
#   3. test_backend_cuda (every op against the CPU, test_matmul_buckets among them) and
#      test_forward_cuda (the forward pass against transformers on the same GPU).
# Read-only on the GPU. Usage (repository root, on the GPU machine; carry .deps/prefix
# and tests/.cache/tokenizers): scripts/gpu/check-gemm-lt.sh
# NO_TESTS=1 skips 3. Results under $OUT (or build-gpu/out-gemm-lt): env.txt, tests.txt,
# first-ex.txt, first-lt.txt, and check-short-chunk's log.txt and requests-K.txt.
# Exit: 0 all ran and passed, 77 no GPU, 2 build failed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out-gemm-lt}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build, gpu_run, gpu_test_forward, ...
gpu_header | tee "$out/env.txt"
command -v nvidia-smi >/dev/null 2>&1 || { echo "no GPU"; exit 77; }
gpu_build "$out/build.log" pdserve test_backend_cuda test_forward_cuda bench_kernels_cuda || exit 2
rm -f "$out/build.log"
export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/build-gpu
status=0
summary=()
for r in ex lt; do
  timeout 300 build-gpu/bench_kernels_cuda --first-call "$r" > "$out/first-$r.txt" 2>&1 || status=1
done
gpu_short_chunk "PDSERVE_CUDA_GEMM=ex"
if [ "${NO_TESTS:-0}" != 1 ]; then
  gpu_run test_backend_cuda 240 build-gpu/test_backend_cuda
  gpu_test_forward
  gpu_tests_summary "matmul.*(cuBLASLt|cublasGemmEx)|matmul_warm|FAIL"
fi
printf '%s\n' "${summary[@]}"
exit "$status"
