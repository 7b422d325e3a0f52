#!/usr/bin/env bash
# test_kv_reuse_e2e.sh: KV reuse across tiers over HTTP (docs/reuse.md), on the CPU with
# a tiny model:
#   1. `pdserve serve --kv-offload cpu,disk` with a KV cache of 32 blocks: a prompt,
#      then two others that evict it, then the prompt again: its blocks come back from
#      a lower tier (/metrics counts the load, usage counts them as cached tokens) and
#      the greedy output is the first one's; /metrics has every tier series; SIGTERM
#      leaves no shm segment or tier directory, and what an instance killed -9 before
#      it left is removed at start-up.
#   2. `pdserve up --setup co-2gpus --policy prefix-affinity --enable-prefix-caching
#      --kv-offload cpu`: requests of three prefix groups, interleaved; every request of
#      a group lands on the instance of the group's first (told apart by the instances'
#      own request counters; REUSE_TEST_POLICY=least-loaded shows this part failing).
#   2b. `pdserve up --setup dis-gpu --kv-offload cpu --kv-offload-async`: the prefill
#      instance loads the evicted prompt's blocks from its cpu tier; the output is
#      unchanged (the flag reaches the instances; on the CPU backend, whose copies are
#      synchronous, the staging copies stay synchronous: tests/test_kv_offload_async.c
#      covers the overlap on a stand-in device).
#   3. plans/reuse.json expands to its 48 points (datasets x reuse ratios x tiers x
#      colocated / disaggregated); its first point, a cpu+disk one and a cpu+disk one
#      of the Mooncake-style dataset run on the CPU.
set -uo pipefail
ROOT="${PDSERVE_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
BIN="${PDSERVE_BIN:-$ROOT/build/pdserve}"
[ -x "$BIN" ] || { echo "FAIL: no pdserve binary at $BIN"; exit 1; }
command -v curl >/dev/null || { echo "SKIP: curl is not installed"; exit 77; }

TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  local rc=$?
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  if grep -l -E "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$TMP"/*.log >/dev/null 2>&1; then
    grep -h -A 12 -E "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$TMP"/*.log | head -60
    echo "FAIL: a process reported a sanitizer error"
    rc=1
  fi
  rm -rf "$TMP"
  exit $rc
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; for f in "$TMP"/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -25 "$f"; }; done; exit 1; }

"$BIN" make-model --out "$TMP/model" --preset tiny-llama >"$TMP/make-model.log" 2>&1 || fail "make-model"

wait_port() { # LOG PID: the port of its "listening on" line
  for _ in $(seq 600); do
    local port
    port="$(sed -n 's|.*listening on http://[0-9.]*:\([0-9]*\).*|\1|p' "$1" | head -1)"
    [ -n "$port" ] && { echo "$port"; return 0; }
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# ids N SEED: N token ids (3..400) as a JSON list body
ids() { awk -v n="$1" -v s="$2" 'BEGIN { srand(s); printf "["; for (i = 0; i < n; i++) printf "%s%d", (i ? "," : ""), 3 + int(rand() * 398); printf "]" }'; }
metric() { # URL NAME-WITH-LABELS: summed value of matching series
  curl -sf "$1/metrics" | awk -v m="$2" 'index($0, m) && !/^#/ { s += $NF } END { printf "%d", s }'
}

# ---- 1. one instance, blocks come back from a tier -----------------------------------
DISKDIR="$TMP/tiers"
mkdir -p "$DISKDIR"
# a tiered instance killed -9 leaves its segment and directory; the next one removes them
"$BIN" serve --model "$TMP/model" --host 127.0.0.1 --port 0 --threads 1 --max-model-len 384 \
  --kv-cache-memory 256KiB --kv-offload cpu,disk --kv-offload-cpu-bytes 1MiB --kv-offload-disk-dir "$DISKDIR" 2>"$TMP/killed.log" &
KPID=$!
PIDS+=("$KPID")
wait_port "$TMP/killed.log" "$KPID" >/dev/null || fail "the instance to kill did not start"
kill -KILL "$KPID"
wait "$KPID" 2>/dev/null
# (any tiered instance starting reclaims a dead one's segment: one of another test run
# in parallel may have done so already)
ls /dev/shm | grep -q "pdkv-store-tier-$KPID-" ||
  echo "note: the killed instance's segment was already reclaimed by another instance"
[ -n "$(ls -A "$DISKDIR")" ] || fail "no directory left by a killed instance (test setup)"
PDSERVE_LOG=${PDSERVE_LOG:-info} "$BIN" serve --model "$TMP/model" --host 127.0.0.1 --port 0 --threads 1 --max-model-len 384 \
  --kv-cache-memory 256KiB --kv-offload cpu,disk --kv-offload-cpu-bytes 128KiB \
  --kv-offload-disk-dir "$DISKDIR" --kv-offload-disk-bytes 16MiB --kv-offload-load always 2>"$TMP/serve.log" &
SPID=$!
PIDS+=("$SPID")
PORT="$(wait_port "$TMP/serve.log" "$SPID")" || fail "serve did not start"
URL="http://127.0.0.1:$PORT"
A="$(ids 320 1)"
complete() { curl -sf "$URL/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"prompt\":$1,\"max_tokens\":8,\"temperature\":0,\"ignore_eos\":true}"; }
first="$(complete "$A")" || fail "request A"
complete "$(ids 320 2)" >/dev/null || fail "request B"
complete "$(ids 320 3)" >/dev/null || fail "request C"
sleep 0.3 # the tiers' writer thread
again="$(complete "$A")" || fail "request A again"
text() { sed -n 's|.*"text":"\([^"]*\)".*|\1|p'; }
[ "$(echo "$first" | text)" = "$(echo "$again" | text)" ] || fail "A's output changed: '$(echo "$first" | text)' vs '$(echo "$again" | text)'"
cached="$(echo "$again" | sed -n 's|.*"cached_tokens":\([0-9]*\).*|\1|p')"
loaded="$(metric "$URL" 'pdserve_kv_offload_loaded_blocks_total')"
offloaded="$(metric "$URL" 'pdserve_kv_offload_blocks_total')"
[ "$loaded" -gt 0 ] || fail "nothing loaded from a tier ($(curl -s "$URL/metrics" | grep kv_offload))"
[ "$offloaded" -gt 0 ] || fail "nothing offloaded"
[ "${cached:-0}" -ge 256 ] || fail "A again: only ${cached:-?} cached tokens"
curl -sf "$URL/metrics" >"$TMP/metrics.txt" || fail "/metrics"
for m in 'pdserve_prefix_cache_tier_hit_rate{model_name="' 'tier="gpu"' 'tier="cpu"' 'tier="disk"' \
         'pdserve_kv_offload_decisions_total' 'decision="recompute"' 'pdserve_prefix_cache_saved_tokens_total' \
         'pdserve_kv_offload_written_bytes_total' 'pdserve_kv_offload_load_seconds_per_block'; do
  grep -qF "$m" "$TMP/metrics.txt" || fail "/metrics has no $m"
done
echo "ok   serve --kv-offload cpu,disk: A's output unchanged, $cached tokens cached, $offloaded blocks offloaded, $loaded loaded"
kill -TERM "$SPID"
wait "$SPID" || fail "serve exit status $?"
grep -q "kv tiers: removed pdkv-tier-$KPID-" "$TMP/serve.log" || fail "the dead instance's tier directory was not reclaimed"
ls /dev/shm | grep -q "pdkv-store-tier-$KPID-" && fail "the dead instance's segment was not reclaimed"
[ -z "$(ls -A "$DISKDIR")" ] || fail "tier directory left: $(ls "$DISKDIR")"
ls /dev/shm 2>/dev/null | grep -q "pdkv-store-tier-$SPID-" && fail "tier shm segment left"
echo "ok   stopped: no tier directory or segment left"

# ---- 2. the router's prefix affinity ---------------------------------------------------
"$BIN" up --setup co-2gpus --model "$TMP/model" --port 0 --policy "${REUSE_TEST_POLICY:-prefix-affinity}" --enable-prefix-caching \
  --kv-offload cpu --kv-offload-cpu-bytes 4MiB -- --threads 1 --max-model-len 1024 --kv-cache-memory 4MiB \
  2>"$TMP/up.log" &
UPID=$!
PIDS+=("$UPID")
UPORT=""
for _ in $(seq 600); do
  UPORT="$(sed -n 's|.*ready: .* on http://[0-9.]*:\([0-9]*\).*|\1|p' "$TMP/up.log" | head -1)"
  [ -n "$UPORT" ] && break
  kill -0 "$UPID" 2>/dev/null || fail "pdserve up exited at start-up"
  sleep 0.1
done
[ -n "$UPORT" ] || fail "pdserve up not ready"
grep -q "policy ${REUSE_TEST_POLICY:-prefix-affinity}" "$TMP/up.log" || fail "the router does not say prefix-affinity"
mapfile -t INST < <(sed -n 's|^\[\([a-z]*[0-9]*\)\] pdserve serve: listening on \(http://127.0.0.1:[0-9]*\) (model.*|\2|p' "$TMP/up.log")
[ "${#INST[@]}" = 2 ] || fail "expected 2 instances, got ${INST[*]}"
grep -q -- "--kv-offload" "$TMP/up.log" || grep -q "kv tiers: tier 1 cpu" "$TMP/up.log" || fail "instances got no --kv-offload"
served() { metric "$1" 'pdserve_request_success_total{'; }
declare -A owner
spread=""
for round in 1 2 3; do
  for g in 1 2 3; do
    # group g: one 600-character stem, then a suffix of this round's
    stem="$(awk -v g="$g" 'BEGIN { srand(g * 77); for (i = 0; i < 100; i++) printf "w%d ", int(rand() * 1000) }')"
    body="{\"prompt\":\"$stem round $round\",\"max_tokens\":2,\"temperature\":0}"
    b0="$(served "${INST[0]}")"
    b1="$(served "${INST[1]}")"
    curl -sf "http://127.0.0.1:$UPORT/v1/completions" -H 'Content-Type: application/json' -d "$body" >/dev/null ||
      fail "group $g round $round"
    for _ in $(seq 50); do [ "$(served "${INST[0]}")" != "$b0" ] || [ "$(served "${INST[1]}")" != "$b1" ] && break; sleep 0.02; done
    if [ "$(served "${INST[0]}")" != "$b0" ]; then who=0; else who=1; fi
    [ -z "${owner[$g]:-}" ] && owner[$g]=$who
    [ "${owner[$g]}" = "$who" ] || fail "group $g went to instance ${owner[$g]} then to $who (round $round)"
    spread="$spread$who"
  done
done
echo "ok   prefix-affinity: each of 3 prefix groups stayed on one instance over 3 rounds (instances: $spread)"
kill -TERM "$UPID"
wait "$UPID" || fail "pdserve up exit status $?"

# ---- 2b. disaggregated: the prefill instance loads from its tiers ------------------------
"$BIN" up --setup dis-gpu --model "$TMP/model" --port 0 --enable-prefix-caching --kv-offload cpu --kv-offload-cpu-bytes 4MiB \
  --kv-offload-async -- --threads 1 --max-model-len 384 --kv-cache-memory 256KiB 2>"$TMP/dis.log" &
DPID=$!
PIDS+=("$DPID")
DPORT=""
for _ in $(seq 600); do
  DPORT="$(sed -n 's|.*ready: .* on http://[0-9.]*:\([0-9]*\).*|\1|p' "$TMP/dis.log" | head -1)"
  [ -n "$DPORT" ] && break
  kill -0 "$DPID" 2>/dev/null || fail "pdserve up dis-gpu exited at start-up"
  sleep 0.1
done
[ -n "$DPORT" ] || fail "pdserve up dis-gpu not ready"
PURL="$(sed -n 's|^\[prefill0\] pdserve serve: listening on \(http://127.0.0.1:[0-9]*\) (model.*|\1|p' "$TMP/dis.log")"
[ -n "$PURL" ] || fail "no prefill instance URL"
grep -q "prefill0.*--kv-offload-async: the cpu backend's copies are synchronous" "$TMP/dis.log" ||
  fail "the prefill instance got no --kv-offload-async"
URL="http://127.0.0.1:$DPORT"
first="$(complete "$A")" || fail "dis: request A"
complete "$(ids 320 2)" >/dev/null || fail "dis: request B"
complete "$(ids 320 3)" >/dev/null || fail "dis: request C"
sleep 0.3
again="$(complete "$A")" || fail "dis: request A again"
[ "$(echo "$first" | text)" = "$(echo "$again" | text)" ] || fail "dis: A's output changed"
loaded="$(metric "$PURL" 'pdserve_kv_offload_loaded_blocks_total')"
[ "$loaded" -gt 0 ] || { curl -s "$PURL/metrics" | grep -E "prefix_cache|kv_offload" | grep -v "^#"; grep -E "prefill0.*(tier|error|warn)" "$TMP/dis.log" | head; fail "dis: the prefill instance loaded nothing from its tier"; }
# the prefill instance's hit reaches the client through the decode instance's answer
dcached="$(echo "$again" | sed -n 's|.*"cached_tokens":\([0-9]*\).*|\1|p')"
[ "${dcached:-0}" -ge 256 ] || fail "dis: A again reports ${dcached:-no} cached tokens: $again"
echo "ok   dis-gpu --kv-offload cpu: the prefill instance loaded $loaded blocks from its cpu tier, A's output unchanged, usage says $dcached cached"
kill -TERM "$DPID"
wait "$DPID" || fail "pdserve up dis-gpu exit status $?"

# ---- 3. plans/reuse.json: it expands, and its first point and a two-tier one run -----------
"$BIN" sweep "$ROOT/plans/reuse.json" --db "$TMP/reuse.db" --model "$TMP/model" --dry-run >"$TMP/dry.txt" 2>"$TMP/dry.log" ||
  fail "sweep --dry-run plans/reuse.json"
grep -q "48 points: 0 done already, 48 to run" "$TMP/dry.txt" || { cat "$TMP/dry.txt"; fail "plans/reuse.json: points"; }
first="$(awk '$1 == "0" { print $2 }' "$TMP/dry.txt")"
[ "$first" = co-gpu-r0 ] || fail "plans/reuse.json: first point is '$first'"
"$BIN" sweep "$ROOT/plans/reuse.json" --db "$TMP/reuse.db" --model "$TMP/model" --setups "$first,co-cpu-disk-r90,co-cpu-disk-moon-r90" \
  >"$TMP/sweep.txt" 2>"$TMP/sweep.log" || fail "sweep plans/reuse.json"
grep -q "3 ok, 0 failed" "$TMP/sweep.txt" "$TMP/sweep.log" || { cat "$TMP/sweep.txt"; fail "plans/reuse.json: points failed"; }
grep -q "kv tiers: tier 2 disk" "$TMP"/reuse.db.logs/*co-cpu-disk-r90*.log || fail "co-cpu-disk-r90 ran without tiers"
# the results: each request's cached tokens and the servers' tier counters, in the
# report's KV reuse table (cached %, gpu, cpu, disk hit %, loads, recomputes, ...)
"$BIN" report "$TMP/reuse.db" -o "$TMP/reuse-report" >"$TMP/reuse-table.txt" 2>"$TMP/report.log" ||
  { cat "$TMP/report.log"; fail "report of plans/reuse.json"; }
sed -n '/^KV reuse/,$p' "$TMP/reuse-table.txt" | head -n 4
row="$(awk '/^KV reuse/ { on = 1 } on && $1 == "co-cpu-disk-r90" { print; exit }' "$TMP/reuse-table.txt")"
[ -n "$row" ] || { cat "$TMP/reuse-table.txt"; fail "report: no KV reuse row for co-cpu-disk-r90"; }
# cached % > 0, and the lower tiers found blocks (cpu % + disk % > 0)
echo "$row" | awk '{ exit !($3 > 0 && $5 + $6 > 0) }' || fail "report: co-cpu-disk-r90 row without reuse: $row"
grep -q "<h2>KV reuse</h2>" "$TMP/reuse-report/index.html" || fail "report: no KV reuse section"
row="$(awk '/^KV reuse/ { on = 1 } on && $1 == "co-cpu-disk-moon-r90" { print; exit }' "$TMP/reuse-table.txt")"
echo "$row" | awk '{ exit !($3 > 0) }' || fail "report: co-cpu-disk-moon-r90 row without cached tokens: $row"
grep -q "mooncake-synthetic: 64 requests.*reuse ratio 0\.[89]" "$TMP/sweep.log" "$TMP/sweep.txt" ||
  fail "sweep: no measured reuse ratio near 0.9 for the mooncake-synthetic point"
echo "ok   plans/reuse.json: 48 points; $first, co-cpu-disk-r90 and co-cpu-disk-moon-r90 ran on the CPU; reuse recorded and reported"
echo "all KV reuse end-to-end tests passed"
