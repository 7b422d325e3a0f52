#!/usr/bin/env bash
# check-short-chunk.sh: what a short prefill chunk costs in `pdserve serve` on one GPU,
# after a long cached prefix and without one, each shape seen for the first time and
# then again (docs/simulator.md, "The short chunk"). One device call: builds pdserve,
# starts
#   pdserve serve --device 0 --model preset:llama-3.2-3b --load-format dummy
#                 --enable-prefix-caching --step-trace FILE
# and sends, one at a time, completions of one token whose prompts are token ids:
#   prefix  a 4,096-token prefix (cached after the first request) and N fresh tokens,
#   plain   N fresh tokens and nothing cached,
# each N twice in a row (the second a new prompt of the same shape), in the order of
# SIZES, then the prefix series once more. The step trace's forward time of each
# request's one prefill step is printed beside its rows, its context and whether its
# shape had been seen. VARIANTS (';'-separated environment assignments, "" for none)
# runs the whole series once per variant, each on a server of its own.
# Read-only on the GPU. Usage (repository root, on the GPU machine; carry .deps/prefix
# and tests/.cache/tokenizers):
#   scripts/gpu/check-short-chunk.sh
# Results under $OUT (or build-gpu/out-short-chunk): env.txt, log.txt, serve-K.log,
# trace-K.txt and steps-K.txt per variant K.
# Exit: 0 measured, 77 no GPU, 2 build failed, 1 otherwise (the reason is printed).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out-short-chunk}
mkdir -p "$out"
SIZES=${SIZES:-62 319 433 234 640 97 1000 16 33}
GAPS=${GAPS:-0 0.5}
VARIANTS=${VARIANTS:-}
MODEL=${MODEL:-preset:llama-3.2-3b}
TOK=tests/.cache/tokenizers/llama3
exec > >(tee -a "$out/log.txt") 2>&1
. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build
{ gpu_header; echo "model: $MODEL  sizes: $SIZES  variants: ${VARIANTS:-(none)}"; } | tee "$out/env.txt"
command -v nvidia-smi >/dev/null 2>&1 || { echo "check-short-chunk: no GPU here"; exit 77; }
gpu_build "$out/build.log" pdserve || exit 2
rm -f "$out/build.log"
BIN=build-gpu/pdserve
status=0

# one series on a server started with the environment assignments in $1
series() {
  local k=$1 vars=$2
  local trace="$out/trace-$k.txt"
  echo "== variant $k: ${vars:-(default)}"
  env $vars "$BIN" serve --device 0 --model "$MODEL" --load-format dummy --tokenizer "$TOK" \
    --enable-prefix-caching --max-model-len 8192 --host 127.0.0.1 --port 0 \
    --step-trace "$trace" >"$out/serve-$k.log" 2>&1 &
  local spid=$! url="" t0=$(date +%s.%N)
  for _ in $(seq 1800); do
    url=$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$out/serve-$k.log" | head -1 | sed 's/listening on //')
    [ -n "$url" ] && break
    kill -0 "$spid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$url" ]; then
    tail -n 20 "$out/serve-$k.log"; echo "check-short-chunk: variant $k's server did not start"
    kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null; status=1; return
  fi
  echo "variant $k: listening after $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $t0 }") s; GPU memory used: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader -i 0)"
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw --format=csv,noheader -i 0 -lms 100 \
    >"$out/clocks-$k.csv" 2>/dev/null &
  local cpid=$!
  python3 - "$url" "$SIZES" "$GAPS" <<'PY' | tee "$out/requests-$k.txt" || status=1
import json, random, sys, time, urllib.request
url, sizes, gaps = sys.argv[1], [int(s) for s in sys.argv[2].split()], [float(g) for g in sys.argv[3].split()]
rng = random.Random(7)
fresh = lambda n: [rng.randrange(1000, 120000) for _ in range(n)]
prefix = fresh(4096)
model = json.load(urllib.request.urlopen(url + "/v1/models"))["data"][0]["id"]
def send(ids, label="", gap=0.0):
    time.sleep(gap)
    body = json.dumps({"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0,
                       "pdserve_timing": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.monotonic()
    r = json.load(urllib.request.urlopen(req, timeout=60))
    ms = 1000 * (time.monotonic() - t0)
    u = r["usage"]
    ph = r.get("pdserve_timing", {}).get("phases", {})
    if label:
        print("%-6s gap %.2f s  new %5d  cached %5d  prefill %7.2f ms  queue %6.2f ms  client %7.2f ms" % (
            label, gap, len(ids) - u["prompt_tokens_details"]["cached_tokens"],
            u["prompt_tokens_details"]["cached_tokens"], 1000 * ph.get("prefill", float("nan")),
            1000 * ph.get("queue", float("nan")), ms), flush=True)
    return u["prompt_tokens_details"]["cached_tokens"]
send(fresh(600)); send(fresh(2048))                  # warm-up: any shape's first pass
send(prefix + fresh(8))                              # the prefix is cached from here
for gap in gaps:
    for rnd in ("first", "again"):
        for n in sizes:
            for i in range(2):
                c = send(prefix + fresh(n), "prefix" if i == 0 else "  same", gap)
                assert c == 4096, "cached %d" % c
        if rnd == "first":
            for n in sizes:
                for i in range(2): send(fresh(n + 1), "plain" if i == 0 else "  same", gap)
    sizes = [n + 2 for n in sizes]                   # new shapes for the next gap
PY
  kill "$cpid" 2>/dev/null; wait "$cpid" 2>/dev/null
  kill -TERM "$spid" 2>/dev/null; wait "$spid" 2>/dev/null
  # the steps that prefilled: rows, context (the chunk's start), forward seconds, seen before?
  awk '!/^#/ && $7 > 0 { split($14, c, "@"); key = $7 "@" (c[2] > 0 ? "ctx" : "0");
        printf "rows %5d  start %5d  forward %7.2f ms  busy %7.2f ms  %s\n", $7, c[2], 1000 * $4,
               1000 * $2, (key in seen) ? "seen" : "new"; seen[key] = 1 }' "$trace" | tee "$out/steps-$k.txt"
}

k=0
IFS=';' read -r -a vlist <<<"${VARIANTS:-}"
[ ${#vlist[@]} -eq 0 ] && vlist=("")
for v in "${vlist[@]}"; do series "$k" "$v"; k=$((k + 1)); done
exit "$status"
