#!/usr/bin/env bash
# study.sh: the study on the GPU machine in one device call (two GPUs):
#   1. builds pdserve (CUDA on, the gathered Debian prefix);
#   2. `pdserve profile` of the plan's model on GPU 0 (step costs, power, KV mediums)
#      -> profile.json, the simulator's calibration;
#   3. `pdserve sweep PLAN` (default plans/paper-batch-quick.json) on GPUs 0 and 1 ->
#      study.db, then `pdserve report` -> report.tgz (HTML, SVG/PNG plots, CSV);
#   4. `pdserve sim` of the same plan with that profile into study.db (validation: the
#      same points simulated, side by side in the report) and of plans/paper-clocks.json
#      -> clocks.db, clocks-sim.json (the
#      clock experiment, mixed prefill/decode pairs included, in simulation only:
#      the lent machines' clocks are never changed).
# Read-only on the GPUs: no clock, power-limit or mode change, only NVML reads and
# nvidia-smi queries. Usage (repository root, on the GPU machine; carry .deps/prefix
# and tests/.cache/tokenizers):
#   scripts/gpu/study.sh                         PLAN=plans/paper-batch.json to change it
# Environment: PLAN, SETUPS (a comma-separated subset of the plan's setup labels),
# SKIP_PROFILE=1, SKIP_SWEEP=1, SKIP_SIM=1, SIM_COMPARE (sim options for a second
# simulation into study-cmp.db, e.g. --gpu-share-equal or "--store-overlap pipelined"; a blank " " for the whole plan
# on profile.json alone beside PROBE_MEDIUM's), PROBE_MEDIUM (disk: its setups' points
# one at a time, each after a probe of the medium, simulated with it), PROBE_TRAIN,
# SWEEP_TIMEOUT (s, 420), MEDIA (gpu,cpu,disk), MEDIUM_PEER_DEVICE (the gpu medium's decode
# side: 1 where there are two GPUs, else 0),
# SERVING_MAX_LEN (longest prompt of the profile's serving path, 4096),
# RESUME_DIR (a folder with a study.db and profile.json of an earlier call: the sweep
# resumes that database, points already done are skipped, and the profile is reused
# unless REPROFILE=1),
# LAYERWISE_TTFT=1 (first: one long prompt at a time, TTFT colocated against dis-gpu and
# dis-cpu layer-wise and whole, LW_MEDIA, LW_TTFT_TOKENS), LAYERWISE_CHECK=1 (first: dis-gpu on GPUs 0 and 1 with --kv-transfer-mode layerwise
# and whole, 8 requests of 4,096 tokens each through the router, greedy texts compared).
# Results under $OUT (or build-gpu/out-study): env.txt, log.txt, profile.json,
# clocks-sim.json, report.tgz, and results.tgz (study.db, clocks.db and every
# deployment's log under study.db.logs/).
# Exit: 0 done, 77 no GPU, 2 build failed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-gpu/out-study}
mkdir -p "$out"
jobs=$(nproc 2>/dev/null || echo 4)
PLAN=${PLAN:-plans/paper-batch-quick.json}
MODEL=${MODEL:-preset:llama-3.2-3b}
TOK=tests/.cache/tokenizers/llama3
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
log="$out/log.txt"
exec > >(tee -a "$log") 2>&1

. scripts/gpu/cuda-env.sh   # CUDA's root, gpu_header, gpu_build
{
  gpu_header clocks.max.sm,power.limit
  echo "plan: $PLAN  model: $MODEL"
  nvidia-smi topo -m 2>&1 | head -n 8
} | tee "$out/env.txt"
command -v nvidia-smi >/dev/null 2>&1 || { echo "study: no GPU here"; exit 77; }

gpu_build "$out/build.log" pdserve || exit 2
rm -f "$out/build.log" # $OUT brings back at most 8 files
echo "build: done at $(el) s"
BIN=build-gpu/pdserve

# layer-wise KV streaming on the GPUs: CUDA layer events, the transfer thread, IPC copies
layerwise_run() { # MODE -> greedy texts in $out/lw-MODE.txt
  local mode=$1 log="$out/lw-$1.log" port="" pids=() devs=()
  [ -n "${LW_DEVICES-0,1}" ] && devs=(--device-list "${LW_DEVICES-0,1}")
  "$BIN" up --setup dis-gpu --model "$MODEL" "${devs[@]}" --kv-transfer-mode "$mode" --port 0 -- \
    --tokenizer "$TOK" --max-model-len "${LW_MAXLEN:-8400}" >"$log" 2>&1 &
  local up=$!
  port=$(up_port "$log" $up)
  if [ -z "$port" ]; then echo "layerwise check ($mode): deployment not ready"; tail -20 "$log"; kill $up 2>/dev/null; return 1; fi
  for i in 1 2 3 4 5 6 7 8; do
    prompt=$(seq 1 $((i * ${LW_WORDS:-400})) | tr '\n' ' ')
    curl -s "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
      -d "{\"prompt\":\"$prompt\",\"max_tokens\":16,\"temperature\":0}" >"$out/lw-$mode-$i.json" &
    pids+=($!)
  done
  wait "${pids[@]}"
  : >"$out/lw-$mode.txt"
  for i in 1 2 3 4 5 6 7 8; do
    { sed -n 's|.*"text":"\([^"]*\)".*|\1|p' "$out/lw-$mode-$i.json"; echo; } >>"$out/lw-$mode.txt"
  done
  kill -TERM $up; wait $up
  local rc=$?
  echo "layerwise check ($mode): $(grep -c '"finish_reason":"length"' "$out"/lw-$mode-*.json | grep -c ':1$') of 8 answered; up exit $rc"
}
# TTFT of one long prompt at a time (LW_TTFT_TOKENS, default 8000; median of 5 after a
# warm-up, 2 output tokens so that the KV moves): colocated (the prefill alone) against
# disaggregated over MEDIUM layer-wise and whole. The share of the transfer that
# layer-wise streaming hides is (whole - layerwise) / (whole - colocated); the issue's
# target is TTFT(layerwise) <= 1.1 x TTFT(colocated) on the gpu medium.
lw_ttft() { # SETUP MODE MEDIUM -> prints "ttft SETUP MODE MEDIUM <median ms>"
  local setup=$1 mode=$2 medium=$3 log="$out/lw-ttft-$1-$2-$3.log" port="" list=${LW_DEVICES-0,1} devs=()
  [ "$setup" = co-1gpu ] && list=${list%%,*}
  [ -n "$list" ] && devs=(--device-list "$list")
  local extra=()
  [ "$setup" != co-1gpu ] && extra=(--kv-transfer-mode "$mode")
  "$BIN" up --setup "$setup" --model "$MODEL" "${devs[@]}" "${extra[@]}" --port 0 -- \
    --tokenizer "$TOK" --max-model-len "${LW_MAXLEN:-8400}" >"$log" 2>&1 &
  local up=$!
  port=$(up_port "$log" $up)
  if [ -z "$port" ]; then echo "ttft $setup $mode $medium: deployment not ready"; kill $up 2>/dev/null; return 1; fi
  "$BIN" bench --base-url "http://127.0.0.1:$port" --tokenizer "$TOK" --dataset-name random \
    --random-input-len "${LW_TTFT_TOKENS:-8000}" --random-output-len 2 --ignore-eos --num-prompts 5 \
    --num-warmups 1 --max-concurrency 1 --disable-tqdm --save-result --result-dir "$out" \
    --result-filename "lw-ttft-$setup-$mode-$medium.json" >>"$log" 2>&1
  kill -TERM $up; wait $up
  local ms
  ms=$(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['median_ttft_ms'],1))" \
       "$out/lw-ttft-$setup-$mode-$medium.json" 2>/dev/null || echo "?")
  echo "ttft $setup $mode $medium $ms"
}
if [ -n "${LAYERWISE_TTFT:-}" ]; then
  {
    lw_ttft co-1gpu none none
    for med in ${LW_MEDIA:-gpu cpu}; do
      lw_ttft "dis-$med" layerwise "$med"; lw_ttft "dis-$med" whole "$med"
    done
  } | tee "$out/lw-ttft.txt"
  python3 - "$out/lw-ttft.txt" <<'PY'
import sys
t = {}
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) == 5 and f[0] == "ttft" and f[4] != "?":
        t[(f[1], f[2])] = float(f[4])
co = t.get(("co-1gpu", "none"))
for (setup, mode), v in sorted(t.items()):
    if setup == "co-1gpu" or mode != "layerwise" or co is None:
        continue
    w = t.get((setup, "whole"))
    hidden = (w - v) / (w - co) if w and w > co else float("nan")
    print(f"layerwise {setup}: TTFT {v:.1f} ms = {v / co:.3f} x colocated {co:.1f} ms (target <= 1.1);"
          f" whole {w:.1f} ms; transfer hidden {100 * hidden:.0f}% (target >= 70%)")
PY
  echo "layerwise ttft: done at $(el) s"
fi
if [ -n "${LAYERWISE_CHECK:-}" ]; then
  layerwise_run layerwise; layerwise_run whole
  if [ -s "$out/lw-layerwise.txt" ] && cmp -s "$out/lw-layerwise.txt" "$out/lw-whole.txt"; then
    echo "layerwise check: greedy texts identical to whole transfers"
  else
    echo "layerwise check: DIFFERENT texts (or none)"; head -3 "$out/lw-layerwise.txt" "$out/lw-whole.txt"
  fi
  grep -h -i -E "error|fail|abort" "$out"/lw-*.log | head -5
  (cd "$out" && tar -czf layerwise.tgz lw-* && rm -f lw-*)
  echo "layerwise check: done at $(el) s"
fi
ls "$out"/lw-* >/dev/null 2>&1 && (cd "$out" && tar -czf layerwise-ttft.tgz lw-* && rm -f lw-*)

if [ -n "${RESUME_DIR:-}" ]; then
  [ -f "$RESUME_DIR/results.tgz" ] && tar -C "$out" -xzf "$RESUME_DIR/results.tgz"
  for f in study.db profile.json; do [ -f "$RESUME_DIR/$f" ] && cp "$RESUME_DIR/$f" "$out/$f"; done
  [ -f "$out/profile.json" ] && [ -z "${REPROFILE:-}" ] && SKIP_PROFILE=1
  echo "resumed from $RESUME_DIR: $(ls "$RESUME_DIR" | tr '\n' ' ')"
fi
df -h /dev/shm . 2>&1 | sed 's/^/df: /'

if [ -z "${SKIP_PROFILE:-}" ]; then
  # The grid spans the plan's shapes: 16k prompts in chunks, batch up to 64, contexts
  # up to 16.6k; KV mediums timed against size. Chunks of 64 and 512 rows too: a prefix
  # cache hit leaves a short chunk after a long cached prefix (the reuse plans'
  # Mooncake-style points), which 256 and 1,024 alone priced at half the deployment's
  # time (docs/simulator.md, "What is left").
  # --serving: the serving path through the real server, router and a cpu-medium
  # connector in the profiling process (the plan's tokenizer); mixed steps at serving
  # shapes are always timed now (docs/simulator.md, "The serving path", "Mixed steps");
  # --tiers: the lower KV tiers' staging, writes and loads ("Lower KV tiers").
  # the gpu medium's decode side on GPU 1 where there is one (the link between them, as
  # dis-gpu's device-list 0,1), else within GPU 0 (MEDIUM_PEER_DEVICE to choose)
  peer_dev=${MEDIUM_PEER_DEVICE:-$([ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ] && echo 1 || echo 0)}
  timeout 300 "$BIN" profile --model "$MODEL" --device 0 -o "$out/profile.json" --repeats 3 \
    --medium-peer-device "$peer_dev" \
    --prefill-tokens 64,256,512,1024,2048,4096,8192 --prefill-context 0,4096,8192,12288 \
    --decode-batch 1,2,4,8,16,32,64 --decode-context 1024,4096,8192,16640 \
    --medium "${MEDIA:-gpu,cpu,disk}" --tiers cpu,disk --serving --tokenizer "$TOK" \
    --serving-max-len "${SERVING_MAX_LEN:-4096}"
  echo "profile: exit $? at $(el) s"
fi

# PROBE_MEDIUM (e.g. disk): the setups over that medium (dis-MEDIUM) run one point at
# a time, each after a probe of the medium (`pdserve profile --mediums-into`: the
# profile with that medium timed again, PROBE_TRAIN s of sustained train, default 6),
# and each is simulated with its own probe: a medium that drifts between minutes is
# priced as it ran around the point. The other setups run and simulate as usual.
main_plan=$PLAN
probe_points=""
n_setups() { python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['setups']))" "$1"; }
if [ -n "${PROBE_MEDIUM:-}" ] && [ -z "${SKIP_SWEEP:-}" ]; then
  mkdir -p "$out/probe"
  probe_points=$(python3 - "$PLAN" "$PROBE_MEDIUM" "${SETUPS:-}" "$out/probe" <<'PY'
import json, sys
plan, med, only, d = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4]
name = lambda s: s if isinstance(s, str) else s["name"]
chosen = [s for s in plan["setups"] if not only or name(s) in only.split(",")]
probed = [s for s in chosen if name(s) == "dis-" + med]
json.dump(dict(plan, setups=[s for s in chosen if s not in probed]), open(d + "/main-plan.json", "w"), indent=1)
groups = plan.get("loads", {})
for s in probed:
    for g in groups if isinstance(groups, list) else [groups]:
        key = next((k for k, v in g.items() if isinstance(v, list)), None)
        for v in g[key] if key else [None]:
            one = dict(plan, setups=[s], loads=[dict(g, **({key: [v]} if key else {}))])
            pt = f"{name(s)}-{key}-{v}"
            json.dump(one, open(f"{d}/{pt}.json", "w"), indent=1)
            print(pt)
PY
)
  main_plan=$out/probe/main-plan.json
  echo "probe $PROBE_MEDIUM: points $(echo $probe_points | tr '\n' ' ')"
fi

if [ -z "${SKIP_SWEEP:-}" ]; then
  [ -z "${RESUME_DIR:-}" ] && rm -f "$out/study.db"
  sel=()
  [ -n "${SETUPS:-}" ] && [ -z "$probe_points" ] && sel=(--setups "$SETUPS")
  if [ "$(n_setups "$main_plan")" != 0 ]; then
    timeout "${SWEEP_TIMEOUT:-420}" "$BIN" sweep "$main_plan" --db "$out/study.db" --model "$MODEL" --tokenizer "$TOK" "${sel[@]}"
    echo "sweep: exit $? at $(el) s"
  fi
  for pt in $probe_points; do
    timeout 300 "$BIN" profile --model "$MODEL" --device 0 --medium "$PROBE_MEDIUM" --medium-train "${PROBE_TRAIN:-6}" \
      --mediums-into "$out/profile.json" -o "$out/probe/$pt-profile.json" 2>&1 | grep -E "medium $PROBE_MEDIUM|mediums:|error"
    timeout "${SWEEP_TIMEOUT:-420}" "$BIN" sweep "$out/probe/$pt.json" --db "$out/study.db" --model "$MODEL" --tokenizer "$TOK"
    echo "probe and sweep $pt: exit $? at $(el) s"
  done
fi

if [ -z "${SKIP_SIM:-}" ] && [ -f "$out/profile.json" ]; then
  # SIM_COMPARE (sim options): the same points also simulated with them into a copy of
  # the sweep's database, study-cmp.db, whose table follows the main one's
  [ -n "${SIM_COMPARE:-}" ] && [ -f "$out/study.db" ] && cp "$out/study.db" "$out/study-cmp.db" &&
    timeout 120 "$BIN" sim "$PLAN" --profile "$out/profile.json" --db "$out/study-cmp.db" --tokenizer "$TOK" --quiet $SIM_COMPARE &&
    echo "sim $PLAN $SIM_COMPARE: into study-cmp.db at $(el) s"
  # the same points simulated into the same database: report puts them side by side
  # (the probed points each with its own probe's profile)
  if [ "$(n_setups "$main_plan")" != 0 ]; then
    timeout 120 "$BIN" sim "$main_plan" --profile "$out/profile.json" --db "$out/study.db" --tokenizer "$TOK" --quiet
    echo "sim $main_plan: exit $? at $(el) s"
  fi
  for pt in $probe_points; do
    [ -f "$out/probe/$pt-profile.json" ] &&
      timeout 60 "$BIN" sim "$out/probe/$pt.json" --profile "$out/probe/$pt-profile.json" --db "$out/study.db" \
        --tokenizer "$TOK" --quiet
    echo "sim $pt with its probe: exit $? at $(el) s"
  done
  rm -f "$out/clocks.db"
  timeout 120 "$BIN" sim plans/paper-clocks.json --profile "$out/profile.json" --db "$out/clocks.db" \
    --json "$out/clocks-sim.json" --quiet
  echo "sim paper-clocks: exit $? at $(el) s"
fi

rm -rf build-gpu/report build-gpu/report-clocks
# the "simulated against measured" table into the log (its last line: N of M within 10%),
# and a disk store's ops, real beside simulated, where the plan has them
[ -f "$out/study.db" ] && "$BIN" report "$out/study.db" -o build-gpu/report 2>&1 |
  sed -n -e '/simulated against measured/,/compared figures within/p' -e '/^KV store ops/,/ran)$/p'
[ -f "$out/clocks.db" ] && "$BIN" report "$out/clocks.db" -o build-gpu/report-clocks >/dev/null 2>&1
[ -f "$out/study-cmp.db" ] && echo "with $SIM_COMPARE:" && "$BIN" report "$out/study-cmp.db" -o build-gpu/report-cmp \
  --no-plots 2>&1 | sed -n '/simulated against measured/,/compared figures within/p'
rm -rf build-gpu/report-cmp
tar -C build-gpu -czf "$out/report.tgz" $(cd build-gpu && ls -d report report-clocks 2>/dev/null)
echo "report: done at $(el) s"
# the databases and every deployment's log in one file (the device tool returns 8 files)
(cd "$out" && tar -czf results.tgz $(ls -d study.db* study-cmp.db* clocks.db* probe 2>/dev/null) && rm -rf study.db* study-cmp.db* clocks.db* probe)
echo "study: finished at $(el) s"
