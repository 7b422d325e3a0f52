#!/usr/bin/env bash
# test_bench_e2e.sh: `pdserve bench` against a real `pdserve serve` on a free loopback
# port (tiny model, dummy weights): a random workload of token-id prompts with
# --ignore-eos gives exactly the asked output lengths (through stream usage), no
# failures, an --api-key, and a saved result; a chat run with text prompts.
# The model: `pdserve make-model` when this build has it, else preset:tiny-llama with
# the Llama 3 tokenizer in tests/.cache (scripts/fetch-test-tokenizers.sh); exit 77
# (skipped) only when neither is there.
set -uo pipefail
ROOT="${PDSERVE_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
BIN="${PDSERVE_BIN:-$ROOT/build/pdserve}"
KEY="bench-e2e-key"
[ -x "$BIN" ] || { echo "FAIL: no pdserve binary at $BIN"; exit 1; }

TMP="$(mktemp -d)"
SPID=""
cleanup() {
  [ -n "$SPID" ] && kill -KILL "$SPID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }

VOCAB=512
if "$BIN" make-model --help >/dev/null 2>&1; then
  "$BIN" make-model --out "$TMP/model" >"$TMP/make-model.log" 2>&1 ||
    { cat "$TMP/make-model.log"; fail "pdserve make-model failed"; }
  MODEL_ARGS=(--model "$TMP/model")
  VOCAB="$(sed -n 's/.*"vocab_size": *\([0-9]*\).*/\1/p' "$TMP/model/config.json" | head -1)"
  [ -n "$VOCAB" ] || VOCAB=512
else
  TOKDIR="$ROOT/tests/.cache/tokenizers/llama3"
  [ -s "$TOKDIR/tokenizer.json" ] || { echo "SKIP: no make-model and no test tokenizer in tests/.cache"; exit 77; }
  MODEL_ARGS=(--model preset:tiny-llama --load-format dummy --seed 0 --tokenizer "$TOKDIR")
fi

"$BIN" serve "${MODEL_ARGS[@]}" --host 127.0.0.1 --port 0 --served-model-name bench-model \
  --api-key "$KEY" --threads 1 2>"$TMP/serve.log" &
SPID=$!
PORT=""
for _ in $(seq 600); do
  PORT="$(sed -n 's|.*listening on http://127.0.0.1:\([0-9]*\).*|\1|p' "$TMP/serve.log" | head -1)"
  [ -n "$PORT" ] && break
  kill -0 "$SPID" 2>/dev/null || { cat "$TMP/serve.log"; fail "the server exited at start-up"; }
  sleep 0.1
done
[ -n "$PORT" ] || { cat "$TMP/serve.log"; fail "the server did not start in 60 s"; }
URL="http://127.0.0.1:$PORT"

# 1. random token-id prompts, exact output lengths, Poisson arrivals, saved result
OPENAI_API_KEY="$KEY" "$BIN" bench --base-url "$URL" --dataset-name random --random-input-len 24 \
  --random-output-len 12 --random-vocab-size "$VOCAB" --num-prompts 24 --request-rate 50 --seed 3 \
  --max-concurrency 8 --ignore-eos --num-warmups 2 --save-result --result-dir "$TMP/res" \
  --result-filename r.json >"$TMP/bench1.out" 2>"$TMP/bench1.err" ||
  { cat "$TMP/bench1.out" "$TMP/bench1.err"; fail "bench run 1 failed"; }
grep -q "Successful requests: *24 *$" "$TMP/bench1.out" || { cat "$TMP/bench1.out"; fail "run 1: not 24 successes"; }
grep -q "Failed requests: *0 *$" "$TMP/bench1.out" || { cat "$TMP/bench1.out"; fail "run 1: failures"; }
grep -q "Total input tokens: *576 *$" "$TMP/bench1.out" || { cat "$TMP/bench1.out"; fail "run 1: input tokens"; }
grep -q "Total generated tokens: *288 *$" "$TMP/bench1.out" || { cat "$TMP/bench1.out"; fail "run 1: --ignore-eos lengths"; }
grep -q '"model_id":"bench-model"' "$TMP/res/r.json" || fail "run 1: result JSON"
grep -q '"completed":24' "$TMP/res/r.json" || fail "run 1: completed in JSON"

# 2. a wrong key: every request fails with the server's 401, and the bench says so
"$BIN" bench --base-url "$URL" --model bench-model --api-key wrong --random-output-len 4 \
  --random-vocab-size "$VOCAB" --num-prompts 3 >"$TMP/bench2.out" 2>&1 && fail "run 2: wrong key succeeded"
grep -q "3 x HTTP 401" "$TMP/bench2.out" || { cat "$TMP/bench2.out"; fail "run 2: no HTTP 401 reasons"; }

# 3. custom text prompts
"$BIN" bench --base-url "$URL" --api-key "$KEY" --dataset-name custom \
  --dataset-path "$ROOT/tests/fixtures/bench/custom_sample.jsonl" --custom-output-len 8 --ignore-eos \
  >"$TMP/bench3.out" 2>&1 || { cat "$TMP/bench3.out"; fail "bench run 3 failed"; }
grep -q "Successful requests: *5 *$" "$TMP/bench3.out" || { cat "$TMP/bench3.out"; fail "run 3: not 5 successes"; }

kill -TERM "$SPID"
wait "$SPID" 2>/dev/null
SPID=""
echo "ok: pdserve bench against pdserve serve"
