#!/usr/bin/env bash
# steptrace.sh: engine step traces of one setup of a study plan, one sweep per request
# rate, in one device call (docs/simulator.md, "Pricing a deployment's own traces"):
# builds pdserve, then for each rate runs `pdserve sweep` on a copy of PLAN cut to
# SETUP and that rate, with `serve --step-trace` writing every instance's trace into
# traces-rRATE/ (one file per process), so that each load's traces calibrate a
# profile (`pdserve sim --price-traces DIR --write-profile`) that is checked at the
# other load.
# Read-only on the GPUs. Usage (repository root, on the GPU machine; carry .deps/prefix
# and tests/.cache/tokenizers):
#   PLAN=plans/steady-quick.json SETUP=dis-gpu-whole RATES="4 16" scripts/gpu/steptrace.sh
# Results under $OUT (or build-gpu/out-steptrace): env.txt, log.txt and
# steptrace-SETUP.tgz (the traces, the databases, every deployment's log).
# Exit: 0 done, 77 no GPU, 2 build failed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out-steptrace}
mkdir -p "$out"
PLAN=${PLAN:-plans/steady-quick.json}
SETUP=${SETUP:-dis-gpu-whole}
RATES=${RATES:-4 16}
MODEL=${MODEL:-preset:llama-3.2-3b}
TOK=tests/.cache/tokenizers/llama3
exec > >(tee -a "$out/log.txt") 2>&1
. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build
{ gpu_header; echo "plan: $PLAN  setup: $SETUP  rates: $RATES  model: $MODEL"; } | tee "$out/env.txt"
command -v nvidia-smi >/dev/null 2>&1 || { echo "steptrace: no GPU here"; exit 77; }
gpu_build "$out/build.log" pdserve || exit 2
rm -f "$out/build.log"
work=$(mktemp -d "${TMPDIR:-/tmp}/steptrace.XXXXXX")
status=0
for rate in $RATES; do
  mkdir -p "$work/traces-r$rate"
  python3 - "$PLAN" "$SETUP" "$rate" "$work/traces-r$rate" "$work/plan-r$rate.json" <<'PY' || exit 1
import json, sys
plan, setup, rate, tdir, dst = sys.argv[1:6]
p = json.load(open(plan))
label = lambda s: s if isinstance(s, str) else s.get("label", s["name"])
p["setups"] = [s for s in p["setups"] if label(s) == setup]
if not p["setups"]:
    sys.exit("steptrace: no setup labelled %s in %s" % (setup, plan))
p["loads"]["request_rates"] = [float(rate)]
p.setdefault("serve_args", {})["step-trace"] = tdir + "/trace-%p.txt"
json.dump(p, open(dst, "w"), indent=1)
PY
  timeout 400 build-gpu/pdserve sweep "$work/plan-r$rate.json" --db "$work/st-r$rate.db" \
    --model "$MODEL" --tokenizer "$TOK"
  rc=$?
  echo "sweep at $rate req/s: exit $rc; traces: $(ls "$work/traces-r$rate" | tr '\n' ' ')"
  [ "$rc" -ne 0 ] && status=1
done
tar -C "$work" -czf "$out/steptrace-$SETUP.tgz" .
rm -rf "$work"
exit "$status"
