#!/usr/bin/env bash
# sim-store-overlap.sh: the committed GPU sweeps' dis-disk points re-simulated under each
# model of a put and a get in one store (`pdserve sim --store-overlap`): rounds (the
# default: the factors the profiler's one-overlap rounds measured), pipelined (its
# train's), and fair (each at half its speed alone, whatever was measured); also
# "symmetric" (the get slowed as much as the put was, a profile edited here), to bracket.
# Each sweep on its own profile, as committed under docs/results; nothing runs on a GPU.
# Prints each variant's figures per sweep, then per variant: figures within 10% (TTFT
# p50, TPOT p50, output throughput, J/token) and the mean and median error of each.
# Usage (repository root, after a build): scripts/sim-store-overlap.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${PDSERVE_BIN:-build/pdserve}
TOK=tests/.cache/tokenizers/llama3
R=docs/results
W=${1:-$(mktemp -d)}
mkdir -p "$W"
[ -x "$BIN" ] || { echo "sim-store-overlap: no $BIN (build first)"; exit 1; }
tok=()
[ -f "$TOK/tokenizer.json" ] && tok=(--tokenizer "$TOK")
cases=$(grep -v '^#' scripts/dis-disk-sweeps.txt)
: >"$W/rows.txt"
for c in $cases; do
  IFS=: read -r d prof db plan <<<"$c"
  n=$(echo "$d" | tr '/' '_')
  gunzip -c "$R/$d/$db" >"$W/$n.db"
  sqlite3 "$W/$n.db" "PRAGMA foreign_keys=ON; DELETE FROM runs WHERE simulated = 1;"
  for v in rounds pipelined fair symmetric; do
    cp "$W/$n.db" "$W/$n-$v.db"
    p=$R/$d/$prof
    opt=(--store-overlap "$v")
    if [ "$v" = symmetric ]; then
      python3 - "$p" "$W/$n-sym.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
for m in p["mediums"]:
    if m["name"] == "disk" and m.get("put_overlap"):
        m["get_overlap"] = m["put_overlap"]
json.dump(p, open(sys.argv[2], "w"))
PY
      p=$W/$n-sym.json
      opt=()
    fi
    "$BIN" sim "plans/$plan.json" --profile "$p" --db "$W/$n-$v.db" --quiet --setups dis-disk "${tok[@]}" \
      "${opt[@]}" >/dev/null 2>&1 || echo "sim-store-overlap: $n $v: the simulation failed"
    "$BIN" report "$W/$n-$v.db" -o "$W/rep-$n-$v" --no-plots 2>/dev/null |
      sed -n '/simulated against measured/,/compared figures within/p' | grep '^dis-disk' |
      sed "s|^|$n $v |" >>"$W/rows.txt"
  done
done
python3 - "$W/rows.txt" <<'PY'
import re, sys, statistics, collections
rows = [l.split(None, 2) for l in open(sys.argv[1]) if l.strip()]
names = ["TTFT", "TPOT", "throughput", "J/token"]
err = collections.defaultdict(lambda: collections.defaultdict(list))
per = collections.defaultdict(lambda: collections.defaultdict(int))
for case, var, rest in rows:
    b = rest.split()[1]
    for k, x in enumerate(int(v) for v in re.findall(r"([+-]\d+)%", rest)):
        err[var][(names[k], b)].append(x)
        per[case][var] += abs(x) <= 10
variants = ["rounds", "pipelined", "fair", "symmetric"]
print("figures within 10% per sweep (8 each: 4 figures x batch 4 and 16)")
print("%-44s %s" % ("sweep", " ".join("%9s" % v for v in variants)))
for case in per:
    print("%-44s %s" % (case, " ".join("%9d" % per[case][v] for v in variants)))
print("%-44s %s" % ("all", " ".join("%9d" % sum(per[c][v] for c in per) for v in variants)))
print("\nerror of the simulated figure, %: mean / median of |error| over the sweeps")
print("%-18s %s" % ("figure", " ".join("%15s" % v for v in variants)))
for key in sorted(err["rounds"], key=lambda k: (names.index(k[0]), int(k[1][1:]))):
    print("%-18s %s" % ("%s %s" % key, " ".join("%+6.1f / %5.1f" % (statistics.mean(err[v][key]),
          statistics.median(abs(x) for x in err[v][key])) for v in variants)))
PY
