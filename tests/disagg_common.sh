# disagg_common.sh: what the router and disaggregation tests share (sourced by
# tests/test_router_e2e.sh, test_disagg_e2e.sh, test_disagg_faults.sh, test_disagg_netns.sh).
# Sets ROOT, BIN, TMP; gives a tiny model, instance and deployment starters that record
# every pid for the EXIT trap, and the leftover checks (processes, /dev/shm, store files).
set -uo pipefail
ROOT="${PDSERVE_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
BIN="${PDSERVE_BIN:-$ROOT/build/pdserve}"
MAXLEN=1024
# instances: one CPU thread each (CI has 2 cores), a small pool, a long context
SERVE_ARGS=(--threads 1 --kv-cache-memory 16MiB --max-model-len $MAXLEN --max-num-seqs 64)

command -v node >/dev/null || { echo "SKIP: node is not installed (scripts/deps.sh --test)"; exit 77; }
if ! "$ROOT/scripts/fetch-test-node.sh"; then
  echo "SKIP: the openai npm package could not be installed"
  exit 77
fi
[ -x "$BIN" ] || { echo "FAIL: no pdserve binary at $BIN"; exit 1; }

TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  local rc=$?
  # SIGTERM first: a `pdserve up` then removes its segments and store itself
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for _ in $(seq 100); do
    local alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do
    kill -KILL "$p" 2>/dev/null
    rm -f /dev/shm/pdkv-up"$p"-* 2>/dev/null
  done
  # sanitizer builds: a report in any process's log fails the test
  if grep -l -E "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|exited with status" "$TMP"/*.log \
       >/dev/null 2>&1; then
    grep -h -A 12 -E "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|exited with status" "$TMP"/*.log | head -60
    echo "FAIL: a process reported a sanitizer error or a bad exit status"
    rc=1
  fi
  rm -rf "$TMP"
  exit $rc
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }

make_model() {
  "$BIN" make-model --out "$TMP/model" --preset tiny-llama >"$TMP/make-model.log" 2>&1 ||
    { cat "$TMP/make-model.log"; fail "pdserve make-model failed"; }
  MODEL="$TMP/model"
  export PDSERVE_MODEL="$MODEL"
}

# wait_port LOG PID NAME: the port of the first "listening on" line of LOG.
wait_port() {
  local log="$1" pid="$2" name="$3" port=""
  for _ in $(seq 600); do
    port="$(sed -n 's|.*listening on http://[0-9.]*:\([0-9]*\).*|\1|p' "$log" | head -1)"
    [ -n "$port" ] && { echo "$port"; return 0; }
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; fail "$name exited at start-up"; }
    sleep 0.1
  done
  cat "$log" >&2
  fail "$name did not start in 60 s"
}

# start_serve NAME ARGS...: `pdserve serve` on a free loopback port; sets PORT, SPID.
start_serve() {
  local name="$1"; shift
  "$BIN" serve --model "$MODEL" --host 127.0.0.1 --port 0 "${SERVE_ARGS[@]}" "$@" 2>"$TMP/$name.log" &
  SPID=$!
  PIDS+=("$SPID")
  PORT="$(wait_port "$TMP/$name.log" "$SPID" "$name")"
}

# start_up NAME UP-ARGS...: `pdserve up` on a free port; sets UPORT, UPID, and
# INSTANCES (the instance URLs, from their log lines).
start_up() {
  local name="$1"; shift
  "$BIN" up --model "$MODEL" --port 0 "$@" -- "${SERVE_ARGS[@]}" 2>"$TMP/$name.log" &
  UPID=$!
  PIDS+=("$UPID")
  UPORT=""
  for _ in $(seq 600); do
    UPORT="$(sed -n 's|.*ready: .* on http://[0-9.]*:\([0-9]*\).*|\1|p' "$TMP/$name.log" | head -1)"
    [ -n "$UPORT" ] && break
    kill -0 "$UPID" 2>/dev/null || { cat "$TMP/$name.log"; fail "$name: pdserve up exited at start-up"; }
    sleep 0.1
  done
  [ -n "$UPORT" ] || { cat "$TMP/$name.log"; fail "$name: pdserve up not ready in 60 s"; }
  INSTANCES="$(sed -n 's|^\[\([a-z]*[0-9]*\)\] pdserve serve: listening on \(http://127.0.0.1:[0-9]*\) (model.*|\2|p' \
    "$TMP/$name.log" | paste -sd, -)"
}

# instance_pid LOG NAME: the pid `up` logged for instance NAME.
instance_pid() { sed -n "s|.*up: started $2 (pid \([0-9]*\)).*|\1|p" "$1" | head -1; }

# stop_up NAME: SIGTERM, exit 0 within 40 s; then no instance, segment or store file left.
stop_up() {
  local name="$1" rc=""
  local pids
  pids="$(sed -n 's|.*up: started [a-z]*[0-9]* (pid \([0-9]*\)).*|\1|p' "$TMP/$name.log")"
  kill -TERM "$UPID"
  for _ in $(seq 400); do
    if ! kill -0 "$UPID" 2>/dev/null; then wait "$UPID"; rc=$?; break; fi
    sleep 0.1
  done
  [ -n "$rc" ] || { kill -KILL "$UPID"; tail -30 "$TMP/$name.log"; fail "$name: pdserve up did not stop in 40 s"; }
  [ "$rc" = 0 ] || { tail -30 "$TMP/$name.log"; fail "$name: pdserve up exit status $rc"; }
  for p in $pids; do
    kill -0 "$p" 2>/dev/null && fail "$name: instance pid $p outlived pdserve up"
  done
  local tag="up$UPID-"
  ls /dev/shm 2>/dev/null | grep -q "pdkv-.*$tag" && fail "$name: shared memory left: $(ls /dev/shm | grep "$tag")"
  ls -d "${TMPDIR:-/tmp}"/pdserve-kv-"$tag"* >/dev/null 2>&1 && fail "$name: disk store left"
  echo "ok   $name: stopped, no process, shm segment or store file left"
}

# load URL FIELD: a number from an instance's /load.
load_field() { curl -sf "$1/load" | sed -n "s|.*\"$2\":\([0-9-]*\).*|\1|p"; }

export PDSERVE_N="${PDSERVE_N:-32}"

# make_references: one colocated instance answers tests/node/disagg.mjs's requests one at
# a time into $TMP/ref.json, the outputs every setup must reproduce (run_setup).
make_references() {
  start_serve reference
  PDSERVE_URL="http://127.0.0.1:$PORT" node "$ROOT/tests/node/disagg.mjs" reference "$TMP/ref.json" ||
    { tail -20 "$TMP/reference.log"; fail "references"; }
  kill -TERM "$SPID"; wait "$SPID"
}

# run_setup NAME UP-ARGS...: `pdserve up`, the same requests concurrently through its
# router, outputs equal to the references and every pool empty, then a clean stop.
run_setup() {
  local name="$1"; shift
  start_up "$name" "$@"
  echo "$name: router on port $UPORT, instances $INSTANCES"
  PDSERVE_URL="http://127.0.0.1:$UPORT" PDSERVE_INSTANCES="$INSTANCES" \
    node "$ROOT/tests/node/disagg.mjs" compare "$TMP/ref.json" ||
    { tail -40 "$TMP/$name.log"; fail "$name: outputs or pools"; }
  check_kv_metrics "$name"
  check_phases "$name"
  stop_up "$name"
}

# check_phases NAME: a streamed request with "pdserve_timing" through the router says
# where its TTFT went: the router's, the prefill instance's and the decode instance's
# phases, each a number of seconds >= 0 (prefill_hop, a difference, > -1 ms), their sum
# within the server-side TTFT (+1 ms), and that TTFT within the client's.
check_phases() {
  local body='{"prompt":"the phases of one request through the router, timed by each server","max_tokens":4,"stream":true,"stream_options":{"include_usage":true},"pdserve_timing":true}'
  curl -sf "http://127.0.0.1:$UPORT/v1/completions" -H 'Content-Type: application/json' \
    -d "$body" -o "$TMP/$1.phases" -w '%{time_starttransfer}\n' >"$TMP/$1.ttfb" ||
    fail "$1: the pdserve_timing request failed"
  python3 - "$TMP/$1.phases" "$(cat "$TMP/$1.ttfb")" <<'PY' || fail "$1: pdserve_timing phases"
import json, sys
t = None
for line in open(sys.argv[1]):
    if line.startswith("data: {") and '"pdserve_timing"' in line:
        t = json.loads(line[6:])["pdserve_timing"]
assert t, "no pdserve_timing in the usage chunk"
ph = t["phases"]
want = ["reserve", "prefill_hop", "queue", "prefill", "kv_queue", "kv", "decode_wait", "decode"]
assert list(ph) == want, "phases %s, expected %s" % (list(ph), want)
for k, v in ph.items():
    assert v >= (-1e-3 if k == "prefill_hop" else 0) and v < 30, "%s = %r" % (k, v)
assert ph["prefill"] > 0, "prefill %r" % ph["prefill"]
assert sum(ph.values()) <= t["ttft_s"] + 1e-3, "phases sum %.6f > ttft_s %.6f" % (sum(ph.values()), t["ttft_s"])
ttfb = float(sys.argv[2])
assert 0 < t["ttft_s"] <= ttfb + 1e-3, "server ttft_s %.6f, client's first byte %.6f" % (t["ttft_s"], ttfb)
print("ok   phases: " + ", ".join("%s %.2f ms" % (k, v * 1e3) for k, v in ph.items()) +
      "; ttft_s %.2f ms, client's first byte %.2f ms" % (t["ttft_s"] * 1e3, ttfb * 1e3))
PY
}

# check_kv_metrics NAME: the prefill instances' /metrics counted the requests' KV
# transfers, their seconds and the seconds after their prefills (tail).
check_kv_metrics() {
  local n=0 sec=0 tail=0 u m
  for u in ${INSTANCES//,/ }; do
    m="$(curl -sf "$u/metrics")" || fail "$1: no /metrics at $u"
    n=$(awk -v a="$n" '/^pdserve_kv_transfers_total/ {a += $NF} END {print a}' <<<"$m")
    sec=$(awk -v a="$sec" '/^pdserve_kv_transfer_seconds_total/ {a += $NF} END {print a}' <<<"$m")
    tail=$(awk -v a="$tail" '/^pdserve_kv_transfer_tail_seconds_total/ {a += $NF} END {print a}' <<<"$m")
  done
  awk -v n="$n" -v s="$sec" -v t="$tail" 'BEGIN {exit !(n >= 8 && s > 0 && t > 0)}' ||
    fail "$1: KV transfer metrics: $n transfers, $sec s, tail $tail s"
  echo "ok   $1: the prefill side counted $n KV transfers ($sec s, $tail s from the prefills' ends to the transfers' ends)"
  # a store's puts by part (disk): as many puts as transfers, their parts within the transfers' time
  # and its gets on the decode side: one per transfer, their polls' time by part
  local puts=0 parts=0 gets=0 gparts=0
  for u in ${INSTANCES//,/ }; do
    m="$(curl -sf "$u/metrics")" || fail "$1: no /metrics at $u"
    puts=$(awk -v a="$puts" '/^pdserve_kv_store_puts_total/ {a += $NF} END {print a}' <<<"$m")
    parts=$(awk -v a="$parts" '/^pdserve_kv_store_put_seconds_total/ {a += $NF} END {print a}' <<<"$m")
    gets=$(awk -v a="$gets" '/^pdserve_kv_store_gets_total/ {a += $NF} END {print a}' <<<"$m")
    gparts=$(awk -v a="$gparts" '/^pdserve_kv_store_get_seconds_total/ {a += $NF} END {print a}' <<<"$m")
  done
  if [ "$puts" != 0 ]; then
    awk -v p="$puts" -v n="$n" -v x="$parts" -v s="$sec" 'BEGIN {exit !(p == n && x > 0 && x <= s)}' ||
      fail "$1: store puts $puts of $n transfers, their parts $parts s of $sec s"
    echo "ok   $1: $puts store puts, $parts s by part within the transfers' $sec s"
    awk -v g="$gets" -v n="$n" -v x="$gparts" 'BEGIN {exit !(g == n && x > 0)}' ||
      fail "$1: store gets $gets of $n transfers, their parts $gparts s"
    echo "ok   $1: $gets store gets, $gparts s by part"
  fi
}
