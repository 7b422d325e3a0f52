#!/usr/bin/env bash
# check-graphs.sh: decode graphs and device sampling on the GPU, in one device call:
# builds with the gathered Debian prefix, runs test_backend_cuda (every op against the
# CPU twin, graph replay of decode attention, sample_rows against the CPU sampler),
# makes the Hugging Face bf16 reference on this GPU (gpu_reference.py) and runs
# test_forward_cuda against it with graphs on (the default), runs `pdserve generate
# --device 0` against the CPU's greedy text, runs the engine tests on the GPU
# (PDSERVE_TEST_DEVICE=cuda:0), then times the 8B decode step with graphs on and off
# in the same process (bench_model_cuda --no-prefill), beside the copy ceiling. The
# op test, the model test and the benchmark run again on the previous kernels
# (PDSERVE_CUDA_ATTN=v1 PDSERVE_CUDA_GEMV=0 PDSERVE_CUDA_FUSED=0 PDSERVE_CUDA_FA=v1
# PDSERVE_CUDA_PDL=0: the baseline of the
# same call), the model test once more with PDSERVE_CUDA_GRAPHS=0 (every step op by
# op); then the attention lab programs: bench_attention_cuda (decode kernels v1, v2,
# v3 against the CPU, then timed) and bench_prefill_attn_cuda (prefill v1 and the
# opt-in v2 against the CPU, then timed).
# Logs go under $OUT (or build-gpu/out) as check-graphs.tgz beside env.txt and
# summary.txt (a call brings back at most 8 files); the summary is printed last.
#
# Usage (repository root, on the GPU machine; carry .deps/prefix and
# tests/.cache/tokenizers):
#   scripts/gpu/check-graphs.sh            everything above
#   NO_BENCH=1 scripts/gpu/check-graphs.sh without the benchmark
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

gpu_build "$out/build.log" pdserve test_backend_cuda test_forward_cuda bench_model_cuda test_engine test_prefix_cache \
  bench_attention_cuda bench_prefill_attn_cuda || exit 2
export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/build-gpu
status=0
summary=()

# run NAME TIMEOUT CMD...: runs a test, logs to $out/NAME.log, records its status
run() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-34s exit %3d  %4d s' "$name" "$rc" "$(( $(date +%s) - t ))")")
  [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && status=1
  return "$rc"
}

run test_backend_cuda 300 build-gpu/test_backend_cuda
[ $? -eq 77 ] && { cat "$out/test_backend_cuda.log"; exit 77; }
grep -E '^(ok  |FAIL)|failed|differ|chi2|graph replay|sample_rows' "$out/test_backend_cuda.log" | head -n 60

ref=build-gpu/gpu-ref
run gpu_reference 300 python3 tests/fixtures/models/gpu_reference.py "$ref"
tail -n 2 "$out/gpu_reference.log"
PDSERVE_GPU_REF=$ref run test_forward_cuda 300 build-gpu/test_forward_cuda
grep -E '^(ok  |FAIL)|^case|step|failed|float32|graphs vs' "$out/test_forward_cuda.log" | head -n 30
PDSERVE_CUDA_GRAPHS=0 PDSERVE_GPU_REF=$ref run test_forward_cuda_nographs 300 build-gpu/test_forward_cuda
OLD=(env PDSERVE_CUDA_ATTN=v1 PDSERVE_CUDA_GEMV=0 PDSERVE_CUDA_FUSED=0 PDSERVE_CUDA_FA=v1 PDSERVE_CUDA_PDL=0) # the previous kernels
PDSERVE_GPU_REF=$ref run test_forward_cuda_old 300 "${OLD[@]}" build-gpu/test_forward_cuda
grep -E '^(FAIL)|^case|failed|graphs vs' "$out/test_forward_cuda_old.log" | head -n 12
run test_backend_cuda_old 300 "${OLD[@]}" build-gpu/test_backend_cuda
grep -E '^FAIL|failed' "$out/test_backend_cuda_old.log" | head -n 12
PDSERVE_GPU_REF=$ref run test_forward_cuda_gemv1 300 env PDSERVE_CUDA_GEMV=1 build-gpu/test_forward_cuda
grep -E '^FAIL|failed' "$out/test_forward_cuda_gemv1.log" | head -n 12

# the CLI on the GPU: a make-model checkpoint, greedy, GPU vs CPU text
tmp=build-gpu/tiny-model
rm -rf "$tmp"
build-gpu/pdserve make-model --out "$tmp" --preset tiny-llama >/dev/null 2>"$out/generate.log"
gpu_text=$(timeout 120 build-gpu/pdserve generate --device 0 --model "$tmp" --prompt "The scheduler" \
  --max-tokens 24 --temperature 0 --ignore-eos 2>>"$out/generate.log")
gen_rc=$?
cpu_text=$(timeout 120 build-gpu/pdserve generate --model "$tmp" --prompt "The scheduler" \
  --max-tokens 24 --temperature 0 --ignore-eos 2>/dev/null)
sampled=$(timeout 120 build-gpu/pdserve generate --device 0 --model "$tmp" --prompt "The scheduler" \
  --max-tokens 24 --temperature 0.8 --top-p 0.9 --seed 7 --ignore-eos 2>>"$out/generate.log")
sampled_cpu=$(timeout 120 build-gpu/pdserve generate --model "$tmp" --prompt "The scheduler" \
  --max-tokens 24 --temperature 0.8 --top-p 0.9 --seed 7 --ignore-eos 2>/dev/null)
echo "generate --device 0: exit $gen_rc"
echo "  greedy GPU: $(printf '%q' "$gpu_text")"
echo "  greedy CPU: $(printf '%q' "$cpu_text")"
echo "  seeded sampled GPU: $(printf '%q' "$sampled")"
echo "  seeded sampled CPU: $(printf '%q' "$sampled_cpu")"
[ "$gen_rc" -ne 0 ] && status=1
[ "$gpu_text" != "$cpu_text" ] && echo "  (greedy texts differ)"

# the engine tests of the CPU backend, on the GPU
PDSERVE_TEST_DEVICE=cuda:0 run test_engine_cuda 240 build-gpu/test_engine
grep -E '^(ok  |FAIL)|failed' "$out/test_engine_cuda.log" | head -n 20
PDSERVE_TEST_DEVICE=cuda:0 run test_prefix_cache_cuda 240 build-gpu/test_prefix_cache
grep -E '^(ok  |FAIL)|failed' "$out/test_prefix_cache_cuda.log" | head -n 20

if [ "${NO_BENCH:-0}" != 1 ]; then
  t=$(date +%s)
  timeout 300 build-gpu/bench_model_cuda --no-prefill >"$out/bench_model.txt" 2>"$out/bench_model.err"
  echo "bench_model_cuda --no-prefill: exit $?, $(( $(date +%s) - t )) s"
  tail -n 5 "$out/bench_model.err"
  "${OLD[@]}" timeout 300 build-gpu/bench_model_cuda --no-prefill >"$out/bench_model_old.txt" \
    2>"$out/bench_model_old.err"
  echo "bench_model_cuda --no-prefill (previous kernels): exit $?"
  run bench_attention_cuda 240 build-gpu/bench_attention_cuda
  run bench_prefill_attn_cuda 240 env PDSERVE_LOG=info build-gpu/bench_prefill_attn_cuda
fi

{
  echo
  echo "== tests =="
  printf '%s\n' "${summary[@]}"
  [ -f "$out/bench_model.txt" ] && { echo; cat "$out/bench_model.txt"; }
  [ -f "$out/bench_model_old.txt" ] && { echo; echo "-- previous kernels (same call) --"; grep -E '^\| decode' "$out/bench_model_old.txt"; }
  for b in bench_attention_cuda bench_prefill_attn_cuda; do
    [ -f "$out/$b.log" ] && { echo; echo "-- $b --"; grep -E '^\||FAIL|fail|ceiling' "$out/$b.log" | head -n 60; }
  done
} | tee "$out/summary.txt"
# the tarball is written beside $out first: tar of "." must not read the file it writes
tgz=$(mktemp "${TMPDIR:-/tmp}/check-graphs.XXXXXX")
(cd "$out" && tar -czf "$tgz" --exclude=env.txt --exclude=summary.txt . &&
  find . -maxdepth 1 -type f ! -name env.txt ! -name summary.txt -delete &&
  mv "$tgz" check-graphs.tgz)
exit "$status"
