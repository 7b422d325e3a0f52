#!/usr/bin/env bash
# check-kv-bw.sh: the gpu and nccl KV mediums' bandwidth against their ceilings, with
# each of their switches on and off in the same run (issue #5: 80% of the ceiling), in
# one device call on a machine with two GPUs: builds with the gathered Debian prefix,
# runs test_kv_cuda (every medium, every byte compared) and test_kv_nccl under both
# nccl pipelines (stream, host), the stream one with every piece staged
# (PDSERVE_KV_NCCL_DIRECT=0) and on the non-blocking communicator, then bench_kv_cuda
# over gpu, then over nccl (each run with its own ceilings), whole then layerwise, with
# the prefill side's blocks in shuffled runs of 4 (the bench's default) and, for whole,
# in one run (--run 0: every nccl piece in place on both sides), one row per variant:
#   gpu   PDSERVE_KV_GPU_COPY=runs (one copy_runs per call) | items (one copy_batch of
#         every run x part: the medium before)
#   nccl  PDSERVE_KV_NCCL_PIPE=stream (device-ordered ring) | host (the halves the host
#         waits for); PDSERVE_KV_NCCL_DIRECT=1 (default: pieces whose blocks are one run
#         go in place) | 0 (every piece staged: the medium before); the communicator:
#         PDSERVE_KV_NCCL_BLOCKING=split (default) | 0 (non-blocking throughout)
#   and gpu's default once with PDSERVE_KV_TIMING=0: what the breakdown's clocks and
#   events cost (that row has no breakdown)
# and each warm request's breakdown (bench clocks, the medium's phases, the backend's
# copies by host clocks and CUDA events). Logs under $OUT (or build-gpu/out); the
# breakdowns, the tests, then the rows (medium GB/s, ceiling, ratio per variant) last.
#
# Usage (repository root, on the GPU machine; carry .deps/prefix):
#   scripts/gpu/check-kv-bw.sh
#   SKIP_BUILD=1 / SKIP_TEST=1 / SKIP_LAYERWISE=1   leave a part out
#   BUILD=DIR SKIP_BUILD=1                          an existing build elsewhere (a dry run)
#   BENCH_TOKENS=8192 BENCH_WARM=3                  the bench's request size and repeats
#   LAYERWISE_BY=380                                skip the layerwise part when the call
#                                                   has run longer (s): stays under 8 min
# Exit status: 0 when every test passed and every bench row ran, 77 without two GPUs,
# else 1 (2: build failed). Reads the GPU's state and never changes it; NCCL_* variables
# are left as they are.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out}
mkdir -p "$out"
. scripts/gpu/cuda-env.sh
gpu_env_nccl "$out/env.txt"
B=${BUILD:-build-gpu}
t_start=$(date +%s)
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  gpu_build "$out/build.log" test_kv_cuda test_kv_nccl bench_kv_cuda || exit 2
fi
export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/$B
status=0

if [ "${SKIP_TEST:-0}" != 1 ]; then
  t0=$(date +%s)
  timeout 180 "$B/test_kv_cuda" >"$out/test_kv_cuda.log" 2>&1
  rc=$?
  echo "test_kv_cuda: exit $rc, $(( $(date +%s) - t0 )) s"
  [ "$rc" -eq 77 ] && exit 77
  [ "$rc" -ne 0 ] && { status=1; grep -E 'FAIL|differs|error' "$out/test_kv_cuda.log" | head -n 20; }
  for pipe in stream host stream-staged stream-nonblocking; do
    t0=$(date +%s)
    blocking=split; [ "$pipe" = stream-nonblocking ] && blocking=0
    direct=1; [ "$pipe" = stream-staged ] && direct=0
    PDSERVE_KV_NCCL_PIPE=${pipe%-*} PDSERVE_KV_NCCL_BLOCKING=$blocking PDSERVE_KV_NCCL_DIRECT=$direct \
      timeout 200 "$B/test_kv_nccl" >"$out/test_kv_nccl-$pipe.log" 2>&1
    rc=$?
    echo "test_kv_nccl ($pipe pipeline): exit $rc, $(( $(date +%s) - t0 )) s"
    [ "$rc" -eq 77 ] && exit 77
    [ "$rc" -ne 0 ] && { status=1; grep -E 'FAIL|differs|error|D:|P:' "$out/test_kv_nccl-$pipe.log" | head -n 20; }
  done
fi

# one bench run: MODE MEDIA VARIANT... (rows against the ceilings of the same run);
# RUN=N: the prefill side's blocks in runs of N (the bench's --run; unset: its default)
bench() {
  local mode=$1 media=$2; shift 2
  local args=() tag=$media${RUN:+-run$RUN}
  local f=$out/bench_kv_cuda-bw-$mode-$tag
  for v in "$@"; do args+=(--variant "$v"); done
  [ -n "${RUN:-}" ] && args+=(--run "$RUN")
  local t0=$(date +%s)
  timeout "${BENCH_TIMEOUT:-200}" "$B/bench_kv_cuda" --dir "$B" --media "$media" --copies auto \
    --mode "$mode" --tokens "${BENCH_TOKENS:-8192}" --warm "${BENCH_WARM:-3}" "${args[@]}" \
    >"$f.txt" 2>"$f.err"
  local rc=$?
  echo "bench_kv_cuda $mode $tag: exit $rc, $(( $(date +%s) - t0 )) s"
  tail -n 3 "$f.err"
  { [ "$rc" -ne 0 ] || grep -q ' failed$' "$f.txt"; } && status=1
}
G=PDSERVE_KV_GPU_COPY N=PDSERVE_KV_NCCL_PIPE X=PDSERVE_KV_NCCL_DIRECT B0=PDSERVE_KV_NCCL_BLOCKING
bench whole gpu "$G=runs"
bench whole nccl "$N=stream" "$N=stream $X=0" "$N=host" "$N=stream $B0=0"
RUN=0 bench whole gpu "$G=runs"
RUN=0 bench whole nccl "$N=stream" "$N=stream $X=0" "$N=host"
if [ "${SKIP_LAYERWISE:-0}" != 1 ] && [ $(( $(date +%s) - t_start )) -gt "${LAYERWISE_BY:-380}" ]; then
  echo "layerwise bench skipped: $(( $(date +%s) - t_start )) s gone (LAYERWISE_BY=${LAYERWISE_BY:-380})"
elif [ "${SKIP_LAYERWISE:-0}" != 1 ]; then
  bench layerwise gpu "$G=runs"
  bench layerwise nccl "$N=stream" "$N=stream $X=0"
  RUN=0 bench layerwise nccl "$N=stream" "$N=stream $X=0"
fi

# the summary, longest first (a reader of the output's tail sees the table): each warm
# request's breakdown, the tests, then the rows and lab lines
# FN MODE MEDIA FILE for each bench output this run wrote, whole before layerwise
each_bench() {
  local mode media f
  for mode in whole layerwise; do
    for media in gpu nccl gpu-run0 nccl-run0; do
      f=$out/bench_kv_cuda-bw-$mode-$media.txt
      [ -f "$f" ] && "$1" "$mode" "$media" "$f"
    done
  done
}
breakdown() {
  echo
  echo "== breakdown ($1, $2): each warm request =="
  grep -E ' #[0-9]+ put ' "$3"
}
rows() {
  echo
  echo "== bench_kv_cuda ($1, $2) =="
  grep -E '^(GPU 0:|NCCL send|  NCCL alone|bench_kv_cuda:)' "$3"
  awk '/^medium copies/ && !done { on = 1 } on && /^where/ { on = 0; done = 1 } on' "$3"
  grep -E '^       \(' "$3"
}
each_bench breakdown
echo
echo "== tests =="
[ -f "$out/test_kv_cuda.log" ] && grep -E '^(ok  |FAIL)' "$out/test_kv_cuda.log"
for pipe in stream host stream-staged stream-nonblocking; do
  [ -f "$out/test_kv_nccl-$pipe.log" ] && { echo "-- test_kv_nccl, $pipe pipeline"; grep -E '^(ok  |FAIL)|^     nccl' "$out/test_kv_nccl-$pipe.log"; }
done
each_bench rows
echo
echo "check-kv-bw: $(( $(date +%s) - t_start )) s, status $status"
# every log and bench output in one archive beside env.txt (a device call brings back
# only a few files)
tgz=$(mktemp "${TMPDIR:-/tmp}/check-kv-bw.XXXXXX")
(cd "$out" && tar -czf "$tgz" --exclude=env.txt --exclude='*.tgz' . &&
  find . -maxdepth 1 -type f ! -name env.txt ! -name '*.tgz' -delete &&
  mv "$tgz" check-kv-bw.tgz)
exit "$status"
