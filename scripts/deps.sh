#!/usr/bin/env bash
# deps.sh: installs the Debian packages pdserve needs, only those missing.
#   scripts/deps.sh            build + run dependencies
#   scripts/deps.sh --test     also what the test suite needs (clang, node, chromium ...)
# Runs apt-get only when something is missing, so it is cheap to call every time.
set -euo pipefail

BUILD_PKGS=(
  build-essential cmake pkg-config
  libmicrohttpd-dev      # HTTP server (OpenAI API, /metrics, control endpoints)
  libcurl4-openssl-dev   # HTTP client (router, bench)
  libcjson-dev           # JSON
  libpcre2-dev           # tokenizer pre-split regexes
  libutf8proc-dev        # Unicode NFC normalisation (Qwen tokenizers)
  libopenblas-dev        # CPU matmul
  liburing-dev           # disk KV store I/O
  libsqlite3-dev         # results database
  gnuplot-nox            # report plots
)
TEST_PKGS=(
  clang llvm libclang-rt-14-dev   # libFuzzer + sanitizers
  python3 curl iproute2 sqlite3
  chromium                        # report page test (headless)
)

want=("${BUILD_PKGS[@]}")
if [ "${1:-}" = "--test" ]; then want+=("${TEST_PKGS[@]}"); fi

missing=()
for p in "${want[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
# Node.js and npm (the official OpenAI client for end-to-end tests, real tokenizer
# files): any install that provides the commands will do (Debian's packages, or a
# nodejs package that bundles npm, which conflicts with Debian's npm package).
if [ "${1:-}" = "--test" ]; then
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "deps.sh: installing ${missing[*]}" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
