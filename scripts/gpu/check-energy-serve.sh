#!/usr/bin/env bash
# check-energy-serve.sh: J per output token of `pdserve serve` on one GPU, from the
# server's own energy counters (GET /metrics, NVML energy counter), in one device call:
# builds pdserve (CUDA on, the gathered Debian prefix), starts
#   pdserve serve --device 0 --model preset:llama-3.1-8b --load-format dummy
#                 --tokenizer tests/.cache/tokenizers/llama3 --max-num-seqs 64
# (idle baseline measured at start-up, before the model is loaded), then runs a short
# calibration bench (64 prompts, also the warm-up) and a steady one at concurrency 64
# sized for about DURATION seconds: random prompts, input ~1000 and output ~250 tokens
# (range ratio 0.2), --ignore-eos. Prints J per output token (GPU whole and
# idle-subtracted) beside the published vLLM 0.11.1 figure on H100 (ML.ENERGY
# benchmark, Llama-3.1-8B, batch 64: about 0.12 J/output token).
#
# Read-only on the GPU: no clock, power-limit or mode change (no --sm-clock here), only
# nvidia-smi queries and NVML reads. Usage (repository root, on the GPU machine; carry
# .deps/prefix and tests/.cache/tokenizers):
#   scripts/gpu/check-energy-serve.sh            (DURATION=60 by default; SERVE_EXTRA)
# Full results under $OUT (or build-gpu/out-energy): env.txt, build.log, serve.log,
# calib.json, bench.json, bench.txt, metrics-before.txt, metrics-after.txt, summary.txt.
# Exit: 0 measured, 77 no GPU, 2 build failed, 1 otherwise (the reason is printed).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out-energy}
mkdir -p "$out"
jobs=$(nproc 2>/dev/null || echo 4)
DURATION=${DURATION:-60}
T_START=$(date +%s)
el() { echo $(( $(date +%s) - T_START )); }

. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build
{
  gpu_header power.limit
} | tee "$out/env.txt"
command -v nvidia-smi >/dev/null 2>&1 || { echo "check-energy-serve: no GPU here"; exit 77; }

gpu_build "$out/build.log" pdserve || exit 2
echo "build: done at $(el) s"
BIN=build-gpu/pdserve
TOK=tests/.cache/tokenizers/llama3

# ---- the server ---------------------------------------------------------------------------
SERVE_CMD=("$BIN" serve --device 0 --model preset:llama-3.1-8b --load-format dummy --tokenizer "$TOK"
           --max-num-seqs 64 --max-model-len 4096 --host 127.0.0.1 --port 0 --energy-idle-seconds 3)
# SERVE_EXTRA: more serve flags, e.g. "--max-num-batched-tokens 512" (the per-step token
# budget: smaller budgets spread each prompt's prefill over more decode steps)
read -r -a extra <<<"${SERVE_EXTRA:-}"
SERVE_CMD+=("${extra[@]}")
echo "serve: ${SERVE_CMD[*]}" | tee -a "$out/env.txt"
"${SERVE_CMD[@]}" >"$out/serve.log" 2>&1 &
spid=$!
stop_server() { kill -TERM "$spid" 2>/dev/null; wait "$spid" 2>/dev/null; }
trap stop_server EXIT
url=""
for _ in $(seq 1800); do
  url=$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$out/serve.log" | head -1 | sed 's/listening on //')
  [ -n "$url" ] && break
  if ! kill -0 "$spid" 2>/dev/null; then
    wait "$spid"; rc=$?
    echo "check-energy-serve: the server exited at start-up with status $rc; its log ends:"
    tail -n 25 "$out/serve.log"
    exit 1
  fi
  sleep 0.1
done
[ -n "$url" ] || { tail -n 25 "$out/serve.log"; echo "check-energy-serve: server not listening after 180 s"; exit 1; }
echo "serve: $url at $(el) s"
grep -E 'power:|engine:|kv cache' "$out/serve.log" | head -n 8

BENCH_COMMON=(--base-url "$url" --tokenizer "$TOK" --dataset-name random --random-input-len 1000
              --random-output-len 250 --random-range-ratio 0.2 --ignore-eos --max-concurrency 64
              --disable-tqdm --save-result --result-dir "$out")
# Calibration (also the warm-up): 64 prompts at once.
timeout 150 "$BIN" bench "${BENCH_COMMON[@]}" --num-prompts 64 --seed 1 --result-filename calib.json \
  >"$out/calib.txt" 2>&1
crc=$?
if [ $crc -ne 0 ] || [ ! -s "$out/calib.json" ]; then
  tail -n 30 "$out/calib.txt"; tail -n 15 "$out/serve.log"
  echo "check-energy-serve: calibration bench failed (exit $crc)"
  exit 1
fi
rps=$(python3 -c "import json;print(json.load(open('$out/calib.json'))['request_throughput'])")
# about DURATION s of steady load, within what is left of a 330 s call
left=$(( 300 - $(el) ))
dur=$DURATION
[ $left -lt $(( dur + 15 )) ] && dur=$(( left > 30 ? left - 15 : 15 ))
n=$(python3 -c "import math;print(max(128, min(4000, math.ceil($rps * $dur))))")
echo "calibration: $rps req/s; steady run: $n prompts for ~$dur s (at $(el) s)"
curl -s "$url/metrics" >"$out/metrics-before.txt"
nvidia-smi --query-gpu=power.draw,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader >"$out/smi-before.txt" 2>&1
( sleep $(( dur / 2 )); nvidia-smi --query-gpu=power.draw,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
    --format=csv,noheader >"$out/smi-mid.txt" 2>&1 ) &
BENCH_CMD=("$BIN" bench "${BENCH_COMMON[@]}" --num-prompts "$n" --seed 2 --result-filename bench.json)
echo "bench: ${BENCH_CMD[*]}" >>"$out/env.txt"
timeout $(( dur * 2 + 30 )) "${BENCH_CMD[@]}" >"$out/bench.txt" 2>&1
brc=$?
curl -s "$url/metrics" >"$out/metrics-after.txt"
if [ $brc -ne 0 ] || [ ! -s "$out/bench.json" ]; then
  tail -n 30 "$out/bench.txt"; tail -n 15 "$out/serve.log"
  echo "check-energy-serve: bench failed (exit $brc)"
  exit 1
fi
sed -n '/Serving Benchmark Result/,$p' "$out/bench.txt" | head -n 60

# ---- the figures --------------------------------------------------------------------------
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys, re
out = sys.argv[1]
b = json.load(open(f"{out}/bench.json"))
e = b.get("energy", {})
env = open(f"{out}/env.txt").read().splitlines()
card = env[3] if len(env) > 3 else "?"
def met(path, name):
    for line in open(path):
        if line.startswith(name + "{"):
            return float(line.split()[-1])
    return None
idle = met(f"{out}/metrics-after.txt", "pdserve_gpu_idle_power_watts")
print(f"card, driver, ...: {card}")
print(f"date: {env[0][6:]}")
print(f"completed {b['completed']} requests, {b['total_output_tokens']} output tokens, "
      f"{b['total_input_tokens']} input tokens in {b['duration']:.1f} s")
print(f"output throughput: {b['output_throughput']:.1f} tok/s (total {b['total_token_throughput']:.1f} tok/s)")
print(f"median TTFT {b['median_ttft_ms']:.0f} ms, median TPOT {b['median_tpot_ms']:.1f} ms")
if not e.get("measured") or "gpu_j" not in e:
    print("energy: NOT MEASURED (no GPU energy counter on /metrics)")
    sys.exit(0)
ref = 0.12
whole = e["gpu_j_per_output_token"]
print(f"GPU energy {e['gpu_j']:.1f} J over {e['window_s']:.1f} s (mean {e['gpu_j']/e['window_s']:.0f} W); idle {idle} W")
print(f"J/output token, GPU whole:           {whole:.4f}   (vLLM 0.11.1 H100, ML.ENERGY: ~{ref}; ratio {whole/ref:.2f}x)")
if "gpu_net_j_per_output_token" in e:
    net = e["gpu_net_j_per_output_token"]
    print(f"J/output token, GPU idle-subtracted: {net:.4f}   (ratio {net/ref:.2f}x)")
print(f"J/token (input + output), GPU whole: {e['gpu_j']/(b['total_input_tokens']+b['total_output_tokens']):.5f}")
PY
echo "power during the run (nvidia-smi, read-only): $(cat "$out/smi-mid.txt" 2>/dev/null)"
echo "done at $(el) s"
