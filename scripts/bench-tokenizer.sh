#!/usr/bin/env bash
# bench-tokenizer.sh: pdserve's tokenizer encode speed against a competitor on the same
# texts and the same machine, one thread each.
#   1. builds and runs benchmarks/bench_tokenizer (random-dataset, English and test
#      corpus prompts of 1k, 8k and 32k tokens) and keeps the texts and ids it wrote;
#   2. times Hugging Face `tokenizers` on them: benchmarks/tokenizer_hf.py when python3
#      can import it, else its node binding (benchmarks/tokenizer_node.mjs hf) when
#      $HF_TOKENIZERS_NODE (default tests/.cache/npm-hf-tokenizers) holds
#      node_modules/tokenizers (`npm install --prefix DIR tokenizers`), else
#      @lenml/tokenizers, a JavaScript port (tokenizer_node.mjs lenml, from
#      tests/.cache/npm-tokenizers), else stops;
#   3. prints per text: pdserve's median ms, the competitor's, competitor / pdserve
#      (above 1: pdserve is faster) and whether the competitor's ids equal pdserve's.
# usage: scripts/bench-tokenizer.sh [TOKENIZER_DIR] [bench_tokenizer options...]
#   TOKENIZER_DIR  default $PDSERVE_TOKENIZER, else tests/.cache/tokenizers/llama3
#   PDSERVE_BUILD_DIR  build folder (default build; configured Release without CUDA
#                      if absent)
#   MIN_TIME       seconds each text is timed for, both sides (default 0.5)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${PDSERVE_BUILD_DIR:-build}
tokdir=${1:-${PDSERVE_TOKENIZER:-tests/.cache/tokenizers/llama3}}
shift || true
min_time=${MIN_TIME:-0.5}
[ -s "$tokdir/tokenizer.json" ] || { echo "bench-tokenizer: no $tokdir/tokenizer.json" >&2; exit 1; }
if [ ! -f "$build/CMakeCache.txt" ]; then   # the bench needs no CUDA: a quick CPU build
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DPDSERVE_CUDA=OFF >/dev/null
fi
cmake --build "$build" -j"$(nproc)" --target bench_tokenizer >/dev/null
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "=== pdserve ($(git rev-parse --short HEAD 2>/dev/null || echo '?')), $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
PDSERVE_SOURCE=$PWD "$build/bench_tokenizer" --tokenizer "$tokdir" --out "$out" --min-time "$min_time" "$@"

bundle=$(ls tests/.cache/npm-tokenizers/*/package/dist/main.global.js 2>/dev/null | head -1 || true)
hf_node=${HF_TOKENIZERS_NODE:-tests/.cache/npm-hf-tokenizers}
if python3 -c 'import tokenizers' 2>/dev/null; then
  echo "=== Hugging Face tokenizers (python)"
  python3 benchmarks/tokenizer_hf.py "$tokdir" "$out" "$min_time" >"$out/other.tsv"
elif command -v node >/dev/null && [ -d "$hf_node/node_modules/tokenizers" ]; then
  echo "=== Hugging Face tokenizers (node binding; python tokenizers is not installed here)"
  node benchmarks/tokenizer_node.mjs hf "$hf_node" "$tokdir" "$out" "$min_time" >"$out/other.tsv"
elif command -v node >/dev/null && [ -n "$bundle" ]; then
  echo "=== @lenml/tokenizers (node; neither python nor node Hugging Face tokenizers here)"
  node benchmarks/tokenizer_node.mjs lenml "$bundle" "$tokdir" "$out" "$min_time" >"$out/other.tsv"
else
  echo "=== no competitor: no python3 tokenizers, no node with $hf_node or tests/.cache/npm-tokenizers"
  exit 0
fi
head -1 "$out/other.tsv"
awk -F'\t' '
  NR == FNR { ms[$1] = $4; tok[$1] = $2; next }
  /^#/ { next }
  { printf "%-14s %7d %12.3f %14.3f %9.2f   %s\n", $1, tok[$1], ms[$1], $2, $2 / ms[$1], $4 }
  BEGIN { printf "%-14s %7s %12s %14s %9s   %s\n", "text", "tokens", "pdserve ms", "competitor ms",
                 "ratio", "same ids" }
' "$out/pdserve.tsv" "$out/other.tsv"
