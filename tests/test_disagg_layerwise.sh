#!/usr/bin/env bash
# test_disagg_layerwise.sh: layer-wise KV streaming (--kv-transfer-mode layerwise: the
# prefill instance ships each layer from the forward pass's per-layer hook while the
# pass goes on) end to end, on every medium this build has:
#   1. dis-gpu, dis-cpu, dis-disk, dis-tcp with layer-wise transfer: 32 concurrent
#      requests of the official OpenAI client (tests/node/disagg.mjs) whose greedy
#      outputs equal a plain colocated instance's, which test_disagg_e2e.sh also
#      requires of whole transfers: whole and layer-wise outputs are identical;
#   2. prompts chunked over many steps (--max-num-batched-tokens 32 on the prefill
#      instance): the blocks of earlier chunks are shipped at the last chunk's layers;
#   3. the prefill's own answer says the transfer was streamed, with its figures, for a
#      prompt prefilled in 7 chunks;
#   4. a failure mid-stream (the transfer stalls after its first layer past the
#      request's deadline, --debug-stall-transfer-ms): 504 kv_transfer_timeout, and
#      both instances' pools back to empty (every block released exactly once: a
#      double release aborts the process on the pool's assertion).
source "$(dirname "${BASH_SOURCE[0]}")/disagg_common.sh"
make_model
DISAGG="$ROOT/tests/node/disagg.mjs"
field_num() { sed -n "s|.*\"$2\":\([0-9]*\).*|\1|p" <<<"$1"; }

# references: one colocated instance, one request at a time
make_references

# ---- 1. every medium, layer-wise ----------------------------------------------------------
for medium in gpu cpu disk tcp; do
  run_setup "dis-$medium-layerwise" --setup "dis-$medium" --kv-transfer-mode layerwise
done

# ---- 2. chunked prompts: many prefill steps, the blocks shipped at the last chunk -------------
run_setup chunked-tcp-layerwise --setup dis-tcp --kv-transfer-mode layerwise \
  --prefill-args "--max-num-batched-tokens 32"

# ---- 3. the prefill's answer, straight from the internal endpoints ------------------------------
start_serve d1 --role decode --kv-medium tcp; D1=$PORT; D1PID=$SPID
# (8 tokens a step: the prompt is prefilled in 7 chunks, streamed during the last one)
start_serve p1 --role prefill --kv-medium tcp --kv-transfer-mode layerwise --max-num-batched-tokens 8
P1=$PORT; P1PID=$SPID
body='{"prompt":"alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi","max_tokens":4,"temperature":0}'
ticket="$(curl -sf "http://127.0.0.1:$D1/internal/reserve" -d "$body" | sed -n 's|.*"ticket":"\([^"]*\)".*|\1|p')"
[ -n "$ticket" ] || fail "reserve: no ticket"
ans="$(curl -sf "http://127.0.0.1:$P1/internal/prefill" -H "X-PD-Ticket: $ticket" -d "$body")" ||
  { tail -20 "$TMP/p1.log"; fail "prefill: HTTP error"; }
echo "prefill answer: $ans"
echo "$ans" | grep -q '"kv_mode":"layerwise"' || fail "prefill: the transfer was not streamed: $ans"
echo "$ans" | grep -q '"kv_layers_overlapped":[0-9]' || fail "prefill: no overlap figure: $ans"
[ "$(field_num "$ans" n_prompt)" -gt 8 ] || fail "prefill: the prompt was not chunked: $ans"
first="$(echo "$ans" | sed -n 's|.*"first":"\([^"]*\)".*|\1|p')"
out="$(curl -sf "http://127.0.0.1:$D1/internal/decode" -H "X-PD-Ticket: $ticket" -H "X-PD-First: $first" -d "$body")" ||
  fail "decode: HTTP error"
echo "$out" | grep -q '"completion_tokens":4' || fail "decode: unexpected answer: $out"
echo "ok   internal endpoints: streamed transfer, then decoded"
# the router's way: the reservation's prompt ids lead the prefill's body, so the prompt is
# tokenized once (by the decode instance, which keeps them for its decode call): same
# tokens out; malformed ids are refused
res="$(curl -sf "http://127.0.0.1:$D1/internal/reserve" -d "$body")" || fail "reserve 2: HTTP error"
ticket2="$(echo "$res" | sed -n 's|.*"ticket":"\([^"]*\)".*|\1|p')"
ids="$(echo "$res" | sed -n 's|.*"prompt_ids":"\([0-9 ]*\)".*|\1|p')"
[ -n "$ticket2" ] && [ -n "$ids" ] || fail "reserve 2: no ticket or prompt ids: $res"
ans2="$(printf '%s%s' "$ids" "$body" | curl -sf "http://127.0.0.1:$P1/internal/prefill" \
  -H "X-PD-Ticket: $ticket2" -H "X-PD-Prompt-Ids-Bytes: ${#ids}" --data-binary @-)" ||
  fail "prefill with the reservation's prompt ids: HTTP error"
first2="$(echo "$ans2" | sed -n 's|.*"first":"\([^"]*\)".*|\1|p')"
[ "$first2" = "$first" ] || fail "prefill with the reservation's prompt ids: first token $first2, not $first"
out2="$(curl -sf "http://127.0.0.1:$D1/internal/decode" -H "X-PD-Ticket: $ticket2" -H "X-PD-First: $first2" -d "$body")" ||
  fail "decode 2: HTTP error"
text1="$(echo "$out" | sed -n 's|.*"text":"\([^"]*\)".*|\1|p')"
text2="$(echo "$out2" | sed -n 's|.*"text":"\([^"]*\)".*|\1|p')"
[ -n "$text1" ] && [ "$text1" = "$text2" ] || fail "decode 2: '$text2', not '$text1'"
grep -q "tokens given by the reservation" "$TMP/p1.log" "$TMP/d1.log" 2>/dev/null ||
  [ "${PDSERVE_LOG:-}" != debug ] || fail "the reservation's prompt ids were not used"
for bad in "3" "abc" "99999999"; do
  code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$P1/internal/prefill" -H "X-PD-Ticket: $ticket2" \
    -H "X-PD-Prompt-Ids-Bytes: $bad" -d "1 x$body")"
  [ "$code" = 400 ] || fail "prefill with bad prompt ids ($bad): HTTP $code, not 400"
done
echo "ok   internal endpoints: the reservation's prompt ids, same tokens; bad ones refused"
kill -TERM "$P1PID" "$D1PID"; wait "$P1PID" "$D1PID"

# ---- 4. a failure mid-stream -------------------------------------------------------------------
for medium in tcp gpu; do
  name="stall-$medium"
  extra=(); [ "$medium" = gpu ] && extra=(--kv-name "lw$$")
  start_serve "d-$name" --role decode --kv-medium "$medium" "${extra[@]}"; D=$PORT; DPID=$SPID
  start_serve "p-$name" --role prefill --kv-medium "$medium" --kv-transfer-mode layerwise \
    --debug-stall-transfer-ms 3000; P=$PORT; PPID_=$SPID
  start_serve "r-$name" --role router --kv-transfer-timeout 1 --prefill "http://127.0.0.1:$P" \
    --decode "http://127.0.0.1:$D"; R=$PORT; RPID=$SPID
  long="$(printf 'alpha beta gamma delta %.0s' $(seq 30))"
  t0=$(date +%s%N)
  code="$(curl -s -o "$TMP/$name.json" -w '%{http_code}' "http://127.0.0.1:$R/v1/completions" \
    -d "{\"prompt\":\"$long\",\"max_tokens\":4,\"temperature\":0}")"
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  [ "$code" = 504 ] || fail "$name: HTTP $code, not 504: $(cat "$TMP/$name.json")"
  grep -q '"kv_transfer_timeout"' "$TMP/$name.json" || fail "$name: no kv_transfer_timeout code: $(cat "$TMP/$name.json")"
  [ "$ms" -lt 2500 ] || fail "$name: the error took $ms ms for a 1 s deadline"
  grep -q "stalling the transfer of request .* after its first layer" "$TMP/p-$name.log" ||
    { tail -20 "$TMP/p-$name.log"; fail "$name: the transfer did not stall mid-stream"; }
  # every block back: the prefill's when its worker gives up, the decode's at the deadline
  used=""
  for _ in $(seq 100); do
    used="$(load_field "http://127.0.0.1:$P" kv_blocks_used) $(load_field "http://127.0.0.1:$D" kv_blocks_used)"
    used="$used $(load_field "http://127.0.0.1:$D" kv_active)"
    [ "$used" = "0 0 0" ] && break
    sleep 0.1
  done
  [ "$used" = "0 0 0" ] || fail "$name: blocks still held (prefill used, decode used, decode reservations): $used"
  # (at layer 1, or at the completion notice when layer 1 left just before the deadline)
  grep -q "failed: the KV transfer failed" "$TMP/p-$name.log" ||
    { tail -20 "$TMP/p-$name.log"; fail "$name: the prefill's transfer did not fail"; }
  kill -TERM "$RPID" "$PPID_" "$DPID"; wait "$RPID" "$PPID_" "$DPID"
  ls /dev/shm | grep -q "pdkv-lw$$" && fail "$name: shared memory left: $(ls /dev/shm | grep "lw$$")"
  echo "ok   $name: failed mid-stream with 504 in $ms ms, both pools empty, nothing left"
done
# ---- 5. the decode side cancels mid-stream -------------------------------------------------------
# This script plays the router: it reserves on D, starts the prefill on P (whose transfer
# stalls 3 s after its first layer), and while P streams it releases the reservation
# (POST D/internal/release, what the router does when its client goes away). The
# stream then goes on into a cancelled reservation: the gpu medium tells the sender,
# which fails the request; tcp drops the frames. Either way every block comes back on
# both sides.
for medium in tcp gpu; do
  name="cancel-$medium"
  extra=(); [ "$medium" = gpu ] && extra=(--kv-name "lwc$$")
  start_serve "d-$name" --role decode --kv-medium "$medium" "${extra[@]}"; D=$PORT; DPID=$SPID
  start_serve "p-$name" --role prefill --kv-medium "$medium" --kv-transfer-mode layerwise \
    --debug-stall-transfer-ms 3000; P=$PORT; PPID_=$SPID
  long="$(printf 'alpha beta gamma delta %.0s' $(seq 30))"
  body="{\"prompt\":\"$long\",\"max_tokens\":4,\"temperature\":0}"
  ticket="$(curl -sf "http://127.0.0.1:$D/internal/reserve" -d "$body" | sed -n 's|.*"ticket":"\([^"]*\)".*|\1|p')"
  [ -n "$ticket" ] || fail "$name: no ticket"
  curl -s -o "$TMP/$name.json" "http://127.0.0.1:$P/internal/prefill" -H "X-PD-Ticket: $ticket" -d "$body" &
  CPID=$!
  for _ in $(seq 100); do grep -q "after its first layer" "$TMP/p-$name.log" && break; sleep 0.05; done
  grep -q "after its first layer" "$TMP/p-$name.log" ||
    { tail -20 "$TMP/p-$name.log"; fail "$name: the transfer did not stall mid-stream"; }
  curl -sf -o /dev/null "http://127.0.0.1:$D/internal/release" -H "X-PD-Ticket: $ticket" -d '{}' ||
    fail "$name: release refused"
  # (a frame still being received holds the blocks until it ends: a few ms)
  for _ in $(seq 20); do
    mid="$(load_field "http://127.0.0.1:$D" kv_active) $(load_field "http://127.0.0.1:$D" kv_blocks_used)"
    [ "$mid" = "0 0" ] && break
    sleep 0.05
  done
  # the prefill's step may still be running (its stats are published at the step's
  # end, slow under sanitizers): its blocks show within the 3 s stall
  for _ in $(seq 40); do
    held="$(load_field "http://127.0.0.1:$P" kv_blocks_used)"
    [ "$held" -gt 0 ] && break
    sleep 0.05
  done
  [ "$mid" = "0 0" ] && [ "$held" -gt 0 ] ||
    fail "$name: expected the reservation gone while the prefill still streams: decode $mid, prefill $held"
  wait "$CPID"
  used="$(load_field "http://127.0.0.1:$P" kv_blocks_used) $(load_field "http://127.0.0.1:$D" kv_blocks_used)"
  used="$used $(load_field "http://127.0.0.1:$D" kv_active)"
  [ "$used" = "0 0 0" ] || fail "$name: blocks still held (prefill used, decode used, decode reservations): $used"
  if [ "$medium" = gpu ]; then
    grep -q '"error"' "$TMP/$name.json" || fail "$name: the prefill did not fail: $(cat "$TMP/$name.json")"
    grep -q "failed: the KV transfer failed at layer 1" "$TMP/p-$name.log" ||
      { tail -20 "$TMP/p-$name.log"; fail "$name: the sender did not learn of the cancellation"; }
  fi
  kill -TERM "$PPID_" "$DPID"; wait "$PPID_" "$DPID"
  ls /dev/shm | grep -q "pdkv-lwc$$" && fail "$name: shared memory left: $(ls /dev/shm | grep "lwc$$")"
  echo "ok   $name: reservation cancelled mid-stream ($held prefill blocks held), then every block back: $(head -c 150 "$TMP/$name.json")"
done
echo "all layer-wise streaming tests passed"
