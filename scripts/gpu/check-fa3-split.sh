#!/usr/bin/env bash
# check-fa3-split.sh: prefill attention v3 with its key tiles split over blocks
# (attention_prefill_sm90a.cu, fa3_nsplit) against the same kernel unsplit
# (PDSERVE_CUDA_FA3_SPLIT=1), in one device call on one H100/H200:
#   1. test_backend_cuda (every op against the CPU; test_attention's short chunks after
#      long prefixes split and unsplit), then the same under compute-sanitizer memcheck;
#   2. scripts/gpu/check-short-chunk.sh on the default and on PDSERVE_CUDA_FA3_SPLIT=1
#      (GAPS=0): the server's prefill of N tokens after a cached 4,096-token prefix;
#   3. test_forward_cuda (the forward pass against transformers on the same GPU).
# Read-only on the GPU. Usage (repository root, on the GPU machine; carry .deps/prefix
# and tests/.cache/tokenizers): scripts/gpu/check-fa3-split.sh
# Results under $OUT (or build-gpu/out-fa3-split): env.txt, tests.txt, and
# check-short-chunk's log.txt and requests-K.txt.
# Exit: 0 all ran and passed, 77 no GPU, 2 build failed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out-fa3-split}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build, gpu_run, gpu_test_forward, ...
gpu_header | tee "$out/env.txt"
command -v nvidia-smi >/dev/null 2>&1 || { echo "no GPU"; exit 77; }
gpu_build "$out/build.log" pdserve test_backend_cuda test_forward_cuda || exit 2
rm -f "$out/build.log"
export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/build-gpu
status=0
summary=()
gpu_run test_backend_cuda 240 build-gpu/test_backend_cuda
if command -v compute-sanitizer >/dev/null 2>&1; then
  gpu_run memcheck 300 compute-sanitizer --tool memcheck --print-limit 20 build-gpu/test_backend_cuda
fi
gpu_short_chunk "PDSERVE_CUDA_FA3_SPLIT=1"
gpu_test_forward
gpu_tests_summary "ERROR SUMMARY|FAIL|failed"
printf '%s\n' "${summary[@]}"
exit "$status"
