#!/usr/bin/env bash
# check-model.sh: the whole model on the GPU, in one device call: builds with the
# gathered Debian prefix, runs test_backend_cuda (every op against the CPU twin),
# makes the Hugging Face bf16 reference on this GPU (gpu_reference.py), runs
# test_forward_cuda against it, runs `pdserve generate --device 0` (start-up memory
# budget), and with BENCH=1 times transformers (benchmarks/hf_reference.py) and then
# our forward pass (bench_model_cuda) on the same card. Logs go under $OUT (or
# build-gpu/out); a short table is printed last.
#
# Usage (repository root, on the GPU machine; carry .deps/prefix):
#   scripts/gpu/check-model.sh           build, op test, reference, model test, generate
#   BENCH=1 scripts/gpu/check-model.sh   ... then the benchmarks
# Exit status: 0 when every test passed, 77 without a GPU, else 1 (2: build failed).
# Reads the GPU's state (nvidia-smi queries) and never changes it.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out}
mkdir -p "$out"
jobs=$(nproc 2>/dev/null || echo 4)
export PYTHONUNBUFFERED=1

. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build
{
  gpu_header
} | tee "$out/env.txt"

gpu_build "$out/build.log" pdserve test_backend_cuda test_forward_cuda bench_model_cuda || exit 2
export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/build-gpu
status=0

t0=$(date +%s)
timeout 300 build-gpu/test_backend_cuda >"$out/test_backend.log" 2>&1
ops_rc=$?
grep -E '^(ok  |FAIL|SKIP)|failed' "$out/test_backend.log" | head -n 40
echo "test_backend_cuda: exit $ops_rc, $(( $(date +%s) - t0 )) s"
[ "$ops_rc" -eq 77 ] && exit 77
[ "$ops_rc" -ne 0 ] && status=1

ref=build-gpu/gpu-ref
t0=$(date +%s)
timeout 300 python3 tests/fixtures/models/gpu_reference.py "$ref" >"$out/reference.log" 2>&1
echo "gpu_reference.py: exit $?, $(( $(date +%s) - t0 )) s"
tail -n 3 "$out/reference.log"
t0=$(date +%s)
PDSERVE_GPU_REF=$ref timeout 300 build-gpu/test_forward_cuda >"$out/test_forward.txt" 2>"$out/test_forward.log"
fwd_rc=$?
grep -E '^(ok  |FAIL)|step|failed|float32' "$out/test_forward.log" | head -n 30
echo "test_forward_cuda: exit $fwd_rc, $(( $(date +%s) - t0 )) s"
[ "$fwd_rc" -ne 0 ] && status=1
# A/B: the same with the first attention kernel only (no tensor-core prefill)
PDSERVE_CUDA_ATTN=basic PDSERVE_GPU_REF=$ref timeout 300 build-gpu/test_forward_cuda \
  >"$out/test_forward_basic.txt" 2>"$out/test_forward_basic.log"
echo "test_forward_cuda (PDSERVE_CUDA_ATTN=basic): exit $?"
grep -E "float32" "$out/test_forward_basic.log"

# the CLI on the GPU: a make-model checkpoint, greedy, GPU vs CPU text
tmp=build-gpu/tiny-model
rm -rf "$tmp"
build-gpu/pdserve make-model --out "$tmp" --preset tiny-llama >/dev/null 2>"$out/generate.log"
gpu_text=$(timeout 120 build-gpu/pdserve generate --device 0 --model "$tmp" --prompt "The scheduler" \
  --max-tokens 24 --temperature 0 --ignore-eos 2>>"$out/generate.log")
gen_rc=$?
cpu_text=$(timeout 120 build-gpu/pdserve generate --model "$tmp" --prompt "The scheduler" \
  --max-tokens 24 --temperature 0 --ignore-eos 2>/dev/null)
grep -E 'budget|KV cache|generate:' "$out/generate.log" | sed 's/^/  /'
echo "generate --device 0: exit $gen_rc; GPU text: $(printf '%q' "$gpu_text")"
echo "generate (CPU)        :          CPU text: $(printf '%q' "$cpu_text")"
[ "$gen_rc" -ne 0 ] && status=1

if [ "${BENCH:-0}" = 1 ]; then
  t0=$(date +%s)
  timeout 400 python3 benchmarks/hf_reference.py "$out/hf.json" >"$out/hf.log" 2>&1
  echo "hf_reference.py: exit $?, $(( $(date +%s) - t0 )) s"
  tail -n 2 "$out/hf.log"
  t0=$(date +%s)
  timeout 300 build-gpu/bench_model_cuda "$out/hf.json" >"$out/bench_model.txt" 2>"$out/bench_model.err"
  echo "bench_model_cuda: exit $?, $(( $(date +%s) - t0 )) s"
  tail -n 5 "$out/bench_model.err"
  if [ "${BENCH_BASIC:-0}" = 1 ]; then # A/B: the first attention kernel only
    PDSERVE_CUDA_ATTN=basic timeout 300 build-gpu/bench_model_cuda "$out/hf.json" \
      >"$out/bench_model_basic.txt" 2>>"$out/bench_model.err"
    echo "bench_model_cuda (PDSERVE_CUDA_ATTN=basic): exit $?"
  fi
fi

echo
echo "== whole model on the GPU vs transformers bf16 on the same GPU (limit rel_l2 < 2e-2) =="
cat "$out/test_forward.txt"
echo "-- PDSERVE_CUDA_ATTN=basic --"
cat "$out/test_forward_basic.txt"
[ -f "$out/bench_model_basic.txt" ] && { echo; echo "-- PDSERVE_CUDA_ATTN=basic (first kernels) --"; grep -E '^\| (decode|prefill)|^prefill' "$out/bench_model_basic.txt"; }
[ -f "$out/bench_model.txt" ] && { echo; cat "$out/bench_model.txt"; }
exit "$status"
