#!/usr/bin/env bash
# test_disagg_faults.sh: failures of a disaggregated request, each ending with an
# OpenAI-style error to the affected clients only, the other requests served, every
# surviving instance's KV pool back to empty, and nothing left in /dev/shm or on disk:
#   1. kill -9 a prefill instance while requests wait on it (it stalls its transfers):
#      its requests fail (502), those on the other prefill instance succeed, the
#      decode side's reservations are freed, the router routes around it afterwards;
#   2. kill -9 a decode instance mid-stream (`pdserve up --setup 1p2d`): its streams end
#      with an error event, the others finish; `up` removes the dead one's segments;
#   3. a transfer stalled past its deadline (--debug-stall-transfer-ms 3000 against
#      --kv-transfer-timeout 1): 504 within the deadline, both pools empty; and a
#      request queued behind another's long transfer: 504 at its own deadline, from the
#      prefill instance, the long one served; and a prefill instance stopped past a
#      deadline: the router checks its health instead of taking it out of rotation;
#   4. a full disk store (--kv-store-capacity 256KiB): a long prompt fails, short ones
#      are served.
source "$(dirname "${BASH_SOURCE[0]}")/disagg_common.sh"
make_model
DISAGG="$ROOT/tests/node/disagg.mjs"

# ---- 1. kill -9 a prefill instance --------------------------------------------------------------
start_serve d1 --role decode --kv-medium tcp; D1=$PORT
start_serve p1 --role prefill --kv-medium tcp --debug-stall-transfer-ms 5000; P1=$PORT; P1PID=$SPID
start_serve p2 --role prefill --kv-medium tcp; P2=$PORT
start_serve r1 --role router --policy round-robin --kv-transfer-timeout 20 \
  --prefill "http://127.0.0.1:$P1,http://127.0.0.1:$P2" --decode "http://127.0.0.1:$D1"; R1=$PORT; R1PID=$SPID
out="$(PDSERVE_URL="http://127.0.0.1:$R1" PDSERVE_INSTANCES="http://127.0.0.1:$D1,http://127.0.0.1:$P2" \
  PDSERVE_N=8 PDSERVE_KILL_PID=$P1PID PDSERVE_KILL_AFTER_MS=1000 node "$DISAGG" faults kill-prefill)" ||
  { tail -20 "$TMP/r1.log" "$TMP/d1.log"; fail "kill-prefill: pools"; }
echo "kill-prefill: $out"
echo "$out" | grep -q '"ok":4,"failed":4' || fail "kill-prefill: expected 4 served and 4 failed: $out"
echo "$out" | grep -q '"status":502' || fail "kill-prefill: expected 502 errors: $out"
out="$(PDSERVE_URL="http://127.0.0.1:$R1" PDSERVE_INSTANCES="http://127.0.0.1:$D1,http://127.0.0.1:$P2" \
  PDSERVE_N=8 node "$DISAGG" faults plain)" || fail "after kill-prefill: pools"
echo "$out" | grep -q '"ok":8,' || fail "after kill-prefill: the router still sends requests to the dead instance: $out"
echo "ok   kill -9 prefill: its 4 requests failed (502), the other 4 served, pools empty, then 8/8 rerouted"
kill -TERM "$R1PID"

# ---- 2. kill -9 a decode instance mid-stream --------------------------------------------------------
start_up killdec --setup 1p2d --medium gpu --policy round-robin
victim="$(instance_pid "$TMP/killdec.log" decode0)"
survivors="$(echo "$INSTANCES" | tr , '\n' | while read -r u; do
  [ "$(curl -sf "$u/load" | sed -n 's|.*"role":"\([a-z]*\)".*|\1|p')" = prefill ] && echo "$u"; done)"
decode_ports="$(sed -n 's|^\[decode1\] pdserve serve: listening on \(http://127.0.0.1:[0-9]*\) (model.*|\1|p' "$TMP/killdec.log")"
out="$(PDSERVE_URL="http://127.0.0.1:$UPORT" PDSERVE_INSTANCES="$survivors,$decode_ports" PDSERVE_N=8 \
  PDSERVE_KILL_PID="$victim" node "$DISAGG" faults kill-decode)" || { tail -30 "$TMP/killdec.log"; fail "kill-decode: pools"; }
echo "kill-decode: $out"
# decode0 had 4 of the 8 streams (round-robin), killed once every stream had its first
# token: those still running fail (normally all 4), every other one completes
ok="$(echo "$out" | sed -n 's|.*"ok":\([0-9]*\),"failed":\([0-9]*\).*|\1 \2|p')"
set -- $ok
[ "$1" -ge 4 ] && [ "$2" -ge 1 ] && [ $(( $1 + $2 )) = 8 ] || fail "kill-decode: expected 1 to 4 failed, the rest served: $out"
echo "$out" | grep -q 'decode instance failed' || fail "kill-decode: errors do not name the decode instance: $out"
ls /dev/shm | grep -q "up$UPID-decode0" || echo "note: the killed decode instance left no segment to clean"
stop_up killdec
echo "ok   kill -9 decode: its $2 running stream(s) ended with an error, $1 finished, pools empty, segments removed"

# ---- 3. a transfer stalled past its deadline --------------------------------------------------------
start_serve d3 --role decode --kv-medium gpu --kv-name "faults$$"; D3=$PORT; D3PID=$SPID
start_serve p3 --role prefill --kv-medium gpu --debug-stall-transfer-ms 3000; P3=$PORT; P3PID=$SPID
start_serve r3 --role router --kv-transfer-timeout 1 --prefill "http://127.0.0.1:$P3" --decode "http://127.0.0.1:$D3"
R3=$PORT; R3PID=$SPID
t0=$(date +%s%N)
code="$(curl -s -o "$TMP/stall.json" -w '%{http_code}' "http://127.0.0.1:$R3/v1/completions" \
  -d '{"prompt":"1 2 3 4 5","max_tokens":4,"temperature":0}')"
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
[ "$code" = 504 ] || fail "stall: HTTP $code, not 504: $(cat "$TMP/stall.json")"
grep -q '"kv_transfer_timeout"' "$TMP/stall.json" || fail "stall: no kv_transfer_timeout code: $(cat "$TMP/stall.json")"
[ "$ms" -lt 2500 ] || fail "stall: the error took $ms ms for a 1 s deadline"
out="$(PDSERVE_URL="http://127.0.0.1:$R3" PDSERVE_INSTANCES="http://127.0.0.1:$D3,http://127.0.0.1:$P3" PDSERVE_N=4 \
  PDSERVE_STREAM=0 node "$DISAGG" faults plain)" || fail "stall: pools not empty"
echo "$out" | grep -q '"ok":0,"failed":4' || fail "stall: expected 4 failures: $out"
echo "ok   stalled transfer: 504 after $ms ms (deadline 1 s), 4 more failed likewise, both pools empty"
kill -TERM "$R3PID" "$P3PID" "$D3PID"
wait "$R3PID" "$P3PID" "$D3PID"
ls /dev/shm | grep -q "pdkv-faults$$" && fail "stall: shared memory left: $(ls /dev/shm | grep "faults$$")"

# ---- 3b. a request queued behind a long transfer is answered at its own deadline ----------------------
# The prefill instance's transfer worker runs one transfer at a time. Request X (router
# rx, 8 s deadline) holds it 2.5 s (the stall stands in for a slow medium's put); request
# Y (router ry, 1 s deadline) is prefilled meanwhile and waits behind X. Y must be
# answered 504 at its own deadline by the prefill instance (well before ry's own curl
# limit, the deadline + 0.5 s, which would count the instance as failed), X must be
# served, and both pools end empty.
start_serve dq --role decode --kv-medium tcp; DQ=$PORT; DQPID=$SPID
start_serve pq --role prefill --kv-medium tcp --debug-stall-transfer-ms 2500; PQ=$PORT; PQPID=$SPID
start_serve rx --role router --kv-transfer-timeout 8 --prefill "http://127.0.0.1:$PQ" --decode "http://127.0.0.1:$DQ"
RX=$PORT; RXPID=$SPID
start_serve ry --role router --kv-transfer-timeout 1 --prefill "http://127.0.0.1:$PQ" --decode "http://127.0.0.1:$DQ"
RY=$PORT; RYPID=$SPID
curl -s -o "$TMP/qx.json" -w '%{http_code}' "http://127.0.0.1:$RX/v1/completions" \
  -d '{"prompt":"1 2 3 4 5 6","max_tokens":4,"temperature":0}' >"$TMP/qx.code" &
XPID=$!
sleep 0.3
t0=$(date +%s%N)
code="$(curl -s -o "$TMP/qy.json" -w '%{http_code}' "http://127.0.0.1:$RY/v1/completions" \
  -d '{"prompt":"7 8 9","max_tokens":4,"temperature":0}')"
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
[ "$code" = 504 ] || fail "queued: HTTP $code, not 504: $(cat "$TMP/qy.json")"
grep -q 'transfer worker was busy' "$TMP/qy.json" ||
  fail "queued: the answer is not the prefill instance's own (its router gave up first?): $(cat "$TMP/qy.json")"
# (before the worker would have reached it, after X's 2.5 s stall)
[ "$ms" -lt 2400 ] || fail "queued: the 504 took $ms ms for a 1 s deadline"
wait "$XPID"
[ "$(cat "$TMP/qx.code")" = 200 ] || fail "queued: the long request answered $(cat "$TMP/qx.code"): $(cat "$TMP/qx.json")"
grep -q "unhealthy\|checking its health" "$TMP/ry.log" && fail "queued: router ry counted the prefill instance as failed"
for u in "http://127.0.0.1:$DQ" "http://127.0.0.1:$PQ"; do
  for _ in $(seq 50); do [ "$(load_field "$u" kv_blocks_used)" = 0 ] && break; sleep 0.05; done
  [ "$(load_field "$u" kv_blocks_used)" = 0 ] || fail "queued: blocks left on $u"
done
echo "ok   a request queued behind a 2.5 s transfer: 504 from the prefill instance after $ms ms (deadline 1 s), the long one served, pools empty"
kill -TERM "$RXPID" "$RYPID" "$PQPID" "$DQPID"
wait "$RXPID" "$RYPID" "$PQPID" "$DQPID"

# ---- 3c. a prefill instance that answers late once stays in rotation -------------------------------
# The prefill instance is stopped (SIGSTOP) from before a request with a 1 s deadline
# until 2 s after it, so it cannot answer by then: the router answers the client 504 at
# the deadline + 0.5 s and checks the instance's health at once, instead of taking it
# out of rotation; the instance answers that check once resumed, and the next requests
# through the same router are served.
start_serve dl --role decode --kv-medium tcp; DL=$PORT; DLPID=$SPID
start_serve pl --role prefill --kv-medium tcp; PL=$PORT; PLPID=$SPID
start_serve rl --role router --kv-transfer-timeout 1 --prefill "http://127.0.0.1:$PL" --decode "http://127.0.0.1:$DL"
RL=$PORT; RLPID=$SPID
kill -STOP "$PLPID"
( sleep 2; kill -CONT "$PLPID" ) &
RESUMER=$!
code="$(curl -s -o "$TMP/late.json" -w '%{http_code}' "http://127.0.0.1:$RL/v1/completions" \
  -d '{"prompt":"1 2 3 4","max_tokens":4,"temperature":0}')"
wait "$RESUMER"
[ "$code" = 504 ] && grep -q kv_transfer_timeout "$TMP/late.json" ||
  fail "late: HTTP $code: $(cat "$TMP/late.json")"
grep -q "checking its health" "$TMP/rl.log" || fail "late: the router did not check the late instance's health"
sleep 0.5
grep -q "is unhealthy" "$TMP/rl.log" &&
  fail "late: one late answer took the prefill instance out of rotation: $(grep unhealthy "$TMP/rl.log")"
out="$(PDSERVE_URL="http://127.0.0.1:$RL" PDSERVE_INSTANCES="http://127.0.0.1:$DL,http://127.0.0.1:$PL" PDSERVE_N=4 \
  PDSERVE_STREAM=0 node "$DISAGG" faults plain)" || fail "late: pools not empty"
echo "$out" | grep -q '"ok":4,' || fail "late: the next requests were not served: $out"
echo "ok   a prefill instance stopped past a deadline: 504, a health check instead of 'unhealthy', the next 4 served, pools empty"
kill -TERM "$RLPID" "$PLPID" "$DLPID"
wait "$RLPID" "$PLPID" "$DLPID"

# ---- 4. a full disk store ----------------------------------------------------------------------------
start_up diskfull --setup dis-disk --kv-store-capacity 256KiB
long="$(printf 'alpha beta gamma delta %.0s' $(seq 60))"
code="$(curl -s -o "$TMP/full.json" -w '%{http_code}' "http://127.0.0.1:$UPORT/v1/completions" \
  -d "{\"prompt\":\"$long\",\"max_tokens\":4,\"temperature\":0}")"
[ "$code" -ge 500 ] && grep -q '"error"' "$TMP/full.json" || fail "disk full: HTTP $code: $(cat "$TMP/full.json")"
echo "disk full: HTTP $code $(cat "$TMP/full.json")"
out="$(PDSERVE_URL="http://127.0.0.1:$UPORT" PDSERVE_INSTANCES="$INSTANCES" PDSERVE_N=8 node "$DISAGG" faults plain)" ||
  { tail -30 "$TMP/diskfull.log"; fail "disk full: pools"; }
echo "$out" | grep -q '"ok":8,' || fail "disk full: short prompts were not served: $out"
stop_up diskfull
echo "ok   full disk store: the long prompt failed ($code), 8 short ones served, pools empty, store removed"

# ---- 5. SIGTERM of a prefill instance while a transfer is under way ----------------------------------
# Its /internal/prefill connection waits suspended in the HTTP library; stopping the
# library with a suspended connection aborts the process. The instance must instead let
# the transfer end (here: a 1.5 s stall within a 30 s deadline), answer, and exit 0.
saved_args=("${SERVE_ARGS[@]}")
SERVE_ARGS+=(--debug-stall-transfer-ms 1500)
start_up term --setup dis-tcp
SERVE_ARGS=("${saved_args[@]}")
curl -s -o "$TMP/term.json" "http://127.0.0.1:$UPORT/v1/completions" \
  -d '{"prompt":"alpha beta gamma","max_tokens":4,"temperature":0}' &
cpid=$!
sleep 0.5
ppid="$(instance_pid "$TMP/term.log" prefill0)"
kill -TERM "$ppid"
for _ in $(seq 100); do kill -0 "$ppid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$ppid" 2>/dev/null && fail "term: the prefill instance did not stop in 10 s"
wait "$cpid"
grep -q "up: prefill0 (pid $ppid) exited with status 0" "$TMP/term.log" ||
  { tail -20 "$TMP/term.log"; fail "term: the prefill instance did not exit 0"; }
grep -q '"finish_reason":"length"\|"error"' "$TMP/term.json" || fail "term: no answer: $(cat "$TMP/term.json")"
kill -TERM "$UPID"; wait "$UPID" || true
# up logs the instance's (good) exit as "exited with status 0", which the sanitizer
# scan at the end takes for a bad one: the status was checked above
grep -h -E "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$TMP/term.log" && fail "term: sanitizer report"
mv "$TMP/term.log" "$TMP/term.checked"
echo "ok   SIGTERM of a prefill instance mid-transfer: the transfer ended, the client was answered, exit 0"

# ---- 6. a KV frame that fails its checksum: never served, the decode side recomputes --------------
# PDSERVE_DEBUG_KV_CORRUPT=1 makes the prefill side send every request's first frame
# with a wrong checksum; the decode instance must refuse the KV and recompute the
# prompt itself, so the client still gets the colocated greedy output.
start_serve coref
code="$(curl -s -o "$TMP/coref.json" -w '%{http_code}' "http://127.0.0.1:$PORT/v1/completions" \
  -d '{"prompt":"alpha beta gamma delta epsilon","max_tokens":8,"temperature":0}')"
[ "$code" = 200 ] || fail "corrupt: reference HTTP $code"
kill -TERM "$SPID"; wait "$SPID" || true
PDSERVE_DEBUG_KV_CORRUPT=1 start_up corrupt --setup dis-tcp
code="$(curl -s -o "$TMP/corrupt.json" -w '%{http_code}' "http://127.0.0.1:$UPORT/v1/completions" \
  -d '{"prompt":"alpha beta gamma delta epsilon","max_tokens":8,"temperature":0}')"
[ "$code" = 200 ] || { tail -20 "$TMP/corrupt.log"; fail "corrupt: HTTP $code $(cat "$TMP/corrupt.json")"; }
want="$(sed -n 's|.*"text":"\([^"]*\)".*|\1|p' "$TMP/coref.json")"
got="$(sed -n 's|.*"text":"\([^"]*\)".*|\1|p' "$TMP/corrupt.json")"
[ -n "$want" ] && [ "$want" = "$got" ] || fail "corrupt: output '$got', colocated '$want'"
grep -q "recomputing its prompt here" "$TMP/corrupt.log" || fail "corrupt: the decode side did not say it recomputed"
out="$(PDSERVE_URL="http://127.0.0.1:$UPORT" PDSERVE_INSTANCES="$INSTANCES" PDSERVE_N=4 PDSERVE_STREAM=0 \
  node "$DISAGG" faults plain)" || { tail -30 "$TMP/corrupt.log"; fail "corrupt: pools not empty"; }
echo "$out" | grep -q '"ok":4,' || fail "corrupt: 4 more requests were not all served: $out"
stop_up corrupt
echo "ok   a KV frame failing its checksum: never served, the decode side recomputed, colocated output, pools empty"
echo "all disaggregation fault tests passed"
