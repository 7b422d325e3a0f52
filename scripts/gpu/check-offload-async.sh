#!/usr/bin/env bash
# check-offload-async.sh: `serve --kv-offload-async` on one GPU, in one device call
# (docs/reuse.md, "Offload overlapping the forward pass"):
#   1. builds pdserve and the tests below (CUDA on, the gathered Debian prefix);
#   2. correctness: test_kv_offload_async on the GPU (PDSERVE_TEST_DEVICE=cuda:0: the
#      engine on the CUDA backend's offload stream, decode graphs included; greedy
#      outputs identical without tiers, with synchronous and with async offload, and
#      every tier entry byte-identical to the synchronous run's) and on its CPU stand-in
#      (with the negative controls); test_prefix_cache and test_engine on the GPU (the
#      forward pass's per-layer wait is a no-op there); test_kv_tiers (CPU);
#   3. speed: plans/reuse-gpu-async.json through `pdserve sweep`: 8k-token prompts,
#      Llama-3.2-3B shape, 32 requests at 2/s, a 3 GB GPU cache, at 0% and 90% reuse:
#      the GPU tier alone (0% only), + cpu tier with the synchronous staging copy, + cpu
#      tier with --kv-offload-async, all in this call on this GPU;
#   4. a table last: TTFT p50 / p99, TPOT p50 per point, sync and async side by side,
#      and the tiers' counters (bursts, async bursts, seconds the engine spent staging,
#      the longest burst, seconds the writer thread waited for the copies).
# Takes about 7 minutes (build 2-3, tests 1, 5 sweep points of ~40 s: estimates).
#
# Usage (repository root, on the GPU machine; carry .deps/prefix and
# tests/.cache/tokenizers):
#   scripts/gpu/check-offload-async.sh
# Environment: SETUPS (sweep points, default gpu-r0,gpu-cpu-r0,gpu-cpu-async-r0,
# gpu-cpu-r90,gpu-cpu-async-r90; "all" for the plan's 6), SWEEP_TIMEOUT (s, 330),
# DEADLINE (s, 560: the sweep gets what is left of it, so that one device call of 10
# minutes holds the whole script; points not reached are missing from the table),
# SKIP_BUILD=1, SKIP_TESTS=1, SKIP_SWEEP=1, BUILD (build-gpu), PLAN, MODEL, TOK,
# PDSERVE_KV_OFFLOAD_CTAS (CTAs of each layer's copy kernel, default 32).
# Results under $OUT (or build-gpu/out-offload): env.txt, summary.txt, and
# check-offload-async.tgz (test logs, study.db and every deployment's log).
# Exit: 0 when every test passed and every sweep point completed its requests with the
# async points' bursts counted as async; 77 without a GPU; 2 build failed; 1 otherwise.
# Reads the GPU's state (nvidia-smi queries) and never changes it.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out-offload}
mkdir -p "$out"
rm -f "$out/check-offload-async.tgz"
B=${BUILD:-build-gpu}
PLAN=${PLAN:-plans/reuse-gpu-async.json}
MODEL=${MODEL:-preset:llama-3.2-3b}
TOK=${TOK:-tests/.cache/tokenizers/llama3}
SETUPS=${SETUPS:-gpu-r0,gpu-cpu-r0,gpu-cpu-async-r0,gpu-cpu-r90,gpu-cpu-async-r90}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
status=0
summary=()

. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build
gpu_header | tee "$out/env.txt"
echo "plan: $PLAN  model: $MODEL  points: $SETUPS  offload CTAs: ${PDSERVE_KV_OFFLOAD_CTAS:-32 (default)}" |
  tee -a "$out/env.txt"
command -v nvidia-smi >/dev/null 2>&1 || [ -n "${SKIP_TESTS:-}${SKIP_SWEEP:-}" ] ||
  { echo "check-offload-async: no GPU here"; exit 77; }

if [ -z "${SKIP_BUILD:-}" ]; then
  gpu_build "$out/build.log" pdserve test_kv_offload_async test_kv_tiers test_prefix_cache test_engine || exit 2
  echo "build: done at $(el) s"
fi
export PDSERVE_SOURCE=$PWD PDSERVE_BUILD=$PWD/$B PDSERVE_BIN=$PWD/$B/pdserve

# run NAME TIMEOUT CMD...: a test, logged to $out/NAME.log, its status in the summary
run() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-36s exit %3d  %4d s' "$name" "$rc" "$(( $(date +%s) - t ))")")
  [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && status=1
  grep -E '^(ok  |FAIL)|failed|differ|async|wrong' "$out/$name.log" | grep -v ' info ' | head -n 20
  return "$rc"
}

if [ -z "${SKIP_TESTS:-}" ]; then
  PDSERVE_TEST_DEVICE=cuda:0 run test_kv_offload_async_cuda 150 "$B/test_kv_offload_async"
  rc=$?
  [ "$rc" -eq 77 ] && { echo "test_kv_offload_async: no GPU (exit 77)"; exit 77; }
  if [ "$rc" -ne 0 ]; then # tell a PDL or graph interaction apart (diagnostic runs)
    PDSERVE_CUDA_PDL=0 PDSERVE_TEST_DEVICE=cuda:0 run test_kv_offload_async_cuda_nopdl 150 "$B/test_kv_offload_async"
    PDSERVE_CUDA_GRAPHS=0 PDSERVE_TEST_DEVICE=cuda:0 run test_kv_offload_async_cuda_nographs 150 "$B/test_kv_offload_async"
  fi
  run test_kv_offload_async_standin 60 "$B/test_kv_offload_async"
  PDSERVE_TEST_DEVICE=cuda:0 run test_prefix_cache_cuda 150 "$B/test_prefix_cache"
  PDSERVE_TEST_DEVICE=cuda:0 run test_engine_cuda 150 "$B/test_engine"
  run test_kv_tiers 120 "$B/test_kv_tiers"
  echo "tests: done at $(el) s"
fi

db="$out/study.db"
left=$(( ${DEADLINE:-560} - $(el) - 15 ))
sweep_limit=${SWEEP_TIMEOUT:-330}
[ "$left" -lt "$sweep_limit" ] && sweep_limit=$left
if [ -z "${SKIP_SWEEP:-}" ] && [ "$sweep_limit" -lt 60 ]; then
  echo "sweep: skipped, $left s left before the deadline"
  summary+=("sweep: skipped (deadline)")
  status=1
elif [ -z "${SKIP_SWEEP:-}" ]; then
  rm -rf "$db" "$db.logs"
  sel=()
  [ "$SETUPS" != all ] && sel=(--setups "$SETUPS")
  t=$(date +%s)
  timeout "$sweep_limit" "$B/pdserve" sweep "$PLAN" --db "$db" --model "$MODEL" --tokenizer "$TOK" "${sel[@]}" \
    >"$out/sweep.log" 2>&1
  rc=$?
  summary+=("$(printf '%-36s exit %3d  %4d s' sweep "$rc" "$(( $(date +%s) - t ))")")
  [ "$rc" -ne 0 ] && status=1
  tail -n 5 "$out/sweep.log"
  echo "sweep: exit $rc at $(el) s"
  # what the async instances logged at start-up (the copies overlap the pass, or why not)
  grep -h -E "kv tiers: .*staging copies|kv-offload-async|cuda kv offload" "$db.logs"/* 2>/dev/null | sed 's/^.*\(kv tiers\|cuda kv\)/\1/' |
    sort | uniq -c | head -n 8
fi

# ---- the table: one row per point, then sync against async at each reuse ratio --------
if [ -f "$db" ]; then
  python3 - "$db" >"$out/points.txt" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
def metric(run, name):
    r = db.execute("SELECT sum(value) FROM server_metrics WHERE run_id=? AND series LIKE ?",
                   (run, name + "%")).fetchone()
    return r[0] if r and r[0] is not None else 0.0
rows = db.execute("""SELECT r.run_id, r.label, s.completed, s.failed, s.ttft_median_ms, s.ttft_p99_ms,
                            s.tpot_median_ms, s.output_throughput
                     FROM runs r JOIN summaries s USING(run_id) ORDER BY r.run_id""").fetchall()
print("| point | ok / failed | cached % | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | out tok/s | bursts "
      "(async) | staging s | longest burst ms | writer waited s | blocks loaded |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
bad = []
by = {}
for run, label, ok, failed, t50, t99, tp50, thr in rows:
    label = label.split()[0]  # the setup's label; the load's ("r2") follows
    inp, cached = db.execute("SELECT sum(input_tokens), sum(cached_tokens) FROM requests WHERE run_id=? "
                             "AND status='ok'", (run,)).fetchone()
    cpct = 100.0 * (cached or 0) / inp if inp else 0.0
    m = lambda n: metric(run, "pdserve_kv_offload_" + n)
    bursts, abursts = m("bursts_total"), m("async_bursts_total")
    print(f"| {label} | {ok} / {failed} | {cpct:.1f} | {t50:.1f} | {t99:.1f} | {tp50:.2f} | {thr:.1f} | "
          f"{bursts:.0f} ({abursts:.0f}) | {m('staging_seconds_total'):.3f} | {1e3 * m('max_burst_seconds'):.2f} | "
          f"{m('async_wait_seconds_total'):.3f} | {m('loaded_blocks_total'):.0f} |")
    by[label] = t50
    if failed or not ok:
        bad.append(f"{label}: {failed} failed requests")
    if "-async-" in label and bursts > 0 and abursts == 0:
        bad.append(f"{label}: no burst was async (see the deployment log)")
    if "-async-" not in label and abursts > 0:
        bad.append(f"{label}: async bursts without the flag")
print()
for r in ("r0", "r90"):
    s, a, g = by.get(f"gpu-cpu-{r}"), by.get(f"gpu-cpu-async-{r}"), by.get(f"gpu-{r}")
    if s and a:
        line = f"reuse {r[1:]}%: TTFT p50 synchronous staging {s:.1f} ms, async {a:.1f} ms ({100 * (a - s) / s:+.1f}%)"
        if g:
            line += f"; GPU tier alone {g:.1f} ms (offload costs sync {100 * (s - g) / g:+.1f}%, async {100 * (a - g) / g:+.1f}%)"
        print(line)
for b in bad:
    print("FAIL " + b)
sys.exit(1 if bad else 0)
PY
  [ $? -ne 0 ] && status=1
fi

{
  echo
  echo "== check-offload-async ($(el) s) =="
  printf '%s\n' "${summary[@]}"
  [ -f "$out/points.txt" ] && { echo; cat "$out/points.txt"; }
} | tee "$out/summary.txt"
# everything else in one file (a call brings back at most 8 files)
tgz=$(mktemp "${TMPDIR:-/tmp}/check-offload-async.XXXXXX")
(cd "$out" && tar -czf "$tgz" --exclude=env.txt --exclude=summary.txt . &&
  find . -mindepth 1 -maxdepth 1 ! -name env.txt ! -name summary.txt -exec rm -rf {} + &&
  mv "$tgz" check-offload-async.tgz)
exit "$status"
