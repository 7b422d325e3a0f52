#!/usr/bin/env bash
# one GPU: the disk and cpu mediums' put/get split (pdserve profile, a token grid), then
# dis-disk of paper-batch-quick with both instances on GPU 0, warm-ups of their own
set -uo pipefail
out=${OUT:-build-gpu/out}; mkdir -p "$out"
. scripts/gpu/cuda-env.sh
gpu_header > "$out/env.txt"
gpu_build "$out/build.log" pdserve || exit 2
B=build-gpu/pdserve
timeout 200 $B profile --model preset:llama-3.2-3b --device 0 -o "$out/prof-media.json" --repeats 2 \
  --prefill-tokens 256 --prefill-context 0 --decode-batch 1 --decode-context 1024 --medium cpu,disk \
  --no-power-cap > "$out/profile.log" 2>&1
echo "profile exit $?"; grep -E "medium (cpu|disk)" "$out/profile.log" | sed 's/.*profile: //'
timeout 300 $B sweep build-gpu/resume/disk1.json --db "$out/d.db" --model preset:llama-3.2-3b \
  --tokenizer tests/.cache/tokenizers/llama3 > "$out/sweep.log" 2>&1
echo "sweep exit $?"
python3 - "$out/d.db" <<'PY'
import sqlite3, json, sys
db = sqlite3.connect(sys.argv[1])
for rid, label in db.execute("select run_id, label from runs"):
    print("==", label)
    for idx, ft, ph in db.execute("select idx, first_token_s, server_phases from requests where run_id=? order by first_token_s", (rid,)):
        if not ph: print(idx, "failed"); continue
        p = json.loads(ph)
        pe = p['reserve'] + p.get('prefill_hop', 0) + p['queue'] + p['prefill']
        print("%2d ft %6.3f prefill_end %6.3f kv_queue %6.3f kv %6.3f decode_wait %6.3f" % (
            idx, ft, pe, p.get('kv_queue', -1), p['kv'], p['decode_wait']))
PY
tar -C "$out" -czf "$out/d.tgz" d.db d.db.logs 2>/dev/null; rm -rf "$out/d.db.logs" "$out/d.db"
