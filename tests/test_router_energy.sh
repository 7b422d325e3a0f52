#!/usr/bin/env bash
# test_router_energy.sh: a disaggregated deployment's router sums its instances'
# energy meters by GPU and role on /metrics (stand-in NVML: two GPUs, one per role).
set -uo pipefail
BIN=${PDSERVE_BIN:-build/pdserve}
FAKE=${PDSERVE_BUILD:-build}/libfake_nvml.so
[ -f "$FAKE" ] || { echo "SKIP: $FAKE not built"; exit 77; }
TMP=$(mktemp -d)
UP=
cleanup() { [ -n "$UP" ] && kill "$UP" 2>/dev/null; wait 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT
fail() { echo "FAIL: $*"; cat "$TMP/up.log" | tail -20; exit 1; }

"$BIN" make-model --out "$TMP/model" --preset tiny-llama 2>/dev/null || fail "make-model"
PDSERVE_NVML_LIB=$FAKE FAKE_NVML_GPUS=2 FAKE_NVML_ENERGY_STEP_MJ=500 \
  "$BIN" up --setup dis-cpu --model "$TMP/model" --port 0 \
  --prefill-args "--energy-gpus 0" --decode-args "--energy-gpus 1" -- --energy-idle-seconds 0 \
  >"$TMP/up.log" 2>&1 &
UP=$!
url=
for _ in $(seq 1 600); do # 60 s: slow under sanitizers on a loaded machine
  url=$(grep -o 'ready: dis-cpu on http://[0-9.:]*' "$TMP/up.log" | sed 's/.* on //')
  [ -n "$url" ] && break
  kill -0 "$UP" 2>/dev/null || fail "pdserve up exited"
  sleep 0.1
done
[ -n "$url" ] || fail "pdserve up did not come up"
# the instances' meters start with them: under sanitizers on a loaded machine the
# router's first scrapes may come before every meter has its first reading, so the
# checks below look at the first answer (within 10 s) that holds both roles' sums
m=
for _ in $(seq 1 50); do
  m=$(curl -s "$url/metrics")
  echo "$m" | grep -q '^pdserve_role_energy_joules{role="prefill"}' &&
    echo "$m" | grep -q '^pdserve_role_energy_joules{role="decode"}' && break
  sleep 0.2
done
echo "$m" | grep -q '^pdserve_energy_measured{component="gpu"} 1' || fail "gpu energy not measured"
echo "$m" | grep -q '^pdserve_gpu_energy_joules{host="[^"]*",gpu="0",role="prefill"}' || fail "no prefill GPU meter"
echo "$m" | grep -q '^pdserve_gpu_energy_joules{host="[^"]*",gpu="1",role="decode"}' || fail "no decode GPU meter"
echo "$m" | grep -q '^pdserve_role_energy_joules{role="prefill"}' || fail "no prefill role sum"
echo "$m" | grep -q '^pdserve_role_energy_joules{role="decode"}' || fail "no decode role sum"
echo "$m" | grep -q '^pdserve_energy_measured{component="cpu"} 0' || fail "cpu should be not measured here"
echo "$m" | grep -E 'energy|role_' | grep -v '^#'
echo "router energy: ok"
