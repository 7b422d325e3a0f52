#!/usr/bin/env bash
# check-host-ctas.sh: how many CTAs a KV copy to or from pinned host memory may take
# (PDSERVE_KV_XFER_HOST_CTAS, src/backend/cuda/kv_ipc.cu) against what the copy costs
# the same process's forward pass beside it, in one device call on one GPU.
# For each cap (CAPS, default "0 264 132 64 32 16"; 0: no cap, the grid of SMs x 8
# CTAs), a small `pdserve profile` of Llama-3.2-3B (dummy weights) on GPU 0 with the
# device-share pairs on: its lines
#   "copies beside this process's own steps": each kind of step while another thread
#     of the process copies 256 MiB batches back to back (x: over the step alone), and
#     the copy beside it;
#   "shared device, copies of 256 MiB": the copy's rate alone (GB/s) and beside a
#     second process's steps.
# Then (unless SKIP_SERVE=1) `pdserve sweep` of plans/paper-batch-quick-1gpu.json's
# dis-cpu (both instances on GPU 0, 16k-token prompts, batch 4 and 16) under each of
# SERVE_CAPS (default "0 32"), the rows of each into the log.
# Usage (repository root; carry .deps/prefix and tests/.cache/tokenizers/llama3):
#   scripts/gpu/check-host-ctas.sh
# Logs under $OUT (or build-gpu/out-host-ctas). Reads the GPU's state, never changes it.
set -uo pipefail
cd "$(dirname "$0")/../.."
. scripts/gpu/cuda-env.sh
out=${OUT:-build-gpu/out-host-ctas}
mkdir -p "$out"
gpu_header clocks.max.sm,power.limit | tee "$out/env.txt"
command -v nvidia-smi >/dev/null 2>&1 || { echo "check-host-ctas: no GPU here"; exit 77; }
[ "${SKIP_BUILD:-0}" = 1 ] || gpu_build "$out/build.log" pdserve || exit 2
rm -f "$out/build.log"
BIN=build-gpu/pdserve
TOK=tests/.cache/tokenizers/llama3
for cap in ${CAPS:-0 264 132 64 32 16}; do
  PDSERVE_KV_XFER_HOST_CTAS=$cap timeout 180 "$BIN" profile --model preset:llama-3.2-3b --device 0 \
    -o "$out/profile-$cap.json" --repeats 1 --no-power-cap \
    --prefill-tokens 2048 --prefill-context 0,2048 --decode-batch 16 --decode-context 4096,16640 \
    >"$out/profile-$cap.log" 2>&1
  echo "cap $cap: exit $?"
  grep -E "cuda kv transfers|copies beside this process|shared device, copies" "$out/profile-$cap.log" |
    sed "s/^/cap $cap: /"
done
if [ "${SKIP_SERVE:-0}" != 1 ]; then
  for cap in ${SERVE_CAPS:-0 32}; do
    rm -f "$out/serve-$cap.db"
    PDSERVE_KV_XFER_HOST_CTAS=$cap timeout "${SWEEP_TIMEOUT:-200}" "$BIN" sweep plans/paper-batch-quick-1gpu.json \
      --setups dis-cpu --db "$out/serve-$cap.db" --model preset:llama-3.2-3b --tokenizer "$TOK" \
      >"$out/serve-$cap.log" 2>&1
    echo "serve cap $cap: exit $?"
    "$BIN" report "$out/serve-$cap.db" -o "$out/serve-$cap-report" --no-plots 2>/dev/null | head -n 4 |
      sed "s/^/serve cap $cap: /"
  done
fi
(cd "$out" && tar -czf logs.tgz profile-* serve-* 2>/dev/null && rm -rf profile-* serve-*)
echo "check-host-ctas: done"
