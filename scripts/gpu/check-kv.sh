#!/usr/bin/env bash
# check-kv.sh: the KV connectors with the KV cache on GPUs, in one device call: builds
# with the gathered Debian prefix, runs test_kv_cuda (gpu, cpu, disk, tcp between a
# process on GPU 0 and one on GPU 1, every byte compared), bench_kv_cuda (each medium
# against the ceiling measured in the same run), then end to end: `pdserve up` with
# co-1gpu, dis-gpu, dis-cpu, dis-disk and dis-tcp on a tiny make-model checkpoint, whose
# greedy completions must all equal co-1gpu's. Logs go under $OUT (or build-gpu/out);
# a short table is printed last.
#
# Usage (repository root, on the GPU machine; carry .deps/prefix):
#   scripts/gpu/check-kv.sh                 build, test, bench, end to end
#   BENCH_COPIES=auto,memcpy,kernel scripts/gpu/check-kv.sh   A/B of the copy paths
#   SKIP_BENCH=1 / SKIP_E2E=1 / SKIP_TEST=1 / SKIP_BUILD=1   leave a part out
#   BUILD=DIR E2E_DEVS=cpu,cpu E2E_DEV=cpu  the end-to-end part elsewhere (a dry run)
# Exit status: 0 when every check passed, 77 without a GPU, else 1 (2: build failed).
# Reads the GPU's state (nvidia-smi queries) and never changes it.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out}
mkdir -p "$out"
jobs=$(nproc 2>/dev/null || echo 4)

. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build
{
  gpu_header
  nvidia-smi topo -m 2>&1 | head -n 6
} | tee "$out/env.txt"

B=${BUILD:-build-gpu}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  gpu_build "$out/build.log" pdserve test_kv_cuda bench_kv_cuda || exit 2
fi
export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/$B
status=0

if [ "${SKIP_TEST:-0}" != 1 ]; then
  t0=$(date +%s)
  timeout 180 "$B/test_kv_cuda" >"$out/test_kv_cuda.log" 2>&1
  test_rc=$?
  grep -E '^(ok  |FAIL|SKIP)|^     |failed|differs|error' "$out/test_kv_cuda.log" | head -n 60
  echo "test_kv_cuda: exit $test_rc, $(( $(date +%s) - t0 )) s"
  [ "$test_rc" -eq 77 ] && exit 77
  [ "$test_rc" -ne 0 ] && status=1
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  t0=$(date +%s)
  timeout "${BENCH_TIMEOUT:-200}" "$B/bench_kv_cuda" --dir "$B" --tokens "${BENCH_TOKENS:-8192}" \
    --copies "${BENCH_COPIES:-auto,memcpy,kernel}" >"$out/bench_kv_cuda.txt" 2>"$out/bench_kv_cuda.err"
  echo "bench_kv_cuda: exit $?, $(( $(date +%s) - t0 )) s"
  tail -n 5 "$out/bench_kv_cuda.err"
fi

# ---- end to end: greedy completions of every setup equal co-1gpu's ------------------
e2e_summary=""
if [ "${SKIP_E2E:-0}" != 1 ]; then
  model=$B/kv-tiny-model
  rm -rf "$model"
  "$B/pdserve" make-model --out "$model" --preset tiny-llama >"$out/make-model.log" 2>&1 ||
    { tail -5 "$out/make-model.log"; echo "make-model failed"; exit 1; }
  # prompts of 1 to ~40 KV blocks (blocks of 16 tokens)
  python3 - "$out/prompts.json" <<'EOF'
import json, sys
words = "the quick brown fox jumps over a lazy dog while prefill and decode share the cache".split()
prompts = ["Hello", "The scheduler"]
for n in (40, 120, 250):
    prompts.append(" ".join(words[i % len(words)] + str(i % 7) for i in range(n)))
json.dump(prompts, open(sys.argv[1], "w"))
EOF
  run_setup() { # NAME DEVICES: starts `pdserve up`, asks every prompt, stops it
    local name=$1 devs=$2 port="" pid
    local log="$out/e2e-$name.log"
    "$B/pdserve" up --setup "$name" --model "$model" --port 0 --device-list "$devs" \
      --kv-transfer-timeout 60 -- --kv-cache-memory 512MiB --max-model-len 2048 2>"$log" &
    pid=$!
    for _ in $(seq 900); do
      port="$(sed -n 's|.*ready: .* on http://[0-9.]*:\([0-9]*\).*|\1|p' "$log" | head -1)"
      [ -n "$port" ] && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if [ -z "$port" ]; then
      echo "$name: not ready"; tail -n 30 "$log"; kill -TERM "$pid" 2>/dev/null; wait "$pid"; return 1
    fi
    python3 - "$port" "$model" "$out/prompts.json" "$out/e2e-$name.json" <<'EOF' >>"$log" 2>&1
import json, sys, urllib.request
port, model, prompts, dst = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), sys.argv[4]
texts = []
for p in prompts:
    body = json.dumps({"model": model, "prompt": p, "max_tokens": 24, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    try:
        texts.append(json.load(urllib.request.urlopen(req, timeout=120))["choices"][0]["text"])
    except Exception as e:
        texts.append(f"ERROR {e}")
json.dump(texts, open(dst, "w"))
EOF
    kill -TERM "$pid"
    local rc=""
    for _ in $(seq 400); do
      if ! kill -0 "$pid" 2>/dev/null; then wait "$pid"; rc=$?; break; fi
      sleep 0.1
    done
    [ -n "$rc" ] || { kill -KILL "$pid"; rc=kill; }
    local left
    left=$(ls /dev/shm 2>/dev/null | grep -c "pdkv-up$pid-")
    echo "$name: exit $rc after SIGTERM, $left shm segments left"
    [ "$rc" = 0 ] && [ "$left" = 0 ]
  }
  t0=$(date +%s)
  run_setup co-1gpu "${E2E_DEV:-0}" || status=1
  grep -q ERROR "$out/e2e-co-1gpu.json" && { echo "co-1gpu: a request failed"; status=1; }
  for s in dis-gpu dis-cpu dis-disk dis-tcp; do
    if run_setup "$s" "${E2E_DEVS:-0,1}" && [ -f "$out/e2e-co-1gpu.json" ] &&
       cmp -s "$out/e2e-co-1gpu.json" "$out/e2e-$s.json" && ! grep -q ERROR "$out/e2e-$s.json"; then
      e2e_summary+="ok   $s: $(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" \
        "$out/e2e-$s.json") greedy completions identical to co-1gpu"$'\n'
    else
      e2e_summary+="FAIL $s: completions differ from co-1gpu or the setup failed (e2e-$s.log)"$'\n'
      status=1
    fi
  done
  grep -h -E "kv gpu|kv cpu store|cuda kv transfers|error|Error" "$out"/e2e-*.log | sort | uniq -c | head -n 20
  echo "e2e: $(( $(date +%s) - t0 )) s"
fi

echo
echo "== test_kv_cuda =="
[ -f "$out/test_kv_cuda.log" ] && grep -E '^(ok  |FAIL)|^     ' "$out/test_kv_cuda.log"
[ -f "$out/bench_kv_cuda.txt" ] && { echo; echo "== bench_kv_cuda =="; cat "$out/bench_kv_cuda.txt"; }
[ -n "$e2e_summary" ] && { echo; echo "== end to end (pdserve up, CUDA backend) =="; printf '%s' "$e2e_summary"; }
[ -f "$out/e2e-co-1gpu.json" ] && echo "co-1gpu first completions: $(head -c 300 "$out/e2e-co-1gpu.json")"
exit "$status"
