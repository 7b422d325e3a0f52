#!/usr/bin/env bash
# build.sh: configures and builds pdserve into build/ (or $PDSERVE_BUILD_DIR).
# Extra arguments go to cmake's configure step (e.g. -DPDSERVE_PREFIX=.deps/prefix).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${PDSERVE_BUILD_DIR:-build}
gen=()
if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi
if [ ! -f "$dir/CMakeCache.txt" ]; then
  cmake -S . -B "$dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
elif [ $# -gt 0 ]; then
  cmake -S . -B "$dir" "$@" >/dev/null
fi
cmake --build "$dir" -j"$(nproc)"
