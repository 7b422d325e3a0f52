#!/usr/bin/env bash
# test_energy_serve.sh: energy and clocks through the whole tool, on the CPU, with the
# stand-in NVML (tests/fake_nvml.c through PDSERVE_NVML_LIB; never a real GPU):
#   1. `pdserve serve --energy-gpus 0`: /metrics has the GPU energy counter (advancing),
#      idle, power, clocks and pdserve_energy_measured{component="gpu"} 1;
#   2. `pdserve bench` against it: energy per token / output token from the delta,
#      GPU idle-subtracted energy;
#   3. without NVML: measured 0 and no energy line (no fake zeros); the bench says
#      "not measured";
#   4. --sm-clock without --allow-clock-control is refused; with it the server locks
#      the clock and, on SIGTERM, resets it (the fake's call log, from the server's pid);
#   5. `pdserve sweep` with a clock point: skipped without permission; with it, the
#      point runs at the locked clock, and the database holds measured GPU energy rows
#      (whole and idle-subtracted), power samples at that clock and J/token;
#   6. the sampler's ring into the database: a sweep of a disaggregated CPU deployment
#      (prefill on stand-in GPU 0, decode on GPU 1, a fake RAPL tree) stores each
#      instance's 100 ms samples (power, clocks, utilisation, temperature) with its
#      role, and RAPL once per host; GET /metrics/power-samples needs the secret or key;
#   7. --energy-meter-cmd on /metrics scrapes: two at a time for 2 s with
#      --energy-meter-interval 0.5 run the command at most once per 0.5 s.
set -uo pipefail
ROOT="${PDSERVE_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
BIN="${PDSERVE_BIN:-$ROOT/build/pdserve}"
[ -x "$BIN" ] || { echo "FAIL: no pdserve binary at $BIN"; exit 1; }
FAKE="${PDSERVE_FAKE_NVML:-${PDSERVE_BUILD:-$ROOT/build}/libfake_nvml.so}"
[ -f "$FAKE" ] || { echo "SKIP: no stand-in NVML at $FAKE (run through ctest)"; exit 77; }
command -v curl >/dev/null || { echo "SKIP: curl missing"; exit 77; }

TMP="$(mktemp -d)"
SPID=""
cleanup() { [ -n "$SPID" ] && kill "$SPID" 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT
fail() { echo "FAIL: $*"; for f in "$TMP"/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -15 "$f"; }; done; exit 1; }

"$BIN" make-model --out "$TMP/model" --preset tiny-llama >"$TMP/make-model.log" 2>&1 || fail "make-model"
SERVE=(--model "$TMP/model" --host 127.0.0.1 --port 0 --device cpu --threads 1 --max-model-len 256
       --kv-cache-memory 16MiB)
export FAKE_NVML_LOG="$TMP/nvml.calls" FAKE_NVML_GPUS=2 FAKE_NVML_POWER_W=150,90

# start NAME ARGS...: a server on a free port; sets URL and SPID.
start() {
  local name=$1; shift
  "$BIN" serve "${SERVE[@]}" "$@" 2>"$TMP/$name.log" &
  SPID=$!
  URL=""
  for _ in $(seq 300); do
    URL=$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$TMP/$name.log" | head -1 | sed 's/listening on //')
    [ -n "$URL" ] && break
    kill -0 "$SPID" 2>/dev/null || fail "$name: the server exited at start-up"
    sleep 0.1
  done
  [ -n "$URL" ] || fail "$name: no listening line in 30 s"
}
stop() {
  kill -TERM "$SPID"
  wait "$SPID"
  local rc=$?
  SPID=""
  [ $rc = 0 ] || fail "$1: exit status $rc after SIGTERM"
}
val() { grep -F "$1" | grep -v '^#' | awk '{print $NF}' | head -1; }

# ---- 1. /metrics with the stand-in NVML ------------------------------------------------
PDSERVE_NVML_LIB="$FAKE" start fake --energy-gpus 0 --energy-idle-seconds 0.3
grep -q "power: GPU 0 idle 150.0 W" "$TMP/fake.log" || fail "no idle baseline at start-up"
# the counter must advance by 150 W x the time between the two scrapes; the times
# around each scrape bound that interval, however slow a loaded machine makes them
T0=$(date +%s.%N)
M1=$(curl -sf "$URL/metrics") || fail "GET /metrics"
T1=$(date +%s.%N)
sleep 0.5
T2=$(date +%s.%N)
M2=$(curl -sf "$URL/metrics") || fail "GET /metrics (2)"
T3=$(date +%s.%N)
echo "$M2" | grep -q '^pdserve_energy_measured{component="gpu"} 1$' || fail "gpu not measured: $M2"
echo "$M2" | grep -q '^pdserve_energy_measured{component="meter"} 0$' || fail "meter flag"
IW=$(echo "$M2" | val 'pdserve_gpu_idle_power_watts{host=')
echo "$M2" | grep -q '^pdserve_gpu_idle_power_watts{host="[^"]*",gpu="0",role="colocated"} ' &&
  awk -v w="$IW" 'BEGIN { exit !(w > 148 && w < 152) }' || fail "idle line ($IW)"
echo "$M2" | grep -q '^pdserve_gpu_power_watts{host="[^"]*",gpu="0",role="colocated"} 150.000$' || fail "power line"
echo "$M2" | grep -q '^pdserve_gpu_sm_clock_mhz{.*gpu="0".*} [0-9]' || fail "clock line"
echo "$M2" | grep -q 'gpu="1"' && fail "GPU 1 is not this instance's"
E1=$(echo "$M1" | val 'pdserve_gpu_energy_joules{')
E2=$(echo "$M2" | val 'pdserve_gpu_energy_joules{')
awk -v a="$E1" -v b="$E2" -v t0="$T0" -v t1="$T1" -v t2="$T2" -v t3="$T3" \
  'BEGIN { d = b - a; exit !(d > 150 * (t2 - t1) * 0.8 && d < 150 * (t3 - t0) * 1.25 + 1) }' ||
  fail "energy counter did not advance by ~150 W x the $T1..$T2 s between scrapes: $E1 -> $E2"
echo "ok: /metrics energy lines (counter $E1 -> $E2 J)"

# ---- 2. the bench reads them ---------------------------------------------------------------
"$BIN" bench --base-url "$URL" --dataset-name random --random-input-len 16 --random-output-len 8 \
  --random-vocab-size 200 --num-prompts 6 --ignore-eos --save-result --result-dir "$TMP" \
  --result-filename bench.json >"$TMP/bench.out" 2>"$TMP/bench.log" || fail "bench"
grep -q "Energy per output token (J/tok):" "$TMP/bench.out" || { cat "$TMP/bench.out"; fail "no J/output token"; }
grep -q "GPU energy, idle-subtracted (J):" "$TMP/bench.out" || { cat "$TMP/bench.out"; fail "no idle-subtracted line"; }
grep -q "GPU idle power (W):  *1[45][0-9]" "$TMP/bench.out" || { cat "$TMP/bench.out"; fail "idle power"; }
python3 - "$TMP/bench.json" <<'PY' || fail "bench JSON energy"
import json, sys
e = json.load(open(sys.argv[1]))["energy"]
assert e["measured"], e
w = e["window_s"]
assert w > 0 and abs(e["gpu_j"] - 150 * w) < 150 * 0.3 + 15, e   # 150 W over the window
assert abs(e["gpu_net_j"]) < 20, e                                 # power == idle in the fake
assert e["j_per_output_token"] > 0 and abs(e["total_j"] - e["gpu_j"]) < 1e-9, e
PY
stop fake
echo "ok: bench energy from the counters"

# ---- 3. no NVML: not measured, no zeros ------------------------------------------------------
PDSERVE_NVML_LIB="$TMP/absent.so" start none --energy-gpus 0
M=$(curl -sf "$URL/metrics") || fail "GET /metrics (no NVML)"
echo "$M" | grep -q '^pdserve_energy_measured{component="gpu"} 0$' || fail "gpu should be not measured"
echo "$M" | grep -q '_energy_joules{' && fail "an energy line without a meter: $M"
"$BIN" bench --base-url "$URL" --dataset-name random --random-input-len 8 --random-output-len 4 \
  --random-vocab-size 200 --num-prompts 2 >"$TMP/bench2.out" 2>"$TMP/bench2.log" || fail "bench (no NVML)"
grep -q "energy: not measured" "$TMP/bench2.out" || fail "bench should say not measured"
stop none
echo "ok: without NVML, not measured"

# ---- 4. clock lock and restore through serve -------------------------------------------------
"$BIN" serve "${SERVE[@]}" --energy-gpus 0 --sm-clock 1410 >"$TMP/refused.out" 2>&1
[ $? = 2 ] || fail "--sm-clock without --allow-clock-control should exit 2"
grep -q "pass --allow-clock-control" "$TMP/refused.out" || fail "refusal message: $(cat "$TMP/refused.out")"
grep -q SetGpuLockedClocks "$TMP/nvml.calls" 2>/dev/null && fail "refused, yet a clock was set"
PDSERVE_NVML_LIB="$FAKE" start clock --energy-gpus 1 --energy-idle-seconds 0 --sm-clock 1410 --allow-clock-control
CPID=$SPID
grep -q "pid=$CPID nvmlDeviceSetGpuLockedClocks gpu=1 min=1410 max=1410 rc=0" "$TMP/nvml.calls" || fail "no lock"
# "now" is the sampler's latest tick (every 100 ms): the first may predate the lock
locked=""
for _ in $(seq 50); do
  curl -sf "$URL/metrics" | grep -q '^pdserve_gpu_sm_clock_mhz{.*gpu="1".*} 1410$' && { locked=1; break; }
  sleep 0.1
done
[ -n "$locked" ] || fail "/metrics clock after lock: $(curl -sf "$URL/metrics" | grep '^pdserve_gpu_sm_clock_mhz')"
stop clock
grep -q "pid=$CPID nvmlDeviceResetGpuLockedClocks gpu=1 rc=0" "$TMP/nvml.calls" || fail "no reset after SIGTERM"
PDSERVE_NVML_LIB="$FAKE" "$BIN" serve "${SERVE[@]}" --energy-gpus 0 --sm-clock 1234 --allow-clock-control \
  >"$TMP/badclock.out" 2>&1 && fail "an unsupported clock was accepted"
grep -q "1234" "$TMP/badclock.out" || fail "unsupported clock message"
echo "ok: --sm-clock locks, SIGTERM restores, refusals"

# ---- 5. a sweep with energy and a clock point ----------------------------------------------
cat >"$TMP/plan.json" <<'JSON'
{
  "name": "energy",
  "setups": ["co-1gpu"],
  "serve_args": {"device": "cpu", "threads": 1, "max-model-len": 256, "kv-cache-memory": "16MiB",
                 "energy-gpus": "0", "energy-idle-seconds": "0.2"},
  "dataset": {"input_len": 16, "output_len": 24},
  "loads": {"batch_sizes": [3]},
  "clocks": {"same_mhz": [1410]},
  "warmup_requests": 1,
  "start_timeout_s": 60,
  "request_timeout_s": 60
}
JSON
: >"$TMP/nvml.calls"
PDSERVE_NVML_LIB="$FAKE" "$BIN" sweep "$TMP/plan.json" --db "$TMP/r.db" --model "$TMP/model" 2>"$TMP/sweep1.log" ||
  fail "sweep without permission"
grep -q "0 ok, 0 failed, 1 skipped" "$TMP/sweep1.log" || fail "clock point should be skipped"
grep -q SetGpuLockedClocks "$TMP/nvml.calls" && fail "a skipped point locked a clock"
PDSERVE_NVML_LIB="$FAKE" "$BIN" sweep "$TMP/plan.json" --db "$TMP/r.db" --model "$TMP/model" \
  --allow-clock-control 2>"$TMP/sweep2.log" || fail "sweep with permission"
grep -q "1 ok, 0 failed, 0 skipped" "$TMP/sweep2.log" || fail "clock point should run"
grep -q "nvmlDeviceSetGpuLockedClocks gpu=0 min=1410 max=1410 rc=0" "$TMP/nvml.calls" || fail "sweep: no lock"
grep -q "nvmlDeviceResetGpuLockedClocks gpu=0 rc=0" "$TMP/nvml.calls" || fail "sweep: no reset"
q() { sqlite3 "$TMP/r.db" "$1"; }
[ "$(q "SELECT count(*) FROM energy WHERE component='gpu' AND device='0' AND role='colocated' AND measured=1 AND joules > 0 AND abs(idle_w - 150) < 2 AND net_joules IS NOT NULL")" = 1 ] ||
  fail "energy rows: $(q 'SELECT * FROM energy')"
[ "$(q "SELECT count(*) FROM energy WHERE component='cpu' AND measured=0")" = 1 ] || fail "cpu not-measured row"
[ "$(q "SELECT count(*) FROM summaries WHERE j_per_token > 0 AND j_per_output_token > 0 AND j_per_token_net IS NOT NULL")" = 1 ] ||
  fail "summary J/token: $(q 'SELECT energy_j, j_per_token, j_per_token_net FROM summaries')"
N=$(q "SELECT count(*) FROM power_samples WHERE component='gpu' AND device='0' AND sm_mhz=1410 AND abs(power_w-150) < 1e-6")
[ "${N:-0}" -ge 1 ] || fail "power samples: $(q 'SELECT * FROM power_samples LIMIT 5')"
"$BIN" report "$TMP/r.db" -o "$TMP/report" --no-plots >"$TMP/table.txt" 2>"$TMP/report.log" || fail "report"
grep -q "n/m" "$TMP/table.txt" && grep '^co-1gpu' "$TMP/table.txt" | grep -q "n/m" && fail "J/token should be measured: $(cat "$TMP/table.txt")"
echo "ok: sweep energy rows ($N power samples), clock point locked and restored"

# ---- 6. the sampler's ring into the database ---------------------------------------------------
PC="$TMP/powercap"
mkdir -p "$PC/intel-rapl:0"
echo package-0 >"$PC/intel-rapl:0/name"
echo 262143328850 >"$PC/intel-rapl:0/max_energy_range_uj"
echo 1000000 >"$PC/intel-rapl:0/energy_uj"
cat >"$TMP/ring.json" <<'JSON'
{
  "name": "ring",
  "setups": [{"name": "dis-cpu", "options": {"prefill-args": "--energy-gpus 0", "decode-args": "--energy-gpus 1"}}],
  "serve_args": {"device": "cpu", "threads": 1, "max-model-len": 256, "kv-cache-memory": "16MiB",
                 "energy-idle-seconds": "0.2"},
  "dataset": {"input_len": 16, "output_len": 48},
  "loads": {"batch_sizes": [4]},
  "idle_s": 1.0,
  "start_timeout_s": 60,
  "request_timeout_s": 60
}
JSON
PDSERVE_NVML_LIB="$FAKE" PDSERVE_POWERCAP_ROOT="$PC" "$BIN" sweep "$TMP/ring.json" --db "$TMP/ring.db" \
  --model "$TMP/model" 2>"$TMP/sweep3.log" || fail "ring sweep"
grep -q "1 ok, 0 failed" "$TMP/sweep3.log" || fail "ring sweep: the point failed"
r() { sqlite3 "$TMP/ring.db" "$1"; }
[ "$(r "SELECT value FROM meta WHERE key='schema_version'")" = 4 ] || fail "schema version"
for dev in "0 prefill 150" "1 decode 90"; do
  set -- $dev
  n=$(r "SELECT count(*) FROM power_samples WHERE source='ring' AND component='gpu' AND device='$1' AND role='$2'
         AND abs(power_w - $3) < 1e-6 AND sm_mhz > 0 AND mem_mhz > 0 AND util_gpu IS NOT NULL
         AND util_mem IS NOT NULL AND temp_c IS NOT NULL")
  [ "${n:-0}" -ge 10 ] || fail "ring: GPU $1 ($2): $n samples: $(r "SELECT * FROM power_samples WHERE device='$1' LIMIT 3")"
  # 100 ms apart: the median gap of consecutive samples
  gap=$(r "SELECT t_s FROM power_samples WHERE source='ring' AND device='$1' ORDER BY t_s" |
        awk 'NR > 1 { print $1 - p } { p = $1 }' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
  awk -v g="$gap" 'BEGIN { exit !(g > 0.08 && g < 0.15) }' || fail "ring: GPU $1 samples ${gap} s apart, not 0.1"
done
[ "$(r "SELECT count(*) FROM power_samples WHERE component='gpu' AND device NOT IN ('0','1')")" = 0 ] ||
  fail "ring: a GPU no instance serves"
[ "$(r "SELECT count(*) FROM power_samples WHERE source='scrape'")" = 0 ] || fail "ring: scrapes beside the ring"
n=$(r "SELECT count(*) FROM power_samples WHERE source='ring' AND component='cpu' AND device='package-0' AND power_w >= 0")
[ "${n:-0}" -ge 10 ] || fail "ring: RAPL samples: $n"
[ "$(r "SELECT count(DISTINCT role) FROM power_samples WHERE component='cpu'")" = 1 ] ||
  fail "ring: the host's RAPL stored once per instance, not once"
# from the instances' start (the plan's 1 s idle window before the bench, t < 0) to the
# end of the point (the tiny bench takes milliseconds): the last fetch came after it
r "SELECT min(t_s) < -1.0 AND max(t_s) > -0.5 FROM power_samples WHERE component='gpu'" | grep -qx 1 ||
  fail "ring: samples from $(r "SELECT min(t_s), max(t_s) FROM power_samples") s: not the whole point"
echo "ok: sweep stored the instances' 100 ms rings: $(r "SELECT count(*) FROM power_samples") samples, gap ${gap} s, roles and RAPL"

# the endpoint itself: secret or key when set, paging by since
PDSERVE_NVML_LIB="$FAKE" start ring --energy-gpus 0 --energy-idle-seconds 0 --internal-secret s3 --api-key k9
code=$(curl -s -o /dev/null -w '%{http_code}' "$URL/metrics/power-samples")
[ "$code" = 401 ] || fail "/metrics/power-samples without credentials: $code"
code=$(curl -s -o /dev/null -w '%{http_code}' -H 'X-PD-Internal-Secret: wrong' "$URL/metrics/power-samples")
[ "$code" = 401 ] || fail "/metrics/power-samples with a wrong secret: $code"
# the sampler ticks every 100 ms: wait for five samples past 0.25 s (up to 10 s)
for _ in $(seq 100); do
  curl -sf -H 'X-PD-Internal-Secret: s3' "$URL/metrics/power-samples?since=0.25" | python3 -c '
import json, sys; sys.exit(0 if len(json.load(sys.stdin)["gpus"][0]["samples"]) >= 5 else 1)' && break
  sleep 0.1
done
curl -sf -H 'Authorization: Bearer k9' "$URL/metrics/power-samples" >"$TMP/ps.json" || fail "power-samples with the key"
curl -sf -H 'X-PD-Internal-Secret: s3' "$URL/metrics/power-samples?since=0.25&max=2" >"$TMP/ps2.json" ||
  fail "power-samples with the secret"
code=$(curl -s -o /dev/null -w '%{http_code}' -H 'X-PD-Internal-Secret: s3' "$URL/metrics/power-samples?since=x")
[ "$code" = 400 ] || fail "power-samples?since=x: $code"
python3 - "$TMP/ps.json" "$TMP/ps2.json" <<'PY' || fail "power-samples JSON"
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:3])
g = a["gpus"][0]
assert a["role"] == "colocated" and g["gpu"] == 0 and len(g["samples"]) >= 4, a
assert a["gpu_fields"] == ["t_s", "power_w", "sm_mhz", "mem_mhz", "util_gpu", "util_mem", "temp_c"]
assert all(s[1] == 150 and len(s) == 7 for s in g["samples"]), g
s2 = b["gpus"][0]["samples"]
assert len(s2) == 2 and b["gpus"][0]["more"] and all(s[0] > 0.25 for s in s2), b
PY
stop ring
echo "ok: /metrics/power-samples: 401 without the secret or key, paging by since"

# ---- 7. the meter command on scrapes: rate limited -------------------------------------------------
: >"$TMP/meter.runs"
PDSERVE_NVML_LIB="$TMP/absent.so" start meter --energy-idle-seconds 0 --energy-meter-label node \
  --energy-meter-cmd "echo run >> '$TMP/meter.runs'; wc -l < '$TMP/meter.runs'" --energy-meter-interval 0.5
sleep 0.6   # the start reading is older than the interval: the first scrape runs the command
t0=$(date +%s%N)
scrapes=0
while [ $(( ($(date +%s%N) - t0) / 1000000 )) -lt 2000 ]; do   # two at a time for 2 s
  curl -sf "$URL/metrics" >"$TMP/m.txt" & c=$!
  curl -sf "$URL/metrics" >/dev/null
  wait "$c"
  scrapes=$((scrapes + 2))
done
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
runs=$(( $(wc -l <"$TMP/meter.runs") - 1 ))   # less the start reading
grep -q '^pdserve_node_energy_joules{' "$TMP/m.txt" || fail "meter: no node energy line: $(grep node "$TMP/m.txt")"
limit=$(( ms / 500 + 2 ))
[ "$scrapes" -ge 20 ] || fail "meter: only $scrapes scrapes in $ms ms"
[ "$runs" -ge 2 ] && [ "$runs" -le "$limit" ] || fail "meter: $scrapes scrapes in $ms ms ran the command $runs times (at most $limit)"
stop meter
echo "ok: $scrapes scrapes in $ms ms ran the meter command $runs time(s) (one per 0.5 s at most)"
echo "all energy serve tests passed"
