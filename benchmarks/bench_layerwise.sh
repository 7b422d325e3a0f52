#!/usr/bin/env bash
# bench_layerwise.sh: how much of a disaggregated prefill's KV transfer layer-wise
# streaming hides behind the prefill's compute, on the CPU backend, over real
# processes: one decode instance and two prefill instances (--kv-transfer-mode whole,
# --kv-transfer-mode layerwise) of `pdserve serve`, with this script as the router.
#
# Per medium (tcp, cpu, disk, gpu by default) and mode, REPS requests of TOKENS prompt
# tokens, one at a time: POST D/internal/reserve, then POST P/internal/prefill (timed), then POST
# D/internal/decode with max_tokens 1 (timed: it returns once every layer of every
# block is in D's blocks, kv_ticket_wait, and the first token is emitted), the two
# modes alternating request by request (so that both see the same load on a shared
# machine), each prompt new (the stores key blocks by content). Figures, medians over
# REPS after one warm-up request per mode:
#   compute   P's prefill_s: the request's arrival at P's engine .. its prefill's end
#   transfer  P's kv_busy_s: seconds P's transfer worker spent inside kv_send_* calls
#   exposed   P's kv_tail_s: the prefill's end .. kv_send_finish returned (the transfer
#             time the request still waits for once compute is over)
#   d-wait    the decode call: the KV's last part reaching D's blocks (cpu store: D's
#             copy out of the store) + the first token, through HTTP
#   total     prefill call + decode call: prefill start .. KV complete on the decode side
#   hidden    transfer - exposed: transfer work done while the prefill still computed
#   overlap   hidden / transfer (0: none, as whole mode; 1: all of it)
#   bound     whole mode's compute + its transfer / L + d-wait: the best layer-wise
#             streaming can do when the transfer is shorter than the compute (only the
#             last layer's share of the transfer comes after the pass); ratio bound/total
#
# Usage: benchmarks/bench_layerwise.sh [--bin PDSERVE] [--mediums "tcp cpu disk gpu"] [--tokens N]
#          [--reps N] [--layers L] [--dim C] [--ffn F] [--heads H] [--kv-heads K]
#          [--head-dim D] [--threads T]
# The model is small-llama's tokenizer with the shape given (dummy weights). The
# default shape is KV-heavy (16 kv heads of 128 on a 64-wide residual stream, 384 KiB
# of f32 KV per token): on a CPU the prefill's compute dwarfs any link (a Llama-shaped
# model moves its KV in a few % of its prefill time here), while on GPUs compute is
# ~100x faster and links only ~10x, so the transfer is a real share of a request's
# time; this shape gives the transfer a visible share on the CPU too. Prefill
# instances compute on --threads threads (default 1) so that a 2-core machine keeps a
# core for the transfer thread and the decode side; say the machine's load with the
# figures (the load average is printed). BENCH_LAYERWISE_RAW=1 prints every request's
# figures (whole | layer-wise) to stderr.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${PDSERVE_BIN:-$ROOT/build/pdserve}"
MEDIUMS="tcp cpu disk gpu"; TOKENS=256; REPS=5; LAYERS=24; DIM=64; FFN=128; HEADS=16; KVH=16; HD=128; THREADS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN="$2"; shift 2 ;;
    --mediums) MEDIUMS="$2"; shift 2 ;;
    --tokens) TOKENS="$2"; shift 2 ;;
    --reps) REPS="$2"; shift 2 ;;
    --layers) LAYERS="$2"; shift 2 ;;
    --dim) DIM="$2"; shift 2 ;;
    --ffn) FFN="$2"; shift 2 ;;
    --heads) HEADS="$2"; shift 2 ;;
    --kv-heads) KVH="$2"; shift 2 ;;
    --head-dim) HD="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_layerwise: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -x "$BIN" ] || { echo "bench_layerwise: no pdserve at $BIN (--bin)" >&2; exit 1; }
command -v curl >/dev/null || { echo "bench_layerwise: needs curl" >&2; exit 1; }

TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

# ---- the model: small-llama's files, the shape asked for, dummy weights ------------------------
"$BIN" make-model --out "$TMP/model" --preset small-llama >"$TMP/make-model.log" 2>&1
sed -i -E -e "s/(\"hidden_size\":[[:space:]]*)[0-9]+/\1$DIM/" \
  -e "s/(\"intermediate_size\":[[:space:]]*)[0-9]+/\1$FFN/" \
  -e "s/(\"num_hidden_layers\":[[:space:]]*)[0-9]+/\1$LAYERS/" \
  -e "s/(\"num_attention_heads\":[[:space:]]*)[0-9]+/\1$HEADS/" \
  -e "s/(\"num_key_value_heads\":[[:space:]]*)[0-9]+/\1$KVH/" \
  -e "s/(\"head_dim\":[[:space:]]*)[0-9]+/\1$HD/" "$TMP/model/config.json"
rm -f "$TMP/model/model.safetensors"
KV_BYTES_PER_TOKEN=$(( 2 * LAYERS * KVH * HD * 4 ))
KV_MIB=$(( (TOKENS + 64) * KV_BYTES_PER_TOKEN * 3 / 1048576 + 16 ))
COMMON=(--model "$TMP/model" --load-format dummy --host 127.0.0.1 --port 0 --threads "$THREADS"
        --max-model-len $(( TOKENS + 64 )) --max-num-seqs 4 --max-num-batched-tokens $(( TOKENS + 64 ))
        --kv-cache-memory "${KV_MIB}MiB" --kv-transfer-timeout 120)

start() { # NAME ARGS... -> sets PORT
  local name="$1"; shift
  "$BIN" serve "${COMMON[@]}" "$@" 2>"$TMP/$name.log" &
  PIDS+=($!)
  local pid=$! p=""
  for _ in $(seq 600); do
    p="$(sed -n 's|.*listening on http://[0-9.]*:\([0-9]*\).*|\1|p' "$TMP/$name.log" | head -1)"
    [ -n "$p" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$TMP/$name.log" >&2; exit 1; }
    sleep 0.1
  done
  [ -n "$p" ] || { echo "bench_layerwise: $name did not start" >&2; exit 1; }
  PORT="$p"
}
stop_all() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}

# request r's body: its own prompt (the cpu and disk stores key blocks by content: a
# prompt seen before would not be shipped again)
NREQ=0
body() {
  local ids
  ids="$(seq 0 $(( TOKENS - 1 )) | awk -v r="$1" '{printf "%s%d", (NR > 1 ? "," : ""), 3 + ($1 * 37 + r * 101) % 600}')"
  echo "{\"prompt\":[$ids],\"max_tokens\":1,\"temperature\":0,\"ignore_eos\":true}"
}
field() { sed -n "s|.*\"$2\":\"\{0,1\}\([^,\"}]*\).*|\1|p" <<<"$1"; }

# one request through D and P: prints "compute transfer exposed dwait total overlapped"
one() {
  local D="$1" P="$2" t ans first ptime dout BODY
  NREQ=$(( NREQ + 1 ))
  BODY="$(body "$NREQ")"
  t="$(curl -sf "http://127.0.0.1:$D/internal/reserve" -d "$BODY" | sed -n 's|.*"ticket":"\([^"]*\)".*|\1|p')"
  [ -n "$t" ] || { echo "bench_layerwise: reserve failed" >&2; exit 1; }
  ans="$(curl -sf -w '\n%{time_total}' "http://127.0.0.1:$P/internal/prefill" -H "X-PD-Ticket: $t" -d "$BODY")" ||
    { echo "bench_layerwise: prefill failed" >&2; tail -n 5 "$TMP"/p-*.log >&2; exit 1; }
  ptime="$(tail -1 <<<"$ans")"; ans="$(head -1 <<<"$ans")"
  first="$(field "$ans" first)"
  dout="$(curl -sf -o /dev/null -w '%{time_total}' "http://127.0.0.1:$D/internal/decode" -H "X-PD-Ticket: $t" \
          -H "X-PD-First: $first" -d "$BODY")" || { echo "bench_layerwise: decode failed" >&2; exit 1; }
  echo "$(field "$ans" prefill_s) $(field "$ans" kv_busy_s) $(field "$ans" kv_tail_s) $dout" \
       "$(awk -v a="$ptime" -v b="$dout" 'BEGIN{printf "%.6f", a + b}') $(field "$ans" kv_layers_overlapped)"
}

median() { sort -g | awk '{v[NR]=$1} END{print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }

echo "bench_layerwise: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "model: L=$LAYERS C=$DIM F=$FFN H=$HEADS K=$KVH D=$HD (dummy, f32 on the CPU backend), prompt $TOKENS tokens," \
     "KV $(( TOKENS * KV_BYTES_PER_TOKEN / 1048576 )) MiB; prefill on $THREADS thread(s); median of $REPS after 1 warm-up"
printf '%-6s %-9s %8s %9s %8s %8s %8s %8s %8s %7s %8s %6s\n' medium mode compute transfer exposed d-wait \
  total hidden overlap layers bound ratio
for medium in $MEDIUMS; do
  dargs=(--role decode --kv-medium "$medium"); pargs=(--role prefill --kv-medium "$medium")
  if [ "$medium" = cpu ]; then
    store="bl$$"
    dargs+=(--kv-store "$store" --kv-create-store --kv-store-capacity "$(( KV_MIB * 2 ))MiB") # LRU evicts
    pargs+=(--kv-store "$store")
  elif [ "$medium" = gpu ]; then
    dargs+=(--kv-name "bl$$")
  elif [ "$medium" = disk ]; then
    # every request's blocks stay in the store: room for all of them
    dargs+=(--kv-store "$TMP/store" --kv-create-store
            --kv-store-capacity "$(( (2 * REPS + 4) * (TOKENS * KV_BYTES_PER_TOKEN / 1048576 + 1) ))MiB")
    pargs+=(--kv-store "$TMP/store" --kv-store-capacity "${dargs[-1]}")
  fi
  start "d-$medium" "${dargs[@]}"; D=$PORT
  start "p-$medium-whole" "${pargs[@]}" --kv-transfer-mode whole; PW=$PORT
  start "p-$medium-layerwise" "${pargs[@]}" --kv-transfer-mode layerwise; PL=$PORT
  # the two modes alternate request by request, so that both see the same machine
  one "$D" "$PW" >/dev/null; one "$D" "$PL" >/dev/null # warm-up
  : >"$TMP/runs-whole"; : >"$TMP/runs-layerwise"
  for _ in $(seq "$REPS"); do
    one "$D" "$PW" >"$TMP/run"; cat "$TMP/run" >>"$TMP/runs-whole"
    one "$D" "$PL" >"$TMP/run"; cat "$TMP/run" >>"$TMP/runs-layerwise"
  done
  [ -n "${BENCH_LAYERWISE_RAW:-}" ] && paste "$TMP/runs-whole" "$TMP/runs-layerwise" >&2
  for mode in whole layerwise; do
    for k in 1 2 3 4 5 6; do eval "m$k=$(awk -v k=$k '{print $k}' "$TMP/runs-$mode" | median)"; done
    if [ "$mode" = whole ]; then wc_=$m1; wx=$m2; fi
    awk -v md="$medium" -v mo="$mode" -v c="$m1" -v x="$m2" -v e="$m3" -v d="$m4" -v t="$m5" -v lo="$m6" \
        -v L="$LAYERS" -v wc="$wc_" -v wx="$wx" 'BEGIN{
      h = x - e; if (h < 0) h = 0; b = wc + wx / L + d;
      printf "%-6s %-9s %7.3fs %8.3fs %7.3fs %7.3fs %7.3fs %7.3fs %7.0f%% %4d/%-2d %7.3fs %5.0f%%\n",
             md, mo, c, x, e, d, t, h, 100 * h / x, lo, L, b, 100 * b / t }'
  done
  stop_all
done
