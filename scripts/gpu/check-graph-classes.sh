#!/usr/bin/env bash
# check-graph-classes.sh: decode graphs per batch bucket and context class (graphs.cu,
# docs/results/cuda-model.md), in one device call on one GPU: builds with the gathered
# Debian prefix; runs test_backend_cuda (every op against its CPU twin, graph replay)
# and test_forward_cuda against transformers bf16 made on this GPU
# (gpu_reference.py), both with the classes on (the default) and with
# PDSERVE_CUDA_GRAPH_CLASSES=0 (one 4,096-key sizing); then times the 8B decode step
# (bench_model_cuda --no-prefill: graphs on and op by op in each process) with classes
# on, off, on again (A/B/A: the card's drift shows as the difference of the two A runs).
# What to look for: graphed B=1 at a short context at or below the op-by-op figure of the
# same process; the ratio to the floor (target 1.2x at B=1, 1.35x at B=64).
# Logs go under $OUT (or build-gpu/out) as check-graph-classes.tgz beside env.txt and
# summary.txt; the summary is printed last.
#
# Usage (repository root, on the GPU machine; carry .deps/prefix):
#   scripts/gpu/check-graph-classes.sh          NO_TESTS=1 for the timings alone
# Exit status: 0 when every test passed and every bench run ended, 77 without a GPU,
# else 1 (2: build failed). Reads the GPU's state and never changes it.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build, gpu_run
gpu_header | tee "$out/env.txt"
command -v nvidia-smi >/dev/null 2>&1 || { echo "no GPU"; exit 77; }
gpu_build "$out/build.log" test_backend_cuda test_forward_cuda bench_model_cuda || exit 2
export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/build-gpu
status=0
summary=()
if [ "${NO_TESTS:-0}" != 1 ]; then
  gpu_run test_backend_cuda 240 build-gpu/test_backend_cuda
  gpu_run test_backend_cuda_classes0 240 env PDSERVE_CUDA_GRAPH_CLASSES=0 build-gpu/test_backend_cuda
  ref=build-gpu/gpu-ref
  [ -d "$ref" ] || gpu_run gpu_reference 300 python3 tests/fixtures/models/gpu_reference.py "$ref"
  PDSERVE_GPU_REF=$ref gpu_run test_forward_cuda 240 build-gpu/test_forward_cuda
  PDSERVE_GPU_REF=$ref gpu_run test_forward_cuda_classes0 240 env PDSERVE_CUDA_GRAPH_CLASSES=0 build-gpu/test_forward_cuda
fi
for tag in on1 off on2; do
  c=1; [ "$tag" = off ] && c=0
  gpu_run "bench_classes_$tag" 200 env PDSERVE_CUDA_GRAPH_CLASSES=$c build-gpu/bench_model_cuda --no-prefill
done
{
  echo
  echo "== runs =="
  printf '%s\n' "${summary[@]}"
  for f in test_backend_cuda test_backend_cuda_classes0 test_forward_cuda test_forward_cuda_classes0; do
    [ -f "$out/$f.log" ] && grep -E '^FAIL|failed' "$out/$f.log" | head -n 8 | sed "s/^/$f: /"
  done
  for tag in on1 off on2; do
    echo
    echo "-- bench_model_cuda --no-prefill, PDSERVE_CUDA_GRAPH_CLASSES=$([ "$tag" = off ] && echo 0 || echo 1) ($tag) --"
    grep -E '^\||floor|ceiling' "$out/bench_classes_$tag.log" | head -n 30
  done
} | tee "$out/summary.txt"
tgz=$(mktemp "${TMPDIR:-/tmp}/check-graph-classes.XXXXXX")
(cd "$out" && tar -czf "$tgz" --exclude=env.txt --exclude=summary.txt . &&
  find . -maxdepth 1 -type f ! -name env.txt ! -name summary.txt -delete &&
  mv "$tgz" check-graph-classes.tgz)
exit "$status"
