#!/usr/bin/env bash
# check-kv-nccl.sh: the nccl KV medium on a machine with two GPUs, in one device call:
# builds with the gathered Debian prefix, runs test_kv_nccl (GPU 0 -> GPU 1, whole and
# layerwise, every byte compared, a decode peer and a prefill peer killed mid-transfer)
# and test_kv_nccl_open, bench_kv_cuda over gpu and nccl (each against its ceiling in
# the same run, NCCL's raw send/recv for nccl), then `pdserve up --setup dis-nccl`
# layerwise and whole on --device-list 0,1, whose greedy completions must equal
# co-1gpu's. Logs under $OUT (or build-gpu/out); a short table last.
#
# Usage (repository root, on the GPU machine; carry .deps/prefix):
#   scripts/gpu/check-kv-nccl.sh
#   SKIP_BUILD=1 / SKIP_TEST=1 / SKIP_BENCH=1 / SKIP_E2E=1   leave a part out
# Exit status: 0 when every check passed, 77 without two GPUs or NCCL, else 1 (2: build).
# Reads the GPU's state and never changes it; NCCL_* variables are left as they are.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out}
mkdir -p "$out"
. scripts/gpu/cuda-env.sh
gpu_env_nccl "$out/env.txt"
B=build-gpu
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  gpu_build "$out/build.log" pdserve test_kv_nccl test_kv_nccl_open bench_kv_cuda || exit 2
fi
export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/$B
status=0
if [ "${SKIP_TEST:-0}" != 1 ]; then
  t0=$(date +%s)
  timeout 60 "$B/test_kv_nccl_open" >"$out/test_kv_nccl_open.log" 2>&1 || status=1
  timeout 300 "$B/test_kv_nccl" >"$out/test_kv_nccl.log" 2>&1
  rc=$?
  grep -E '^(ok  |FAIL|SKIP)|^     |failed|differs|error|D:|P:' "$out/test_kv_nccl.log" | head -n 60
  echo "test_kv_nccl: exit $rc, $(( $(date +%s) - t0 )) s"
  [ "$rc" -eq 77 ] && exit 77
  [ "$rc" -ne 0 ] && status=1
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  for mode in whole layerwise; do
    timeout 200 "$B/bench_kv_cuda" --dir "$B" --media gpu,nccl --mode $mode \
      --tokens "${BENCH_TOKENS:-8192}" >"$out/bench_kv_cuda-$mode.txt" 2>"$out/bench_kv_cuda-$mode.err"
    echo "bench_kv_cuda $mode: exit $?"; tail -n 3 "$out/bench_kv_cuda-$mode.err"
  done
fi
e2e=""
if [ "${SKIP_E2E:-0}" != 1 ]; then
  model=$B/kv-tiny-model
  rm -rf "$model"
  "$B/pdserve" make-model --out "$model" --preset tiny-llama >"$out/make-model.log" 2>&1 || { echo "make-model failed"; exit 1; }
  python3 - "$out/prompts.json" <<'PY'
import json, sys
words = "the quick brown fox jumps over a lazy dog while prefill and decode share the cache".split()
prompts = ["Hello", "The scheduler"] + [" ".join(words[i % len(words)] + str(i % 7) for i in range(n)) for n in (40, 120, 250)]
json.dump(prompts, open(sys.argv[1], "w"))
PY
  run_setup() { # LABEL SETUP DEVICES [UP-ARGS...]
    local label=$1 name=$2 devs=$3 port="" pid; shift 3
    local log="$out/e2e-$label.log"
    "$B/pdserve" up --setup "$name" --model "$model" --port 0 --device-list "$devs" \
      --kv-transfer-timeout 60 "$@" -- --kv-cache-memory 512MiB --max-model-len 2048 2>"$log" &
    pid=$!
    for _ in $(seq 900); do
      port="$(sed -n 's|.*ready: .* on http://[0-9.]*:\([0-9]*\).*|\1|p' "$log" | head -1)"
      [ -n "$port" ] && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if [ -z "$port" ]; then echo "$label: not ready"; tail -n 30 "$log"; kill -TERM "$pid" 2>/dev/null; wait "$pid"; return 1; fi
    python3 - "$port" "$model" "$out/prompts.json" "$out/e2e-$label.json" <<'PY' >>"$log" 2>&1
import json, sys, urllib.request
port, model, prompts, dst = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), sys.argv[4]
texts = []
for p in prompts:
    body = json.dumps({"model": model, "prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    try:
        texts.append(json.load(urllib.request.urlopen(req, timeout=120))["choices"][0]["text"])
    except Exception as e:
        texts.append(f"ERROR {e}")
json.dump(texts, open(dst, "w"))
PY
    kill -TERM "$pid"
    local rc=""
    for _ in $(seq 400); do
      if ! kill -0 "$pid" 2>/dev/null; then wait "$pid"; rc=$?; break; fi
      sleep 0.1
    done
    [ -n "$rc" ] || { kill -KILL "$pid"; rc=kill; }
    echo "$label: exit $rc after SIGTERM"
    [ "$rc" = 0 ]
  }
  run_setup co-1gpu co-1gpu 0 || status=1
  for mode in layerwise whole; do
    if run_setup "dis-nccl-$mode" dis-nccl 0,1 --kv-transfer-mode $mode && [ -f "$out/e2e-co-1gpu.json" ] &&
       cmp -s "$out/e2e-co-1gpu.json" "$out/e2e-dis-nccl-$mode.json" && ! grep -q ERROR "$out/e2e-dis-nccl-$mode.json"; then
      e2e+="ok   dis-nccl $mode: greedy completions identical to co-1gpu"$'\n'
    else
      e2e+="FAIL dis-nccl $mode: completions differ or the setup failed (e2e-dis-nccl-$mode.log)"$'\n'
      status=1
    fi
  done
  grep -h -E "kv nccl|NCCL|error|Error" "$out"/e2e-dis-nccl-*.log | sort | uniq -c | head -n 20
fi
echo
echo "== test_kv_nccl =="
[ -f "$out/test_kv_nccl.log" ] && grep -E '^(ok  |FAIL)|^     ' "$out/test_kv_nccl.log"
for mode in whole layerwise; do
  [ -f "$out/bench_kv_cuda-$mode.txt" ] && { echo; echo "== bench_kv_cuda ($mode) =="; cat "$out/bench_kv_cuda-$mode.txt"; }
done
[ -n "$e2e" ] && { echo; echo "== end to end =="; printf '%s' "$e2e"; }
exit "$status"
