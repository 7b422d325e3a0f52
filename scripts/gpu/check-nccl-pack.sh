#!/usr/bin/env bash
# check-nccl-pack.sh: the nccl KV medium with pieces packed across k and v
# (PDSERVE_KV_NCCL_PACK=1: k and v of a layer as one NCCL operation of up to 64 MiB)
# against pieces of k or of v (PACK=0), in one device call on a machine with two GPUs:
#   1. test_kv_nccl under the stream and the host pipeline (every byte compared; its
#      cases set PACK themselves, packed ones included);
#   2. bench_kv_cuda --media nccl, whole, at 9,360 tokens of Llama-3.2-3B (1 GiB) and
#      16,384 tokens (1.75 GiB), the prefill side's blocks in shuffled runs of 4 (the
#      bench's default) and in one run (--run 0), one row per variant (PACK=0, PACK=1,
#      PACK=1 with a ring of 8), each against NCCL's own 1 GiB send/recv of the same run;
#      then layerwise at 1 GiB;
#   3. scripts/gpu/check-kv-nccl.sh's end-to-end part with PACK=1: `pdserve up --setup
#      dis-nccl`, layerwise and whole, greedy completions equal to co-1gpu's.
# Usage (repository root; carry .deps/prefix): scripts/gpu/check-nccl-pack.sh
#   SKIP_TEST=1 / SKIP_E2E=1                  leave a part out
#   BENCHES="whole:9360:runs4 whole:9360:run0"  the bench runs (MODE:TOKENS:runs4|run0;
#                                             default: the five above)
#   PIPES=stream (default "stream host")   the pipelines test_kv_nccl runs under
#   DEPTH8=0                                  no PACK=1 row with a ring of 8
#   VARIANTS="PDSERVE_KV_NCCL_LANES=1;PDSERVE_KV_NCCL_LANES=2"  the bench's rows instead
#                                             (';'-separated, each "NAME=VALUE ...")
#   E2E_ENV="PDSERVE_KV_NCCL_LANES=2"         the end-to-end part's setting instead of PACK=1
#   BENCH_ARGS="--busy-ms 0"                  more arguments for every bench run
# Logs under $OUT (or build-gpu/out); the rows last. Reads the GPU's state and never
# changes it; NCCL_* variables are left as they are.
set -uo pipefail
cd "$(dirname "$0")/../.."
. scripts/gpu/cuda-env.sh
out=${OUT:-build-gpu/out}
mkdir -p "$out"
gpu_env_nccl "$out/env.txt"
B=build-gpu
[ "${SKIP_BUILD:-0}" = 1 ] || gpu_build "$out/build.log" pdserve test_kv_nccl test_kv_nccl_open bench_kv_cuda || exit 2
export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/$B
status=0
t_start=$(date +%s)
if [ "${SKIP_TEST:-0}" != 1 ]; then
  for pipe in ${PIPES:-stream host}; do
    t0=$(date +%s)
    PDSERVE_KV_NCCL_PIPE=$pipe timeout 240 "$B/test_kv_nccl" >"$out/test_kv_nccl-$pipe.log" 2>&1
    rc=$?
    echo "test_kv_nccl ($pipe pipeline): exit $rc, $(( $(date +%s) - t0 )) s"
    grep -E '^(ok  |FAIL)|^     nccl|failed|differs' "$out/test_kv_nccl-$pipe.log" | head -n 40
    [ "$rc" -eq 77 ] && exit 77
    [ "$rc" -ne 0 ] && status=1
  done
fi
P=PDSERVE_KV_NCCL_PACK
bench() { # MODE TOKENS TAG [bench args...]
  local mode=$1 tokens=$2 tag=$3; shift 3
  local f=$out/bench-$mode-$tokens-$tag t0 v=(--variant "$P=0" --variant "$P=1") x
  [ "${DEPTH8:-1}" = 1 ] && v+=(--variant "$P=1 PDSERVE_KV_NCCL_DEPTH=8")
  if [ -n "${VARIANTS:-}" ]; then
    v=()
    IFS=';' read -ra xs <<<"$VARIANTS"
    for x in "${xs[@]}"; do v+=(--variant "$x"); done
  fi
  t0=$(date +%s)
  timeout "${BENCH_TIMEOUT:-150}" "$B/bench_kv_cuda" --dir "$B" --media nccl --copies auto --mode "$mode" \
    --tokens "$tokens" --warm 5 "${v[@]}" ${BENCH_ARGS:-} "$@" >"$f.txt" 2>"$f.err"
  local rc=$?
  echo "bench $mode $tokens $tag: exit $rc, $(( $(date +%s) - t0 )) s"
  [ "$rc" -ne 0 ] && { status=1; tail -n 3 "$f.err"; }
}
for b in ${BENCHES:-whole:9360:runs4 whole:9360:run0 whole:16384:runs4 whole:16384:run0 layerwise:9360:runs4}; do
  IFS=: read -r mode tokens tag <<<"$b"
  if [ "$tag" = run0 ]; then bench "$mode" "$tokens" "$tag" --run 0; else bench "$mode" "$tokens" "$tag"; fi
done
if [ "${SKIP_E2E:-0}" != 1 ]; then
  mkdir -p "$out/e2e"
  e2e_env=${E2E_ENV:-PDSERVE_KV_NCCL_PACK=1}
  env $e2e_env OUT=$out/e2e SKIP_BUILD=1 SKIP_TEST=1 SKIP_BENCH=1 timeout 300 \
    scripts/gpu/check-kv-nccl.sh >"$out/e2e.log" 2>&1
  rc=$?
  echo "check-kv-nccl.sh e2e with $e2e_env: exit $rc"
  tail -n 12 "$out/e2e.log"
  [ "$rc" -ne 0 ] && status=1
fi
for f in "$out"/bench-*.txt; do
  echo
  echo "== $(basename "$f" .txt)"
  grep -E '^bench_kv_cuda:|^NCCL send|^  NCCL alone|^  the same on two lanes|^  right after' "$f"
  awk '/^medium copies/ && !done { on = 1 } on && /^where/ { on = 0; done = 1 } on' "$f"
done
echo "check-nccl-pack: $(( $(date +%s) - t_start )) s, status $status"
(cd "$out" && tar -czf pack.tgz --exclude=env.txt --exclude='*.tgz' . 2>/dev/null)
exit $status
