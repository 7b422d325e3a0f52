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

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) (plus working tree)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,power.draw,temperature.gpu \
    --format=csv 2>&1 || echo "nvidia-smi: not available"
} | tee "$out/env.txt"

# CUDA's root: /usr/local/cuda where it exists (CMakeLists.txt looks there), else the
# versioned folder the GPU machine has, handed to CMake explicitly.
. scripts/gpu/cuda-env.sh   # the scripts run from the repository root
gen=()
if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi
[ -f build-gpu/CMakeCache.txt ] && gen=()

t0=$(date +%s)
if ! { cmake -S . -B build-gpu "${gen[@]}" -DPDSERVE_PREFIX=.deps/prefix -DPDSERVE_CUDA=ON \
         -DCMAKE_BUILD_TYPE=RelWithDebInfo "${cuda_args[@]}" &&
       cmake --build build-gpu -j"$jobs" --target test_backend_cuda bench_kernels_cuda; } \
     >"$out/build.log" 2>&1; then
  tail -n 60 "$out/build.log"
  echo "check-cuda: build failed (full log: build.log)"
  exit 2
fi
echo "build: $(( $(date +%s) - t0 )) s"

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
