#!/usr/bin/env bash
# test_overload.sh: `pdserve serve --max-waiting-requests N` under three times the load
# it can serve (tiny model, loopback, < 60 s):
#   1. capacity: a closed loop of S concurrent requests (S = --max-num-seqs) measures the
#      service time T (mean E2E latency) and the capacity C (requests/s);
#   2. overload: Poisson arrivals at 3 C for about 6 s. The server must shed with 503
#      (every failure is an HTTP 503 "overloaded", with Retry-After: checked by curl),
#      admit some, and keep the latency of the admitted bounded: an admitted request
#      waits behind at most N waiting + S running ones, served at C per second, so
#      p99 E2E <= 3 * ((N + S) / C + T) + 0.5 s (3x for a shared, noisy machine;
#      without shedding the queue would grow for the whole run, to seconds of waiting);
#   3. afterwards: the process is alive, /health is 200, /metrics shows 0 KV blocks in
#      use, nothing running or waiting, and the log has no sanitizer report.
# Needs python3 (reads the bench's result JSON). Exit 77 (skipped) without it.
set -uo pipefail
ROOT="${PDSERVE_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
BIN="${PDSERVE_BIN:-$ROOT/build/pdserve}"
[ -x "$BIN" ] || { echo "FAIL: no pdserve binary at $BIN"; exit 1; }
command -v python3 >/dev/null || { echo "SKIP: python3 is needed"; exit 77; }
command -v curl >/dev/null || { echo "SKIP: curl is needed"; exit 77; }

S=4            # --max-num-seqs
N=8            # --max-waiting-requests
OUT_LEN=1000   # output tokens per request: a service time of ~0.1-0.5 s on the tiny model
TMP="$(mktemp -d)"
SPID=""
cleanup() {
  [ -n "$SPID" ] && kill -KILL "$SPID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; [ -f "$TMP/serve.log" ] && tail -20 "$TMP/serve.log"; exit 1; }

"$BIN" make-model --out "$TMP/model" --preset tiny-llama >"$TMP/make-model.log" 2>&1 ||
  { cat "$TMP/make-model.log"; fail "pdserve make-model failed"; }
VOCAB="$(sed -n 's/.*"vocab_size": *\([0-9]*\).*/\1/p' "$TMP/model/config.json" | head -1)"

"$BIN" serve --model "$TMP/model" --host 127.0.0.1 --port 0 --threads 1 --max-num-seqs $S \
  --max-waiting-requests $N --max-model-len 2048 2>"$TMP/serve.log" &
SPID=$!
PORT=""
for _ in $(seq 300); do
  PORT="$(sed -n 's|.*listening on http://127.0.0.1:\([0-9]*\).*|\1|p' "$TMP/serve.log" | head -1)"
  [ -n "$PORT" ] && break
  kill -0 "$SPID" 2>/dev/null || fail "the server exited at start-up"
  sleep 0.1
done
[ -n "$PORT" ] || fail "the server did not start in 30 s"
URL="http://127.0.0.1:$PORT"

bench() { # bench NAME ARGS...: one bench run, its result in $TMP/NAME.json
  local name="$1"; shift
  "$BIN" bench --base-url "$URL" --dataset-name random --random-input-len 16 \
    --random-output-len $OUT_LEN --random-vocab-size "$((VOCAB - 8))" --ignore-eos --disable-tqdm \
    --percentile-metrics ttft,e2el --save-result --result-dir "$TMP" --result-filename "$name.json" \
    "$@" >"$TMP/$name.out" 2>&1
  [ -s "$TMP/$name.json" ] || { cat "$TMP/$name.out"; fail "$name: no bench result"; }
}

# ---- 1. capacity ------------------------------------------------------------------------------
bench capacity --num-prompts $((6 * S)) --max-concurrency $S --seed 1
read -r C T <<<"$(python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))
assert j["failed"] == 0, "failures in the capacity run: %s" % j["errors"]
e = [x for x, err in zip(j["e2els"], j["errors"]) if not err]
print("%.3f %.4f" % (j["request_throughput"], sum(e) / len(e)))' "$TMP/capacity.json")" ||
  fail "capacity run: $(cat "$TMP/capacity.out")"
RATE="$(python3 -c "print('%.2f' % (3 * $C))")"
COUNT="$(python3 -c "print(max(60, min(600, int(3 * $C * 6))))")"
echo "capacity: $C req/s, service time $T s at $S concurrent; offering $RATE req/s x $COUNT"

# ---- 2. overload ------------------------------------------------------------------------------
bench overload --num-prompts "$COUNT" --request-rate "$RATE" --seed 2 &
BPID=$!
# a burst of 2 (N + S) at once while it runs: the refused ones carry Retry-After
sleep 1
CPIDS=()
for i in $(seq $((2 * (N + S)))); do
  curl -s -o /dev/null -D "$TMP/burst$i.h" -X POST "$URL/v1/completions" --max-time 50 \
    -d "{\"prompt\":[1,2,3],\"max_tokens\":$OUT_LEN,\"ignore_eos\":true}" &
  CPIDS+=($!)
done
wait "${CPIDS[@]}" "$BPID"
grep -l "^HTTP/1.1 503" "$TMP"/burst*.h >/dev/null || fail "no 503 in a burst of $((2 * (N + S))) while overloaded"
for h in $(grep -l "^HTTP/1.1 503" "$TMP"/burst*.h); do
  r="$(tr -d '\r' <"$h" | sed -n 's/^Retry-After: *//ip')"
  [ -n "$r" ] && [ "$r" -ge 1 ] || fail "a 503 without Retry-After: $(cat "$h")"
done
python3 - "$TMP/overload.json" "$C" "$T" $N $S <<'PY' || fail "overload run: $(tail -5 "$TMP/overload.out")"
import json, sys
j = json.load(open(sys.argv[1]))
C, T, N, S = float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
errs = [e for e in j["errors"] if e]
ok = sorted(x for x, e in zip(j["e2els"], j["errors"]) if not e)
others = [e for e in errs if not e.startswith("HTTP 503")]
assert not others, "failures other than 503: %s" % others[:3]
assert errs, "nothing was shed at 3x capacity"
assert ok, "nothing was admitted"
p99 = ok[min(len(ok) - 1, int(0.99 * len(ok)))]
bound = 3 * ((N + S) / C + T) + 0.5
print("overload: %d admitted, %d shed (503); p99 E2E %.3f s, max %.3f s, bound %.3f s"
      % (len(ok), len(errs), p99, ok[-1], bound))
assert p99 <= bound, "p99 E2E %.3f s above the bound %.3f s" % (p99, bound)
PY

# ---- 3. afterwards -----------------------------------------------------------------------------
kill -0 "$SPID" 2>/dev/null || fail "the server died"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/health")" = 200 ] || fail "/health after the overload"
idle=""
for _ in $(seq 100); do
  m="$(curl -s "$URL/metrics")"
  used="$(sed -n 's/^pdserve_kv_cache_blocks_used{[^}]*} //p' <<<"$m")"
  run="$(sed -n 's/^pdserve_num_requests_running{[^}]*} //p' <<<"$m")"
  wait_="$(sed -n 's/^pdserve_num_requests_waiting{[^}]*} //p' <<<"$m")"
  if [ "$used" = 0 ] && [ "$run" = 0 ] && [ "$wait_" = 0 ]; then idle=1; break; fi
  sleep 0.1
done
[ -n "$idle" ] || fail "/metrics after the overload: $used KV blocks used, $run running, $wait_ waiting"
kill -TERM "$SPID"
wait "$SPID"
rc=$?
SPID=""
[ "$rc" = 0 ] || fail "exit status $rc after SIGTERM"
grep -q -e "AddressSanitizer" -e "runtime error" "$TMP/serve.log" && fail "sanitizer report in the log"
echo "ok: overload at 3x capacity: shed with 503 + Retry-After, bounded latency, 0 KV blocks after"
