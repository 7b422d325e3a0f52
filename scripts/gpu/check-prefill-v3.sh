#!/usr/bin/env bash
# check-prefill-v3.sh: prefill attention v3 (src/backend/cuda/attention_prefill_sm90a.cu,
# wgmma + TMA) on the GPU in one device call:
#   1. builds bench_prefill_attn_cuda with the gathered Debian prefix;
#   2. prints ptxas's report for the sm_90a kernel with this machine's nvcc (registers,
#      spills, any "wgmma ... serialized" warning);
#   3. the probe: v3 against v2 on eight small steps, tiles filled by hand, then by TMA
#      (a separate process: a fault there leaves the rest to run);
#   4. v2 and v3 against the CPU backend (the 40 steps of the check), then both timed
#      at the Llama-3.2-3B shape (T = 2k, 8k, 16k from 0, 2k after 14k), beside the
#      cuBLAS GEMM rate of the same run;
#   5. only if 4 ended in a fault or a failed check: 4 again with every tile filled by
#      hand (PDSERVE_CUDA_FA3_MANUAL=1), which tells TMA errors from wgmma errors.
# A pass: the probe's rows read "ok", the check ends "every variant within the limit",
# and the timing table has a v3 row per shape (not "v3>v2").
# Logs under $OUT (or build-gpu/out): env.txt, build.log, ptxas.txt, probe.txt,
# bench.txt (and bench-manual.txt). Exit status: the bench's (0 pass, 1 check failed,
# other: fault or timeout), 2 when the build failed, 77 without a GPU.
#
# Usage (repository root, on the GPU machine; carry .deps/prefix):
#   scripts/gpu/check-prefill-v3.sh
# Reads the GPU's state (nvidia-smi queries) and never changes it.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out}
mkdir -p "$out"

. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build
gpu_header | tee "$out/env.txt"
gpu_build "$out/build.log" bench_prefill_attn_cuda || exit 2

nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Isrc -DPDSERVE_HAVE_CUDA=1 -Xptxas -v \
  -c src/backend/cuda/attention_prefill_sm90a.cu -o "$out/sm90a.o" >"$out/ptxas.txt" 2>&1
rm -f "$out/sm90a.o"
echo "== ptxas (sm_90a kernel)"
grep -E 'spill|Used|C75' "$out/ptxas.txt"

bench=build-gpu/bench_prefill_attn_cuda
echo "== probe: v3 against v2"
timeout 90 env PDSERVE_LOG=info "$bench" --probe-only --variants=v2,v3 >"$out/probe.txt" 2>&1
rc=$?
[ "$rc" -eq 77 ] && { cat "$out/probe.txt"; exit 77; }
grep -E '^\||^    |prefill attention|error|fail|abort' "$out/probe.txt"
echo "probe: exit $rc"

# summary BENCH_LOG: the check's failures and verdict, the timing table
summary() {
  grep -E '^card|^ceiling|prefill attention v3|error|abort|Abort' "$1" | head -n 8
  grep -E '\| (FAIL) \|' "$1" | head -n 20
  echo "check rows: $(grep -cE '\| ok +\|' "$1") ok, $(grep -cE '\| FAIL +\|' "$1") FAIL," \
    "$(grep -cE '\| v3>v2' "$1") ran v2 in v3's place"
  grep -E '^check:' "$1"
  grep -E '^\| (shape|T=)' "$1"
}

echo "== check and timing: v2, v3"
timeout 200 env PDSERVE_LOG=info "$bench" --no-probe --variants=v2,v3 >"$out/bench.txt" 2>&1
rc=$?
summary "$out/bench.txt"
echo "bench: exit $rc"

if [ "$rc" -ne 0 ]; then
  echo "== check and timing again, every tile filled by hand (PDSERVE_CUDA_FA3_MANUAL=1)"
  timeout 200 env PDSERVE_LOG=info PDSERVE_CUDA_FA3_MANUAL=1 "$bench" --no-probe --variants=v2,v3 \
    >"$out/bench-manual.txt" 2>&1
  echo "bench (manual copies): exit $?"
  summary "$out/bench-manual.txt"
fi
exit "$rc"
