#!/usr/bin/env bash
# disk-put.sh: where a disk-medium KV put goes, one request at a time, on the GPU machine
# (two GPUs), in one device call:
#   1. builds pdserve and bench_kv_cuda (CUDA on, the gathered Debian prefix);
#   2. bench_kv_cuda --media disk: one transfer against the disk's ceiling, same run;
#   3. `pdserve up --setup dis-disk` with the prefill on GPU 1 and the decode on GPU 0,
#      then the other way round: one warm-up and REQUESTS (4) requests of TOKENS (16384)
#      prompt tokens and 2 output tokens, one at a time; after each, the request's phases
#      (pdserve_timing: prefill, kv = the put, decode_wait = the get) and the prefill
#      instance's /metrics put split (open, stage, checksum, write, publish) for that put;
#   4. `pdserve profile --medium disk` on each GPU: the profiler's put of the same size,
#      its train's split logged (the simulator's view of the disk).
# Read-only on the GPUs. Usage (repository root, GPU machine; carry .deps/prefix and
# tests/.cache/tokenizers): scripts/gpu/disk-put.sh; SKIP_BENCH=1 and PROFILE_DEVICES=""
# leave steps 2 and 4 out, ORDERS ("1,0 0,1") picks step 3's ("0,0 0,0" on one GPU: both
# instances on it, twice). BASE_DIR (a folder of files that replace the tree's, at the
# same relative paths, e.g. an earlier src/kv/kv_disk.c; carry it too): a baseline
# pdserve is built from the tree with them, and each of step 3's deployments runs with
# the baseline first, then with this tree's, in the same call. Results under $OUT (or
# build-gpu/out-disk-put): env.txt and log.txt. Exit: 0 done, 77 no GPU, 2 build failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out-disk-put}
mkdir -p "$out"
MODEL=${MODEL:-preset:llama-3.2-3b}
TOK=tests/.cache/tokenizers/llama3
TOKENS=${TOKENS:-16384}
REQUESTS=${REQUESTS:-4}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
exec > >(tee -a "$out/log.txt") 2>&1
. scripts/gpu/cuda-env.sh
gpu_header | tee "$out/env.txt"
command -v nvidia-smi >/dev/null 2>&1 || { echo "disk-put: no GPU here"; exit 77; }
df -h /tmp | tee -a "$out/env.txt"
gpu_build "$out/build.log" pdserve bench_kv_cuda || exit 2
rm -f "$out/build.log"
BIN=build-gpu/pdserve
bins=("this:$BIN")
if [ -n "${BASE_DIR:-}" ]; then
  base=build-gpu/base-tree
  rm -rf "$base" && mkdir -p "$base"
  tar -c --exclude=./build-gpu --exclude=./.deps --exclude=./.git --exclude='./build*' . | tar -x -C "$base"
  ln -s "$PWD/.deps" "$base/.deps"
  (cd "$BASE_DIR" && find . -type f) | while read -r f; do cp "$BASE_DIR/$f" "$base/$f"; done
  echo "baseline: the tree with $(cd "$BASE_DIR" && find . -type f | tr '\n' ' ')"
  (cd "$base" && gpu_build "$PWD/build.log" pdserve) || exit 2
  bins=("base:$base/build-gpu/pdserve" "this:$BIN")
fi
echo "build: done at $(el) s"

if [ -z "${SKIP_BENCH:-}" ]; then
  build-gpu/bench_kv_cuda --media disk --dir /tmp 2>&1 | tail -n 12
  echo "bench_kv_cuda: done at $(el) s"
fi

one_order() { # DEVICES (prefill,decode as `up` takes them) LABEL BINARY
  local devs=$1 tag=$2 bin=$3 log="$out/up-$1-$2-$(el).log" port="" pre=""
  "$bin" up --setup dis-disk --model "$MODEL" --device-list "$devs" --kv-store-capacity 48GB --port 0 -- \
    --tokenizer "$TOK" --max-model-len $((TOKENS + 256)) >"$log" 2>&1 &
  local up=$!
  port=$(up_port "$log" $up 600)
  pre=$(sed -n 's|^\[prefill0\] pdserve serve: listening on \(http://127.0.0.1:[0-9]*\) (model.*|\1|p' "$log" | head -1)
  if [ -z "$port" ] || [ -z "$pre" ]; then echo "up $devs: not ready"; tail -20 "$log"; kill $up 2>/dev/null; return 1; fi
  grep -E "cuda kv transfers: device|listening on" "$log" | sed 's/: copies auto.*//' 
  curl -sf "$pre/metrics" >"$out/m0"
  for i in $(seq 0 "$REQUESTS"); do
    python3 - "$TOKENS" "$devs-$i" >"$out/prompt.json" <<'PY'
import json, random, sys
random.seed(sys.argv[2]) # a prompt of its own: no block of it is in the store yet
n = int(sys.argv[1])
print(json.dumps({"prompt": [random.randrange(1000, 100000) for _ in range(n)], "max_tokens": 2,
                  "temperature": 0, "ignore_eos": True, "pdserve_timing": True}))
PY
    curl -s --fail-with-body "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
      -d @"$out/prompt.json" >"$out/r.json" || { echo "request $i failed: $(head -c 300 "$out/r.json")"; }
    curl -sf "$pre/metrics" >"$out/m1"
    python3 - "$devs ($tag)" "$i" "$out/r.json" "$out/m0" "$out/m1" <<'PY'
import json, re, sys
devs, i, rj, m0, m1 = sys.argv[1:]
def parts(p):
    d = {}
    for line in open(p):
        m = re.match(r'pdserve_kv_store_put_seconds_total\{.*part="(\w+)"\} (\S+)', line)
        if m: d[m.group(1)] = float(m.group(2))
    return d
a, b = parts(m0), parts(m1)
def find(o):
    if isinstance(o, dict):
        if "phases" in o: return o["phases"]
        for v in o.values():
            r = find(v)
            if r: return r
    return {}
try:
    ph = find(json.load(open(rj)))
except Exception:
    ph = {}
split = " ".join("%s %.3f" % (k, b[k] - a.get(k, 0)) for k in b)
print("devices %s, request %s%s: prefill %.3f s, put (kv) %.3f s, get (decode_wait) %.3f s; put split: %s"
      % (devs, i, " (warm-up)" if i == "0" else "", ph.get("prefill", -1),
         ph.get("kv", -1), ph.get("decode_wait", -1), split))
PY
    mv "$out/m1" "$out/m0"
  done
  kill -TERM $up; wait $up
  rm -f "$out/m0" "$out/r.json"
  echo "up $devs ($tag): done at $(el) s"
}
for o in ${ORDERS-1,0 0,1}; do
  for b in "${bins[@]}"; do one_order "$o" "${b%%:*}" "${b#*:}"; done
done

for dev in ${PROFILE_DEVICES-0 1}; do
  timeout 200 "$BIN" profile --model "$MODEL" --device "$dev" -o "$out/profile-$dev.json" --repeats 1 \
    --prefill-tokens 256 --prefill-context 0 --decode-batch 1 --decode-context 1024 --medium disk \
    --medium-train "${TRAIN:-12}" --no-power --no-power-cap 2>&1 | grep -E "medium disk" | sed "s/^/GPU $dev: /"
  echo "profile GPU $dev: done at $(el) s"
done
rm -f "$out/prompt.json" "$out"/profile-*.json
(cd "$out" && tar -czf up-logs.tgz up-*.log && rm -f up-*.log)
echo "disk-put: finished at $(el) s"
