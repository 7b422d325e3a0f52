#!/usr/bin/env bash
# check-cuda.sh: the one script a GPU-machine call runs for the CUDA backend: builds
# with the gathered Debian prefix, runs test_backend_cuda (every CUDA op against the
# CPU backend) and bench_kernels_cuda (each op against the card's copy and GEMM
# ceilings), and leaves the logs under $OUT (or build-gpu/out where $OUT is unset).
#
# Usage (repository root, on the GPU machine; carry .deps/prefix):
#   scripts/gpu/check-cuda.sh            build, test, bench
#   SANITIZE=1 scripts/gpu/check-cuda.sh also runs the test under compute-sanitizer
# Exit status: the test's (77 = skipped: no GPU), or the build's on a build failure.
# Reads the GPU's state (nvidia-smi queries) and never changes it.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out}
mkdir -p "$out"
jobs=$(nproc 2>/dev/null || echo 4)

. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build
{
  gpu_header
} | tee "$out/env.txt"

gpu_build "$out/build.log" test_backend_cuda bench_kernels_cuda || exit 2

export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/build-gpu
t0=$(date +%s)
timeout 300 build-gpu/test_backend_cuda >"$out/test.log" 2>&1
test_rc=$?
grep -E '^(ok  |FAIL|SKIP)|failed|error' "$out/test.log" | head -n 80
echo "test_backend_cuda: exit $test_rc, $(( $(date +%s) - t0 )) s (full log: test.log)"

if [ "$test_rc" -ne 77 ]; then
  timeout 240 build-gpu/bench_kernels_cuda 2>"$out/bench.err" | tee "$out/bench.txt"
  echo "bench_kernels_cuda: exit ${PIPESTATUS[0]}"
fi

# last, as it is the slowest and the least needed: the test again under memcheck
if [ "${SANITIZE:-0}" = 1 ] && command -v compute-sanitizer >/dev/null 2>&1; then
  t0=$(date +%s)
  timeout "${SANITIZE_TIMEOUT:-150}" compute-sanitizer --tool memcheck --print-limit 20 \
    build-gpu/test_backend_cuda >"$out/memcheck.log" 2>&1
  echo "memcheck: exit $?, $(( $(date +%s) - t0 )) s, $(grep -c 'Invalid' "$out/memcheck.log") invalid accesses"
  grep -E 'ERROR SUMMARY' "$out/memcheck.log"
fi
exit "$test_rc"
