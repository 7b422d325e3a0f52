#!/usr/bin/env bash
# fetch-test-node.sh: installs the official OpenAI client (npm `openai`, the version
# pinned in tests/node/package-lock.json) into tests/node/node_modules for the
# end-to-end server tests. Idempotent and quiet when it is already there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/tests/node"
want="$(sed -n 's/.*"openai": *"\([^"]*\)".*/\1/p' "$DIR/package.json" | head -1)"
have="$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$DIR/node_modules/openai/package.json" 2>/dev/null | head -1 || true)"
if [[ -n "$have" && "$have" == "$want" ]]; then
  exit 0
fi
command -v npm >/dev/null || { echo "fetch-test-node: npm is needed (scripts/deps.sh --test)" >&2; exit 1; }
echo "fetch-test-node: openai@$want into tests/node/node_modules" >&2
cd "$DIR"
if [[ -f package-lock.json ]]; then
  npm ci --no-audit --no-fund --silent
else
  npm install --no-audit --no-fund --silent
fi
