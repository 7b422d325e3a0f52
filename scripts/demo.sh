#!/usr/bin/env bash
# demo.sh: the main job on a fresh Debian 12 machine: installs the Debian packages,
# builds, makes a small model (random weights, a tokenizer trained here), and runs
# it through the engine on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh
bin=${PDSERVE_BUILD_DIR:-build}/pdserve
model=${PDSERVE_BUILD_DIR:-build}/models/small-llama
"$bin" make-model --out "$model" --preset small-llama
echo "--- pdserve generate --model $model --prompt 'Serving language models' --max-tokens 32 --ignore-eos" >&2
"$bin" generate --model "$model" --prompt "Serving language models" --max-tokens 32 --temperature 0 --ignore-eos
