#!/usr/bin/env bash
# check-sim-warm.sh: the simulator's changes that touch a GPU machine, in one device call:
# builds with the gathered Debian prefix, runs the simulator's tests and the server /
# router end-to-end tests (the quiesced listening socket is now closed after MHD stops),
# then profiles a small grid of the Llama-3.2-3B shape on GPU 0 twice in the same
# process tree: with one untimed warm-up run before each cheap point (the profiles of
# docs/results/study-gpu, PDSERVE_PROFILE_WARM_RUNS=1) and with the train of ten that
# the profiler now runs, and prints each point of both with their ratio and the wall
# time of each profile.
# Expected (not yet measured on a GPU): every ratio within 0.95-1.05 (graphed decode
# steps and large prefill chunks do not depend on the warm-up), the second profile at
# most 60 s longer. A ratio outside that range means GPU profiles taken before the
# change priced those points differently.
# Logs and both profiles go under $OUT (or build-gpu/out); the summary is printed last.
#
# Usage (repository root, on the GPU machine; carry .deps/prefix):
#   scripts/gpu/check-sim-warm.sh
# Exit status: 0 when every test passed and both profiles were written, 77 without a
# GPU, else 1 (2: build failed). Reads the GPU's state and never changes it.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out}
mkdir -p "$out"

. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build
{
  gpu_header
} | tee "$out/env.txt"
command -v nvidia-smi > /dev/null 2>&1 || { echo "no GPU"; exit 77; }

gpu_build "$out/build.log" pdserve test_sim test_sim_serving || exit 2
export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/build-gpu PDSERVE_BIN=$PWD/build-gpu/pdserve

rc=0
ctest --test-dir build-gpu -R '^(test_sim|test_sim_serving|test_server_e2e|test_router_e2e)$' --output-on-failure \
  > "$out/tests.log" 2>&1 || rc=1
tail -n 4 "$out/tests.log"

grid=(--model preset:llama-3.2-3b --device 0 --repeats 3 --no-power
      --prefill-tokens 256,2048 --prefill-context 0,4096 --decode-batch 1,8,64 --decode-context 1024,4096)
for w in 1 10; do
  t0=$(date +%s.%N)
  PDSERVE_PROFILE_WARM_RUNS=$w build-gpu/pdserve profile "${grid[@]}" -o "$out/warm$w.json" > "$out/profile-warm$w.log" 2>&1 || rc=1
  t1=$(date +%s.%N)
  echo "profile with $w warm-up run(s): $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s" | tee -a "$out/summary.txt"
done

python3 - "$out/warm1.json" "$out/warm10.json" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
print(f"{'point':<28}{'1 warm-up ms':>14}{'10 warm-up ms':>15}{'ratio':>8}")
for grid, x, y in (("prefill", "tokens", "context"), ("decode", "batch", "context")):
    for i, xv in enumerate(a[grid][x]):
        for j, yv in enumerate(a[grid][y]):
            s1, s10 = a[grid]["seconds"][i][j], b[grid]["seconds"][i][j]
            print(f"{grid} {x[0].upper()}={xv} {y[0].upper()}={yv:<10}{s1 * 1e3:>14.3f}{s10 * 1e3:>15.3f}{s10 / s1:>8.3f}")
EOF
echo "tests: $([ $rc = 0 ] && echo passed || echo FAILED; grep -E 'tests passed|tests failed' "$out/tests.log" | tail -1)" | tee -a "$out/summary.txt"
exit $rc
