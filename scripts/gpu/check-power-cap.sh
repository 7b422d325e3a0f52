#!/usr/bin/env bash
# check-power-cap.sh: the power-cap clock model's inputs on a GPU, in one device call
# (docs/simulator.md, "Clock under a power cap"). Builds with the gathered Debian prefix,
# runs the model's CPU tests (the stand-in NVML), then profiles a small grid of the
# Llama-3.2-3B shape on GPU 0 with power on, which now also reads the enforced power
# limit and runs each serving shape back to back (prefill 2048 and 256 rows at no
# context, decode 16 and 64 sequences at 4096) for 2 s after 1.5 s idle, sampled every
# 20 ms. Every NVML call it makes is a read: no clock, no limit is set.
#
# Prints: the card, nvidia-smi's power and clock report (read-only), the enforced limit,
# the idle power, per shape the settled power, SM clock (first and settled), the step
# time back to back against the grid's price of the same shape, the clock's onset and
# NVML's clock event reasons, the window the onsets imply, and per shape the step time
# the clock model gives at the settled clock, grid x (a f0 / f + 1 - a), against the one
# measured back to back (the compute-fraction scaling checked at a clock the cap chose).
# Then steady-quick simulated on this profile with and
# without the cap (exercises the model on measured inputs; not a validation: the run's
# engine and host differ).
# What to look for (expectations, not measured yet): the enforced limit 700 W on an
# H200 SXM or H100 SXM; the 2048-row prefill above the limit at its first samples, its
# settled clock below the base with reasons "sw_power_cap"; decode shapes under the
# limit at the base clock. A settled clock held by "sw_thermal"/"hw_*" instead says the
# cap is not the cause.
# Logs and the profile go under $OUT (or build-gpu/out); the summary is printed last.
#
# Usage (repository root, on the GPU machine; carry .deps/prefix):
#   scripts/gpu/check-power-cap.sh
# Exit status: 0 when the tests passed and the profile holds the limit and points, 77
# without a GPU, else 1 (2: build failed).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out}
mkdir -p "$out"

. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build
{
  gpu_header
} | tee "$out/env.txt"
command -v nvidia-smi > /dev/null 2>&1 || { echo "no GPU"; exit 77; }
nvidia-smi -q -i 0 -d POWER,CLOCK,PERFORMANCE > "$out/nvidia-smi-q.txt" 2>&1
grep -E 'Product Name|Current Power Limit|Requested Power Limit|Default Power Limit|Max Power Limit|Power Draw|^ +SM +:|SW Power Cap|SW Thermal' \
  "$out/nvidia-smi-q.txt" | head -20

gpu_build "$out/build.log" pdserve fake_nvml test_sim_power_cap test_power_profile_cap test_power_profile_clocks || exit 2
export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/build-gpu PDSERVE_BIN=$PWD/build-gpu/pdserve

rc=0
ctest --test-dir build-gpu -R '^(test_sim_power_cap|test_power_profile_cap|test_power_profile_clocks)$' \
  --output-on-failure > "$out/tests.log" 2>&1 || rc=1
tail -n 4 "$out/tests.log"

t0=$(date +%s)
build-gpu/pdserve profile --model preset:llama-3.2-3b --device 0 --repeats 3 \
  --prefill-tokens 256,2048 --prefill-context 0,4096 --decode-batch 1,16,64 --decode-context 1024,4096 \
  -o "$out/profile-cap.json" > "$out/profile.log" 2>&1 || rc=1
echo "profile: $(( $(date +%s) - t0 )) s"
grep -E 'power cap|base clock' "$out/profile.log"

python3 - "$out/profile-cap.json" <<'EOF' | tee "$out/summary.txt" || rc=1
import json, math, sys
p = json.load(open(sys.argv[1]))
pw, ck = p["power"], p["clock"]
cap = pw.get("cap")
if not cap or not cap.get("points"):
    print("FAIL: no power.cap points in the profile:", (cap or {}).get("source", pw.get("source")))
    sys.exit(1)
f0, g = ck["base_mhz"], ck["dynamic_power_exponent"]
lim, idle = cap["limit_w"], cap["idle_w"]
print(f"device {p['device']}; base clock {f0:.0f} MHz; grid power: idle {pw.get('idle_w', 0):.0f} W, "
      f"prefill {pw.get('prefill_w', 0):.0f} W, decode {pw.get('decode_w', 0):.0f} W")
print(f"enforced power limit {lim:.0f} W; idle before the runs {idle:.0f} W; "
      f"window {cap.get('window_s', 'not estimated')} ({cap.get('window_source', 'no onset above the limit')})")
def grid_s(kind, rows, ctx):
    g_ = p[kind]; xs = g_["tokens" if kind == "prefill" else "batch"]; ys = g_["context"]
    return g_["seconds"][xs.index(rows)][ys.index(ctx)] if rows in xs and ctx in ys else float("nan")
print(f"{'shape':<22}{'W':>6}{'first':>7}{'MHz':>6}{'ms/step':>9}{'grid ms':>9}{'model ms':>9}{'meas/model':>11}"
      f"{'onset s':>9}  reasons")
for q in cap["points"]:
    gs = grid_s(q["kind"], int(q["rows"]), int(q["context"]))
    a = ck["prefill_compute_fraction" if q["kind"] == "prefill" else "decode_compute_fraction"]
    model = gs * (a * f0 / q["mhz"] + 1 - a) if q["mhz"] > 0 else float("nan")
    onset = "-" if q.get("onset_s") is None else f"{q['onset_s']:.2f}"
    print(f"{q['kind'] + ' ' + str(int(q['rows'])) + '@' + str(int(q['context'])):<22}{q['watts']:>6.0f}"
          f"{q['first_mhz']:>7.0f}{q['mhz']:>6.0f}{q['seconds'] * 1e3:>9.3f}{gs * 1e3:>9.3f}{model * 1e3:>9.3f}"
          f"{q['seconds'] / model:>11.3f}{onset:>9}  {q['reasons'] or '-'}")
print("grid ms: the profile's price of the shape (timed at the base clock, median of rounds); model ms: that at "
      "the settled clock through the compute fraction")
EOF

for cap in --power-cap ""; do
  build-gpu/pdserve sim plans/steady-quick.json --profile "$out/profile-cap.json" $cap --json "$out/sim$cap.json" \
    > "$out/sim$cap.log" 2>&1 || rc=1
done
echo "steady-quick on this profile, with the cap:"; grep -E 'power cap|^\| (co|dis)' "$out/sim--power-cap.log" | cut -c1-140
echo "and without it:"; grep -E '^\| (co|dis)' "$out/sim.log" | cut -c1-140
echo "tests: $([ $rc = 0 ] && echo passed || echo FAILED; grep -E 'tests passed|tests failed' "$out/tests.log" | tail -1)" | tee -a "$out/summary.txt"
exit $rc
