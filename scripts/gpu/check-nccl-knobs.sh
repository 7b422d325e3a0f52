#!/usr/bin/env bash
# check-nccl-knobs.sh: does one of NCCL's own settings lift the nccl KV medium at 1 GiB?
# Runs bench_kv_cuda --media nccl (whole, 9,360 tokens of Llama-3.2-3B = 1 GiB, the
# prefill side's blocks in shuffled runs of 4) once per setting below, each run under
# that setting alone, so that its ceiling (NCCL's own 1 GiB send/recv) and its lab lines
# (NCCL alone at the medium's op sizes) are measured under the same setting as the
# medium. Compare each run's medium GB/s with the best ceiling of all runs: a setting
# that helps NCCL's 1 GiB op as much as the medium's ops changes nothing.
# Settings (NCCL's documented variables, plus its copy-engine p2p path):
#   -                                  NCCL as found
#   NCCL_P2P_NVL_CHUNKSIZE=2097152     larger / smaller pieces per NVLink step (default
#   NCCL_P2P_NVL_CHUNKSIZE=131072        512 KiB)
#   NCCL_MIN_P2P_NCHANNELS=32          more channels per peer
#   NCCL_P2P_READ_ENABLE=0             write mode instead of read
#   NCCL_P2P_USE_CUDA_MEMCPY=1         the copy engines instead of NCCL's kernels
# Usage (repository root, GPU machine with two GPUs; carry .deps/prefix):
#   scripts/gpu/check-nccl-knobs.sh        KNOBS="A=1|B=2 C=3" to choose the settings
# Logs under $OUT (or build-gpu/out): one bench_kv_cuda-*.txt per setting, rows at the end.
# Reads the GPU's state and never changes it.
set -uo pipefail
cd "$(dirname "$0")/../.."
. scripts/gpu/cuda-env.sh
out=${OUT:-build-gpu/out}
mkdir -p "$out"
gpu_env_nccl "$out/env.txt"
B=build-gpu
[ "${SKIP_BUILD:-0}" = 1 ] || gpu_build "$out/build.log" bench_kv_cuda || exit 2
knobs=${KNOBS:-"-|NCCL_P2P_NVL_CHUNKSIZE=2097152|NCCL_P2P_NVL_CHUNKSIZE=131072|NCCL_MIN_P2P_NCHANNELS=32|NCCL_P2P_READ_ENABLE=0|NCCL_P2P_USE_CUDA_MEMCPY=1"}
IFS='|' read -r -a sets <<<"$knobs"
status=0
for s in "${sets[@]}"; do
  tag=${s//[^A-Za-z0-9_]/_}
  f=$out/bench_kv_cuda-$tag
  a=(); [ "$s" != - ] && read -r -a a <<<"$s"
  t0=$(date +%s)
  env "${a[@]}" timeout "${BENCH_TIMEOUT:-120}" "$B/bench_kv_cuda" --dir "$B" --media nccl --copies auto \
    --mode whole --tokens "${BENCH_TOKENS:-9360}" --warm 3 ${BENCH_ARGS:-} >"$f.txt" 2>"$f.err"
  rc=$?
  echo "[$s] exit $rc, $(( $(date +%s) - t0 )) s"
  [ "$rc" -ne 0 ] && status=1
  grep -E '^NCCL send|^  NCCL alone|^nccl ' "$f.txt" | grep -v '#' | sed 's/^/    /'
done
exit $status
