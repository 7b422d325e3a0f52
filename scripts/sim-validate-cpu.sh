#!/usr/bin/env bash
# sim-validate-cpu.sh: the demo plan real and simulated on this host's CPU
# (docs/simulator.md, "The demo plan, real and simulated"): the demo's model, a profile
# with the serving path through processes, RUNS real sweeps of the plan back to back,
# the plan simulated (with and without the steps-inside-a-deployment factor), and the
# spread table of sim_spread.py for each.
#
#   scripts/sim-validate-cpu.sh [OUT_DIR]          (default: sim-validate-cpu)
#   RUNS=3 PLAN=plans/demo.json PRESET=small-llama THREADS=1 scripts/sim-validate-cpu.sh
#   RUNS=2 PLAN=plans/reuse.json PRESET=tiny-llama scripts/sim-validate-cpu.sh   (the lower KV tiers)
#   CALIBRATE=1 ...: also a traced run that calibrates the profile's step factors
#   PIN=1 ...: every instance, and the profiler, on physical cores of its own (the plan's
#              serve_args "cpu-list": "auto", `pdserve profile --cpus auto`): a host with
#              at least 2 x THREADS + 1 cores
#   REPEATS=N ...: each point of the plan run N times in each real run (the plan's
#              "repeats"); sim_spread.py takes the median of a point's repeats
#
# Builds with scripts/build.sh first (PDSERVE_BIN=PATH: that binary instead). Takes 6-10 minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-sim-validate-cpu}
runs=${RUNS:-3}
plan=${PLAN:-plans/demo.json}
preset=${PRESET:-small-llama}
threads=${THREADS:-1}
if [ -n "${PDSERVE_BIN:-}" ]; then
  bin=$PDSERVE_BIN
else
  scripts/build.sh > /dev/null
  bin=$PWD/build/pdserve
fi
mkdir -p "$out"
pin=()
[ -n "${PIN:-}" ] && pin=(--cpus auto)
if [ -n "${PIN:-}" ] || [ -n "${REPEATS:-}" ]; then
  python3 - "$plan" "$out/plan-run.json" "${PIN:-}" "${REPEATS:-}" <<'PY'
import json, sys
src, dst, pin, repeats = sys.argv[1:5]
p = json.load(open(src))
if pin:
    p.setdefault("serve_args", {})["cpu-list"] = "auto"
if repeats:
    p["repeats"] = int(repeats)
json.dump(p, open(dst, "w"), indent=1)
PY
  plan="$out/plan-run.json"
fi
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
if [ ! -f "$out/model/config.json" ]; then
  "$bin" make-model --out "$out/model" --preset "$preset" > "$out/make-model.log" 2>&1
fi
log "profile (load average $(cut -d' ' -f1-3 /proc/loadavg))"
"$bin" profile --model "$out/model" --threads "$threads" --medium gpu,cpu,disk --tiers cpu,disk --serving-processes \
  --serving-max-len 512 "${pin[@]}" -o "$out/prof.json" > "$out/profile.log" 2>&1
grep -E "engine steps|contention|serving path, " "$out/profile.log" | sed 's/^/  /' || true
reals=()
for i in $(seq 1 "$runs"); do
  log "real run $i of $runs (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  rm -f "$out/run$i.db"
  "$bin" sweep "$plan" --model "$out/model" --db "$out/run$i.db" > "$out/run$i.log" 2>&1
  reals+=("$out/run$i.db")
done
# CALIBRATE=1: one more real run with step traces, its colocated and disaggregated
# setups apart, whose factors calibrate a copy of the profile (sim --price-traces
# --write-profile); the plan is then also simulated on it, against the runs above (not
# the traced one)
variants=(factor no-factor)
if [ -n "${CALIBRATE:-}" ]; then
  cal="$out/prof.json"
  for kind in co dis; do
    rm -rf "$out/traces-$kind" && mkdir -p "$out/traces-$kind"
    python3 - "$plan" "$kind" "$out/traces-$kind" "$out/plan-$kind.json" <<'PY'
import json, sys
plan, kind, tdir, dst = sys.argv[1:5]
p = json.load(open(plan))
name = lambda s: s if isinstance(s, str) else s["name"]
p["setups"] = [s for s in p["setups"] if name(s).startswith(kind + "-")]
p.setdefault("serve_args", {})["step-trace"] = tdir + "/trace-%p.txt"
json.dump(p, open(dst, "w"), indent=1)
PY
    log "traced run, $kind setups (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    "$bin" sweep "$out/plan-$kind.json" --model "$out/model" --db "$out/traced-$kind.db" > "$out/traced-$kind.log" 2>&1
    dep=colocated
    [ "$kind" = dis ] && dep=disaggregated
    "$bin" sim --price-traces "$out/traces-$kind" --profile "$cal" --write-profile "$out/prof-cal-$kind.json" \
      --deployment "$dep" > "$out/calibrate-$kind.log" 2>&1 || { cat "$out/calibrate-$kind.log"; exit 1; }
    cal="$out/prof-cal-$kind.json"
  done
  cp "$cal" "$out/prof-calibrated.json"
  variants+=(calibrated)
fi
for variant in "${variants[@]}"; do
  cp "$out/run1.db" "$out/sim-$variant.db"
  flag=()
  prof="$out/prof.json"
  [ "$variant" = no-factor ] && flag=(--no-step-factor)
  [ "$variant" = calibrated ] && prof="$out/prof-calibrated.json"
  "$bin" sim "$plan" --profile "$prof" --db "$out/sim-$variant.db" --tokenizer "$out/model" "${flag[@]}" \
    > "$out/sim-$variant.log" 2>&1
  log "simulated, $variant:"
  python3 scripts/sim_spread.py "${reals[@]}" --sim "$out/sim-$variant.db" --markdown | tee "$out/spread-$variant.md"
done
log "done: $out"
