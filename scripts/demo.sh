#!/usr/bin/env bash
# demo.sh: the main job on a fresh Debian 12 machine: installs the Debian packages,
# builds, and runs `pdserve demo`: a small model made here (random weights, a tokenizer
# trained here), every setup of the study side by side on the CPU (processes in place
# of GPUs), a comparison table with the Pareto frontier points, and an HTML report.
# Extra arguments go to `pdserve demo` (e.g. --fresh, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh
exec "${PDSERVE_BUILD_DIR:-build}/pdserve" demo --out pdserve-demo "$@"
