#!/usr/bin/env bash
# test_router_e2e.sh: the router over colocated instances (`pdserve up --setup co-1gpu`
# and co-2gpus, the study's baselines): 32 concurrent requests through the router whose
# greedy outputs equal a single instance's (official OpenAI client, tests/node/disagg.mjs),
# load spread over both instances, then failover: kill -9 one instance, the router marks
# it unhealthy and every later request goes to the other; SIGTERM leaves nothing behind.
# Also `pdserve serve --role router` errors and the internal endpoints' secret, and
# instances pinned to CPUs of their own (--cpu-list).
source "$(dirname "${BASH_SOURCE[0]}")/disagg_common.sh"
make_model

start_serve reference
REF_PORT=$PORT
REF_PID=$SPID
PDSERVE_URL="http://127.0.0.1:$REF_PORT" node "$ROOT/tests/node/disagg.mjs" reference "$TMP/ref.json" ||
  { tail -20 "$TMP/reference.log"; fail "references"; }

# co-2gpus with each instance pinned (--cpu-list A:B): the first two CPUs this test may use
cpus=($(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0))[:2])'))
[ ${#cpus[@]} = 2 ] || cpus=("${cpus[0]}" "${cpus[0]}")
# segments an earlier `up` left when it was killed -9 (a pid that is gone): the next
# `up` removes them at its start; one of a live pid and one not named by `up` stay
bash -c 'exit 0' & gone=$!
wait "$gone"
stale=(/dev/shm/pdkv-store-up$gone-store /dev/shm/pdkv-up$gone-decode0-kv)
kept=(/dev/shm/pdkv-store-up$$-store /dev/shm/pdkv-mine-up$gone-kv)
for f in "${stale[@]}" "${kept[@]}"; do head -c 4096 /dev/zero >"$f"; done
for setup in co-1gpu co-2gpus; do
  pin=()
  [ "$setup" = co-2gpus ] && pin=(--cpu-list "${cpus[0]}:${cpus[1]}")
  start_up "$setup" --setup "$setup" "${pin[@]}"
  echo "$setup: router on port $UPORT, instances $INSTANCES"
  PDSERVE_URL="http://127.0.0.1:$UPORT" PDSERVE_INSTANCES="$INSTANCES" \
    node "$ROOT/tests/node/disagg.mjs" compare "$TMP/ref.json" ||
    { tail -40 "$TMP/$setup.log"; fail "$setup: outputs or pools"; }
  if [ "$setup" = co-1gpu ]; then
    for f in "${stale[@]}"; do
      [ ! -e "$f" ] && grep -q "up: removed $f (left by pdserve up $gone, which is gone)" "$TMP/co-1gpu.log" ||
        fail "a stale segment of a dead up was not removed: $f"
    done
    for f in "${kept[@]}"; do [ -e "$f" ] || fail "up removed $f, which is not a dead up's"; done
    rm -f "${kept[@]}"
    echo "ok   up removes the segments of an earlier up that is gone, and only those"
    stop_up "$setup"
  fi
done

# each instance's engine thread on its own CPU (decode, prefill, colocated: start
# order); its HTTP threads where the instance started (all the test's CPUs)
home="$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)"
for i in 0 1; do
  ipid="$(instance_pid "$TMP/co-2gpus.log" colocated$i)"
  [ -n "$ipid" ] || fail "no pid for colocated$i"
  eng="" other=""
  for t in /proc/"$ipid"/task/*; do
    l="$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' "$t/status")"
    if [ "$(cat "$t/comm")" = pd-engine ]; then eng="$l"; else other="$other $l"; fi
  done
  [ "$eng" = "${cpus[$i]}" ] || fail "colocated$i: the engine thread on CPUs '$eng', not ${cpus[$i]} (--cpu-list)"
  echo "$other" | grep -qw -- "$home" || fail "colocated$i: no thread left on $home (threads on:$other)"
done
echo "ok   co-2gpus --cpu-list ${cpus[0]}:${cpus[1]}: each instance's engine on its CPU, its other threads on $home"

# --cpu-list and a deployment file's "cpus": bad lists are refused before anything starts
"$BIN" up --setup co-2gpus --model "$MODEL" --port 0 --cpu-list "0::1" >"$TMP/cl1.out" 2>&1
[ $? = 2 ] && grep -q "cpu-list 0::1: empty CPU list" "$TMP/cl1.out" || { cat "$TMP/cl1.out"; fail "--cpu-list 0::1"; }
"$BIN" up --setup co-2gpus --model "$MODEL" --port 0 --cpu-list auto >"$TMP/cl2.out" 2>&1
[ $? = 2 ] && grep -q "needs the instances' --threads" "$TMP/cl2.out" || { cat "$TMP/cl2.out"; fail "--cpu-list auto without --threads"; }
printf '{"model":"%s","instances":[{"host":"127.0.0.1","role":"colocated","port":18999,"cpus":"1-"}]}' "$MODEL" >"$TMP/dep-cpus.json"
"$BIN" up --deployment "$TMP/dep-cpus.json" --only-host 127.0.0.1 >"$TMP/cl3.out" 2>&1
[ $? = 2 ] && grep -q 'dep-cpus.json: instance 0: "cpus" must be a CPU list' "$TMP/cl3.out" ||
  { cat "$TMP/cl3.out"; fail "deployment file with a bad cpus"; }
echo "ok   bad --cpu-list and deployment \"cpus\": exit 2 with the reason, nothing started"

# co-2gpus is still up: kill -9 one instance; after the next health check, all succeed
victim="$(instance_pid "$TMP/co-2gpus.log" colocated0)"
[ -n "$victim" ] || fail "no pid for colocated0"
kill -KILL "$victim"
# the router's next health poll (every 100 ms) marks it: wait for that, up to 10 s
for _ in $(seq 100); do
  curl -s "http://127.0.0.1:$UPORT/metrics" | grep -q 'pdserve_router_instance_healthy{.*} 0' && break
  sleep 0.1
done
survivor="$(echo "$INSTANCES" | tr , '\n' | while read -r u; do curl -sf "$u/load" >/dev/null && echo "$u"; done)"
out="$(PDSERVE_URL="http://127.0.0.1:$UPORT" PDSERVE_INSTANCES="$survivor" PDSERVE_N=8 \
  node "$ROOT/tests/node/disagg.mjs" faults plain)" || { tail -30 "$TMP/co-2gpus.log"; fail "failover burst"; }
echo "$out" | grep -q '"ok":8,' || fail "failover: not every request succeeded after kill -9: $out"
curl -s "http://127.0.0.1:$UPORT/metrics" | grep -q 'pdserve_router_instance_healthy{.*} 0' ||
  fail "the router does not report the killed instance unhealthy"
echo "ok   failover: colocated0 killed, 8/8 requests served by the other instance"
stop_up co-2gpus

# A preset model (dummy weights): its name has a colon of its own, which the instances'
# "listening on http://HOST:PORT (model 'preset:NAME' ...)" line carries after the port.
DIR_MODEL="$MODEL"
MODEL=preset:tiny-llama SERVE_ARGS_SAVE=("${SERVE_ARGS[@]}")
SERVE_ARGS=("${SERVE_ARGS[@]}" --tokenizer "$DIR_MODEL")
start_up preset --setup co-1gpu
curl -sf "http://127.0.0.1:$UPORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model":"preset:tiny-llama","prompt":"a b c","max_tokens":2,"ignore_eos":true}' | grep -q '"completion_tokens":2' ||
  { tail -20 "$TMP/preset.log"; fail "up with a preset model: no completion"; }
stop_up preset
MODEL="$DIR_MODEL" SERVE_ARGS=("${SERVE_ARGS_SAVE[@]}")
echo "ok   up with a preset model (--model preset:NAME): ready and serving"


# the router by hand: bad arguments, and the internal endpoints' secret
"$BIN" serve --role router --port 0 >"$TMP/r0.out" 2>&1 && fail "a router without instances started"
grep -q "no instances" "$TMP/r0.out" || { cat "$TMP/r0.out"; fail "router without instances: message"; }
"$BIN" serve --role router --port 0 --prefill http://127.0.0.1:1 >"$TMP/r1.out" 2>&1 && fail "prefill without decode started"
grep -q "both --prefill and --decode" "$TMP/r1.out" || { cat "$TMP/r1.out"; fail "prefill without decode: message"; }
code="$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$REF_PORT/internal/reserve" -d '{}')"
[ "$code" = 404 ] || fail "a colocated instance answered /internal/reserve with $code, not 404"
start_serve dec --role decode --kv-medium tcp --internal-secret s3cret
code="$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$PORT/internal/reserve" -d '{"prompt":"a"}')"
[ "$code" = 401 ] || fail "/internal/reserve without the secret: $code, not 401"
code="$(curl -s -o "$TMP/res.json" -w '%{http_code}' -X POST -H 'X-PD-Internal-Secret: s3cret' \
  "http://127.0.0.1:$PORT/internal/reserve" -d '{"prompt":"a b c"}')"
[ "$code" = 200 ] && grep -q '"ticket":"pdkv1;tcp;' "$TMP/res.json" || fail "/internal/reserve with the secret: $code $(cat "$TMP/res.json")"
ticket="$(sed -n 's|.*"ticket":"\([^"]*\)".*|\1|p' "$TMP/res.json")"
[ "$(load_field "http://127.0.0.1:$PORT" kv_blocks_used)" -gt 0 ] || fail "a reservation holds no block"
curl -sf -X POST -H 'X-PD-Internal-Secret: s3cret' -H "X-PD-Ticket: $ticket" "http://127.0.0.1:$PORT/internal/release" >/dev/null
for _ in $(seq 50); do [ "$(load_field "http://127.0.0.1:$PORT" kv_blocks_used)" = 0 ] && break; sleep 0.05; done
[ "$(load_field "http://127.0.0.1:$PORT" kv_blocks_used)" = 0 ] || fail "release did not free the reservation"
echo "ok   router arguments; internal endpoints: 404 on colocated, 401 without the secret, reserve + release"
kill -TERM "$SPID"
wait "$SPID"

# A store's /internal/decode waits (reads) off the HTTP threads: a decode instance with
# one HTTP thread and a disk store whose KV never comes still answers /health and
# another reservation at once while that request waits out its 3 s deadline, then
# answers it 504 kv_transfer_timeout with every block back.
mkdir -p "$TMP/store"
start_serve decw --role decode --kv-medium disk --kv-store "$TMP/store" --http-threads 1 \
  --kv-transfer-timeout 3 --internal-secret s3cret
H=(-H 'X-PD-Internal-Secret: s3cret' -H 'Content-Type: application/json')
body='{"prompt":"a b c d","max_tokens":2,"ignore_eos":true}'
curl -sf -o "$TMP/res2.json" -X POST "${H[@]}" "http://127.0.0.1:$PORT/internal/reserve" -d "$body" ||
  fail "decode-wait: reserve"
ticket="$(sed -n 's|.*"ticket":"\([^"]*\)".*|\1|p' "$TMP/res2.json")"
[ -n "$ticket" ] || fail "decode-wait: no ticket in $(cat "$TMP/res2.json")"
t0=$(date +%s%N)
ms_since() { echo $(( ($(date +%s%N) - t0) / 1000000 )); }
curl -s -o "$TMP/dec.json" -w '%{http_code}' -X POST "${H[@]}" -H "X-PD-Ticket: $ticket" -H 'X-PD-First: 1' \
  "http://127.0.0.1:$PORT/internal/decode" -d "$body" >"$TMP/dec.code" &
DEC=$!
sleep 0.3
code="$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$PORT/health")"
t_health=$(ms_since)
[ "$code" = 200 ] || fail "decode-wait: /health answered $code while a KV wait ran (the HTTP thread held?)"
code="$(curl -s -o "$TMP/res3.json" -m 2 -w '%{http_code}' -X POST "${H[@]}" \
  "http://127.0.0.1:$PORT/internal/reserve" -d '{"prompt":"e f","max_tokens":1}')"
[ "$code" = 200 ] || fail "decode-wait: a second reservation answered $code during the wait"
t_res=$(ms_since)
curl -sf -X POST "${H[@]}" -H "X-PD-Ticket: $(sed -n 's|.*"ticket":"\([^"]*\)".*|\1|p' "$TMP/res3.json")" \
  "http://127.0.0.1:$PORT/internal/release" >/dev/null
wait "$DEC"
t_dec=$(ms_since)
[ "$(cat "$TMP/dec.code")" = 504 ] && grep -q kv_transfer_timeout "$TMP/dec.json" ||
  fail "decode-wait: /internal/decode answered $(cat "$TMP/dec.code") $(cat "$TMP/dec.json")"
[ "$t_health" -lt 1500 ] && [ "$t_res" -lt 2000 ] && [ "$t_dec" -gt 2500 ] ||
  fail "decode-wait: /health after $t_health ms, reserve after $t_res ms, the wait ended after $t_dec ms"
for _ in $(seq 50); do [ "$(load_field "http://127.0.0.1:$PORT" kv_blocks_used)" = 0 ] && break; sleep 0.05; done
[ "$(load_field "http://127.0.0.1:$PORT" kv_blocks_used)" = 0 ] || fail "decode-wait: blocks left after the timeout"
echo "ok   a disk store's KV wait off the HTTP thread: /health after $t_health ms, a reservation after $t_res ms, 504 after $t_dec ms"
kill -TERM "$SPID"
wait "$SPID"

# kv_queue: the prefill instance's transfer worker runs one whole transfer at a time, so
# of two requests prefilled together the second's blocks wait for the first's transfer;
# each phase says so. The worker stalls 400 ms before each transfer (a stand-in for a
# slow medium, counted before the transfer starts): the first request's kv_queue is
# about 400 ms, the second's about 800, and neither's transfer (kv) takes long.
start_serve qdec --role decode --kv-medium cpu --kv-store "rq$$" --kv-create-store; QD=$PORT; QDPID=$SPID
start_serve qpre --role prefill --kv-medium cpu --kv-store "rq$$" --debug-stall-transfer-ms 400; QP=$PORT; QPPID=$SPID
start_serve qrt --role router --prefill "http://127.0.0.1:$QP" --decode "http://127.0.0.1:$QD"; QR=$PORT; QRPID=$SPID
python3 - "$QR" <<'PY' || fail "kv_queue: the phases of two requests sharing the transfer worker"
import json, sys, threading, urllib.request
port = sys.argv[1]
out = {}
def one(i):
    body = {"prompt": "request %d waits for the transfer worker" % i, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}, "pdserve_timing": True}
    rq = urllib.request.Request("http://127.0.0.1:%s/v1/completions" % port, json.dumps(body).encode(),
                                {"Content-Type": "application/json"})
    for line in urllib.request.urlopen(rq, timeout=30):
        line = line.decode()
        if line.startswith("data: {") and '"pdserve_timing"' in line:
            out[i] = json.loads(line[6:])["pdserve_timing"]["phases"]
ts = [threading.Thread(target=one, args=(i,)) for i in range(2)]
for t in ts: t.start()
for t in ts: t.join()
assert len(out) == 2, "phases of %d requests" % len(out)
q = sorted(out.values(), key=lambda p: p["kv_queue"])
assert 0.35 <= q[0]["kv_queue"] < 0.75, "first kv_queue %r" % q[0]
assert 0.75 <= q[1]["kv_queue"] < 1.6, "second kv_queue %r" % q[1]
assert all(p["kv"] < 0.3 for p in q), "kv %r" % q
print("ok   kv_queue: %.0f and %.0f ms behind the transfer worker (400 ms stall each), transfers %.1f and %.1f ms"
      % (q[0]["kv_queue"] * 1e3, q[1]["kv_queue"] * 1e3, q[0]["kv"] * 1e3, q[1]["kv"] * 1e3))
PY
kill -TERM "$QRPID" "$QPPID" "$QDPID" "$REF_PID"
wait "$QRPID" "$QPPID" "$QDPID" "$REF_PID"
echo "all router end-to-end tests passed"
