#!/usr/bin/env bash
# check-sim-power.sh: the simulator's J/token and dis-disk checks in one device call (two
# GPUs): scripts/gpu/study.sh on PLAN (default plans/paper-batch-quick.json: profile,
# sweep, simulation, report), then, while time is left (LIMIT_S, default 540 s from the
# start):
#   1. the disk medium alone again (`pdserve profile --medium disk` on a one-point step
#      grid), to see whether the disk moved during the sweep (dis-disk's puts and reads
#      are priced from the profile's curve, taken before it);
#   2. the decode grid's power with the KV pool left zeroed (PDSERVE_PROFILE_KV_ZERO=1)
#      beside the same grid on a pool filled with data (the profiler's default), on the
#      same GPU a minute apart: what reading zeros hides.
# Measured (2x H200, 2026-11-28 15:05): with data up to 270 W above zeros, step times within
# 0.5%; the study 39 of 40 figures within 10% (docs/simulator.md, "The decode power,
# measured again").
# Results under $OUT: study.sh's env.txt, log.txt, profile.json, clocks-sim.json, report.tgz,
# results.tgz, and checks.tgz (the two checks' logs and profiles, study.sh's stdout).
# Usage (repository root, on the GPU machine; carry .deps/prefix and tests/.cache/tokenizers):
#   scripts/gpu/check-sim-power.sh             RESUME_DIR, SWEEP_TIMEOUT, PLAN as study.sh
# Exit: study.sh's status (0 done, 77 no GPU, 2 build failed, 1 otherwise).
# Read-only on the GPUs.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out-study}
mkdir -p "$out"
T0=$(date +%s)
left() { echo $(( ${LIMIT_S:-540} - ($(date +%s) - T0) )); }
OUT=$out bash scripts/gpu/study.sh > "$out/study-stdout.txt" 2>&1
rc=$?
tail -n 16 "$out/study-stdout.txt"
[ $rc = 0 ] || exit $rc
BIN=build-gpu/pdserve
one=(--model "${MODEL:-preset:llama-3.2-3b}" --device 0 --repeats 1 --no-power-cap --prefill-tokens 256 --prefill-context 0)
if [ "$(left)" -gt 40 ]; then
  timeout $(( $(left) - 5 )) "$BIN" profile "${one[@]}" --no-power --decode-batch 1 --decode-context 1024 \
    --medium disk -o "$out/disk-after.json" > "$out/disk-after.log" 2>&1
  echo "disk after the sweep: exit $?"
  grep -E 'medium disk' "$out/disk-after.log" | sed 's/^[0-9:.]* info  //'
fi
for kv in zero data; do
  [ "$(left)" -gt 25 ] || { echo "decode power ($kv): no time left"; continue; }
  z=0; [ $kv = zero ] && z=1
  PDSERVE_PROFILE_KV_ZERO=$z timeout $(( $(left) - 3 )) "$BIN" profile "${one[@]}" --decode-batch 4,16,64 \
    --decode-context 4096,16640 -o "$out/decode-power-$kv.json" > "$out/decode-power-$kv.log" 2>&1
  echo "decode power ($kv KV): exit $?"
done
python3 - "$out" <<'PY'
import json, os, sys
o = sys.argv[1]
g = {}
for kv in ("zero", "data"):
    try: g[kv] = json.load(open(os.path.join(o, f"decode-power-{kv}.json")))
    except Exception: pass
if len(g) == 2:
    a, b = g["zero"], g["data"]
    # the readings, not the fit to HBM traffic that the profile gives the simulator
    wa, wb = (x["power"].get("decode_watts_measured", x["power"]["decode_watts"]) for x in (a, b))
    print(f"{'decode point':<22}{'zeroed KV W':>12}{'data KV W':>11}{'ms zero':>9}{'ms data':>9}")
    for i, B in enumerate(a["decode"]["batch"]):
        for j, L in enumerate(a["decode"]["context"]):
            print(f"B={B:<4} L={L:<12}{wa[i][j]:>12.0f}{wb[i][j]:>11.0f}"
                  f"{a['decode']['seconds'][i][j]*1e3:>9.3f}{b['decode']['seconds'][i][j]*1e3:>9.3f}")
PY
# the device returns at most 8 files: the checks in one archive, study.sh's own six beside it
(cd "$out" && tar -czf checks.tgz $(ls disk-after.* decode-power-* 2>/dev/null) study-stdout.txt &&
  rm -f disk-after.* decode-power-* study-stdout.txt)
exit 0
