#!/usr/bin/env bash
# test_study_sweep_e2e.sh: `pdserve sweep` end to end on the CPU: a tiny model
# (pdserve make-model --preset tiny-llama), a 2-point plan on setup co-1gpu (each point
# starts its own `pdserve serve` child on a free loopback port), then the database rows,
# resumption (a second run skips both points), a failed point for a setup that does not
# exist yet, and `pdserve report` on the result; the instance pinned through serve_args
# "cpu-list". Seconds, not minutes.
# Exit 77 only when `pdserve serve --help` fails (the server is not in this build).
set -uo pipefail
ROOT="${PDSERVE_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
BIN="${PDSERVE_BIN:-$ROOT/build/pdserve}"
[ -x "$BIN" ] || { echo "FAIL: no pdserve binary at $BIN"; exit 1; }
"$BIN" serve --help >/dev/null 2>&1 || { echo "SKIP: pdserve serve is not working in this build yet"; exit 77; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAIL: $*"; for f in "$TMP"/*.log "$TMP"/results.db.logs/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -20 "$f"; }; done; exit 1; }

"$BIN" make-model --out "$TMP/model" --preset tiny-llama >"$TMP/make-model.log" 2>&1 || fail "make-model"

# the instance pinned to the last CPU this test may use (serve_args "cpu-list": a lone
# instance gets `pdserve serve --cpus` with its first list)
CPU="$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status | tr ',' '\n' | tail -1 | sed 's/.*-//')"
cat >"$TMP/plan.json" <<JSON
{
  "name": "e2e",
  "setups": ["co-1gpu"],
  "serve_args": {"device": "cpu", "threads": 1, "max-model-len": 256, "kv-cache-memory": "16MiB",
                 "cpu-list": "$CPU"},
  "dataset": {"input_len": 24, "output_len": 6},
  "loads": {"batch_sizes": [1, 3]},
  "warmup_requests": 1,
  "idle_s": 0.2,
  "cooldown_s": 0.2,
  "start_timeout_s": 60,
  "request_timeout_s": 60
}
JSON

"$BIN" sweep "$TMP/plan.json" --db "$TMP/results.db" --model "$TMP/model" --dry-run >"$TMP/dry.txt" 2>"$TMP/dry.log" ||
  fail "sweep --dry-run"
grep -q "2 points: 0 done already, 2 to run" "$TMP/dry.txt" || { cat "$TMP/dry.txt"; fail "dry run listing"; }
[ ! -e "$TMP/results.db" ] || fail "--dry-run wrote a database"

"$BIN" sweep "$TMP/plan.json" --db "$TMP/results.db" --model "$TMP/model" 2>"$TMP/sweep1.log" || fail "first sweep"
cat "$TMP/sweep1.log"
grep -q "sweep \[2/2\] co-1gpu b3: ok" "$TMP/sweep1.log" || fail "no progress line for the second point"
grep -q "2 ok, 0 failed" "$TMP/sweep1.log" || fail "first sweep: not 2 ok"

# Each deployment's log is named by point, setup and load
for f in 000-co-1gpu-b1.log 001-co-1gpu-b3.log; do
  [ -s "$TMP/results.db.logs/$f" ] || { ls "$TMP/results.db.logs"; fail "no deployment log $f"; }
done

grep -q "serve: compute pinned to CPU $CPU " "$TMP/results.db.logs/000-co-1gpu-b1.log" ||
  fail "serve_args cpu-list $CPU: the instance did not say it was pinned to it"

# Resumption: both points are done.
"$BIN" sweep "$TMP/plan.json" --db "$TMP/results.db" --model "$TMP/model" 2>"$TMP/sweep2.log" || fail "second sweep"
grep -q "2 done already, 0 to run" "$TMP/sweep2.log" || { cat "$TMP/sweep2.log"; fail "second sweep did not skip done points"; }

# A setup this build cannot bring up (NCCL is not built on the CPU): recorded as failed
# with the reason; the sweep goes on.
sed 's/"setups": \["co-1gpu"\]/"setups": ["co-1gpu", "dis-nccl"]/' "$TMP/plan.json" >"$TMP/plan2.json"
"$BIN" sweep "$TMP/plan2.json" --db "$TMP/results.db" --model "$TMP/model" 2>"$TMP/sweep3.log" || fail "third sweep"
grep -q "0 ok, 2 failed, 0 skipped, 2 done before" "$TMP/sweep3.log" || { cat "$TMP/sweep3.log"; fail "third sweep"; }

"$BIN" report "$TMP/results.db" -o "$TMP/report" >"$TMP/table.txt" 2>"$TMP/report.log" || { cat "$TMP/report.log"; fail "report"; }
cat "$TMP/table.txt"
[ "$(sed '/^where the TTFT went/,$d' "$TMP/table.txt" | grep -c '^co-1gpu ')" = 2 ] ||
  fail "the table does not have the two co-1gpu points"
# every request of the sweep said where its TTFT went (requests.server_phases), and the
# report shows both points' phases
if command -v sqlite3 >/dev/null 2>&1; then
  n_ok="$(sqlite3 "$TMP/results.db" "SELECT count(*) FROM requests WHERE status = 'ok'")"
  n_ph="$(sqlite3 "$TMP/results.db" "SELECT count(*) FROM requests WHERE status = 'ok' AND server_phases LIKE '{\"parse\":%,\"queue\":%,\"prefill\":%}'")"
  [ "$n_ok" -gt 0 ] && [ "$n_ph" = "$n_ok" ] || fail "$n_ph of $n_ok requests with their TTFT phases"
fi
[ "$(sed -n '/^where the TTFT went/,$p' "$TMP/table.txt" | grep -c '^co-1gpu ')" = 2 ] ||
  fail "the report's TTFT phases do not list the two co-1gpu points"
[ -s "$TMP/report/index.html" ] || fail "no index.html"
grep -qi "nccl" "$TMP/report/index.html" || fail "the failed point's reason is not in the page"
[ "$(grep -c ',ok,' "$TMP/report/runs.csv")" = 2 ] || fail "runs.csv: want 2 ok runs"
[ "$(grep -c ',failed,' "$TMP/report/runs.csv")" = 2 ] || fail "runs.csv: want 2 failed runs"
[ "$(wc -l <"$TMP/report/summaries.csv")" = 3 ] || fail "summaries.csv: want a header and 2 rows"
# 1 + 3 requests with 6 output tokens each, their timestamps in order (the bench times
# text-bearing stream events, so a token that decodes to no text has no timestamp).
if command -v sqlite3 >/dev/null 2>&1; then
  N=$(sqlite3 "$TMP/results.db" "SELECT count(*) FROM requests WHERE status='ok' AND output_tokens=6 AND json_array_length(token_times_s) BETWEEN 1 AND 6 AND first_token_s >= sent_s AND finished_s >= first_token_s")
  [ "$N" = 4 ] || fail "requests table: $N complete requests, want 4"
fi
# A failed point tried again (as every sweep into the same database does): its new log
# goes beside the first, not over it.
"$BIN" sweep "$TMP/plan2.json" --db "$TMP/results.db" --model "$TMP/model" 2>"$TMP/sweep4.log" || fail "fourth sweep"
grep -q "0 ok, 2 failed, 0 skipped, 2 done before" "$TMP/sweep4.log" || { cat "$TMP/sweep4.log"; fail "fourth sweep"; }
for f in 002-dis-nccl-b1 003-dis-nccl-b3; do
  [ -s "$TMP/results.db.logs/$f.log" ] && [ -s "$TMP/results.db.logs/$f-2.log" ] ||
    { ls "$TMP/results.db.logs"; fail "the failed point's second log is not beside its first ($f)"; }
done

echo "ok: sweep, resume, failed point, report and the deployments' logs on co-1gpu"
