#!/usr/bin/env bash
# test_soak_short.sh: scripts/soak.sh for about a minute inside ctest: Poisson traffic
# with 20% of clients hanging up mid-stream against `pdserve up --setup dis-cpu`; no
# error but the aborts, every KV pool empty and no reservation held at the end, no
# shared-memory segment or store left, no sanitizer report. The RSS check is made for a
# shared 2-core CI machine: growth after warm-up must stay under 128 MiB (a leak of the
# aborted requests' KV or buffers would pass it; allocator noise never does). Under
# AddressSanitizer (PDSERVE_SANITIZE=ON builds) the soak is shortened to 20 s at 2
# requests/s and RSS is only reported (ASan's quarantine holds freed memory).
set -uo pipefail
ROOT="${PDSERVE_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
BUILD="${PDSERVE_BUILD:-$ROOT/build}"
export PDSERVE_BIN="${PDSERVE_BIN:-$BUILD/pdserve}"
[ -x "$PDSERVE_BIN" ] || { echo "FAIL: no pdserve binary at $PDSERVE_BIN"; exit 1; }
for tool in python3 curl; do
  command -v $tool >/dev/null || { echo "SKIP: $tool is not installed (scripts/deps.sh --test)"; exit 77; }
done
if grep -q '^PDSERVE_SANITIZE:BOOL=ON' "$BUILD/CMakeCache.txt" 2>/dev/null; then
  echo "note: sanitizer build: the soak is shortened to 20 s at 2 req/s, RSS reported only"
  export SOAK_SECONDS=20 SOAK_RATE=2 SOAK_RSS_CHECK=report
else
  export SOAK_SECONDS="${SOAK_SECONDS:-60}" SOAK_RATE="${SOAK_RATE:-4}" SOAK_RSS_BOUND_KIB=131072
fi
exec "$ROOT/scripts/soak.sh"
