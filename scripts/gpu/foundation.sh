#!/usr/bin/env bash
# foundation.sh: one GPU-machine call for the foundation: proves the whole project
# builds there from the gathered Debian prefix (scripts/gather-prefix.sh), runs the
# test suite there, and writes the tokenizer fixtures with Hugging Face `tokenizers`
# and `transformers` (tests/fixtures/tokenizer/make_fixtures.py).
#
# Usage (repository root, on the GPU machine; carry .deps/prefix and
# tests/.cache/tokenizers): scripts/gpu/foundation.sh
# Results go to $OUT (or build-gpu/out): env.txt, build.log, ctest.log, tokfix/*.json.
# Reads the GPU's state and never changes it.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out}
mkdir -p "$out/tokfix"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  uname -a
  grep PRETTY_NAME /etc/os-release
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  ldconfig -p | grep -E 'libopenblas|libcurl|libgnutls' | head
  python3 -c 'import tokenizers, transformers, torch; print("tokenizers", tokenizers.__version__, "transformers", transformers.__version__, "torch", torch.__version__)'
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

. scripts/gpu/cuda-env.sh   # the scripts run from the repository root
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
t0=$(date +%s)
if cmake -S . -B build-gpu "${gen[@]}" -DPDSERVE_PREFIX=.deps/prefix -DPDSERVE_CUDA=ON "${cuda_args[@]}" \
     >"$out/build.log" 2>&1 && cmake --build build-gpu -j"$(nproc)" >>"$out/build.log" 2>&1; then
  echo "build: ok in $(( $(date +%s) - t0 )) s"
  grep -E '_LIB:' build-gpu/CMakeCache.txt | head -12
  PDSERVE_SOURCE=$PWD timeout 300 ctest --test-dir build-gpu -j8 >"$out/ctest.log" 2>&1
  tail -n 25 "$out/ctest.log"
else
  tail -n 40 "$out/build.log"
  echo "build: FAILED"
fi

PYTHONUNBUFFERED=1 timeout 200 python3 tests/fixtures/tokenizer/make_fixtures.py tests/.cache/tokenizers "$out/tokfix" \
  >"$out/tokfix.log" 2>&1
echo "make_fixtures: exit $?"
tail -n 15 "$out/tokfix.log"
ls -la "$out/tokfix"
