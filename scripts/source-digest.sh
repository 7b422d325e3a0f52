#!/usr/bin/env bash
# source-digest.sh: prints a 12-hex-digit digest of the source tree (CMakeLists.txt and
# every .c, .h, .cu and .sh under src, benchmarks, tests, fuzz and scripts). The GPU
# scripts print it in their env.txt, because a copy of the tree there may carry no git
# history (or a stale one); running this script on a checkout tells which commit a
# GPU log came from.
set -euo pipefail
cd "$(dirname "$0")/.."
find CMakeLists.txt src benchmarks tests fuzz scripts -type f \
  \( -name '*.c' -o -name '*.h' -o -name '*.cu' -o -name '*.sh' -o -name CMakeLists.txt \) \
  -not -path '*/.cache/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12
