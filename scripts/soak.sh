#!/usr/bin/env bash
# soak.sh: Poisson traffic with random client aborts against a disaggregated CPU
# deployment (`pdserve up --setup dis-cpu` by default), for SOAK_SECONDS (default 1200).
# Checks at the end: no error other than the aborts the client made itself, the
# instances' resident memory after warm-up (below), every KV pool empty and no KV
# reservation held (/metrics, /load), no sanitizer report in the deployment's log, and no
# shared-memory segment or store file of the deployment left after it stops. Prints a
# table; exit 0 when every check holds.
#   SOAK_SECONDS=60 SOAK_RATE=8 SOAK_SETUP=dis-disk scripts/soak.sh
# RSS: by default the last sample must be within 5% of the one taken once warm (for
# long runs, where warm-up is a small part); SOAK_RSS_BOUND_KIB=N checks instead that it
# grew by at most N KiB (short runs on a shared machine: a generous bound that only a
# real leak passes), and SOAK_RSS_CHECK=report only prints it (sanitizer builds, whose
# quarantine holds freed memory).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${PDSERVE_BIN:-build/pdserve}
SECS=${SOAK_SECONDS:-1200}
RATE=${SOAK_RATE:-6}
SETUP=${SOAK_SETUP:-dis-cpu}
RSS_BOUND=${SOAK_RSS_BOUND_KIB:-}
RSS_CHECK=${SOAK_RSS_CHECK:-check}
TMP=$(mktemp -d)
UP=
cleanup() { [ -n "$UP" ] && kill "$UP" 2>/dev/null; wait 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT
"$BIN" make-model --out "$TMP/model" --preset tiny-llama 2>/dev/null || { echo "make-model failed"; exit 1; }
"$BIN" up --setup "$SETUP" --model "$TMP/model" --port 0 -- --threads 1 --max-num-seqs 32 \
  --kv-cache-memory 32MiB >"$TMP/up.log" 2>&1 &
UP=$!
tag="up$UP-"
url=
for _ in $(seq 1 1200); do
  url=$(grep -o "ready: $SETUP on http://[0-9.:]*" "$TMP/up.log" | sed 's/.* on //')
  [ -n "$url" ] && break
  kill -0 "$UP" 2>/dev/null || break
  sleep 0.1
done
[ -n "$url" ] || { tail -20 "$TMP/up.log"; echo "soak: deployment did not come up"; exit 1; }
pids=$(pgrep -P "$UP" | tr '\n' ' ')

python3 - "$url" "$SECS" "$RATE" "$TMP" "$pids" <<'PY'
import json, os, random, socket, sys, threading, time, urllib.parse
url, secs, rate, tmp, pids = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5].split()
u = urllib.parse.urlparse(url)
rnd = random.Random(7)
import urllib.request
model = json.load(urllib.request.urlopen(url + "/v1/models", timeout=30))["data"][0]["id"]
lock = threading.Lock()
stats = {"ok": 0, "aborted": 0, "errors": 0, "reasons": {}}
def rss():
    t = 0
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS"): t += int(line.split()[1])
        except OSError: pass
    return t
def one(i, abort_after):
    body = json.dumps({"model": model, "prompt": [1 + (i * 7 + k) % 400 for k in range(rnd.randint(8, 200))],
                       "max_tokens": rnd.randint(4, 64), "ignore_eos": True, "stream": True}).encode()
    try:
        s = socket.create_connection((u.hostname, u.port), timeout=60)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        buf, events = b"", 0
        while True:
            chunk = s.recv(65536)
            if not chunk: break
            buf += chunk
            events = buf.count(b"data: ")
            if abort_after is not None and events >= abort_after:
                s.close()
                with lock: stats["aborted"] += 1
                return
        s.close()
        head = buf.split(b"\r\n", 1)[0]
        if b" 200 " in head and b"data: [DONE]" in buf and b'"error"' not in buf:
            with lock: stats["ok"] += 1
        else:
            why = head.decode(errors="replace")[:60]
            if b'"error"' in buf: why += " " + buf[buf.find(b'"message"'):][:100].decode(errors="replace")
            with lock:
                stats["errors"] += 1
                stats["reasons"][why] = stats["reasons"].get(why, 0) + 1
    except Exception as e:
        with lock:
            stats["errors"] += 1
            stats["reasons"][repr(e)[:80]] = stats["reasons"].get(repr(e)[:80], 0) + 1
t0 = time.time(); i = 0; threads = []; samples = []
next_sample = t0
while time.time() - t0 < secs:
    if time.time() >= next_sample:
        samples.append((round(time.time() - t0, 1), rss())); next_sample += max(secs / 20, 1)
    abort_after = rnd.randint(1, 20) if rnd.random() < 0.2 else None
    th = threading.Thread(target=one, args=(i, abort_after), daemon=True); th.start(); threads.append(th)
    i += 1
    time.sleep(rnd.expovariate(rate))
    threads = [t for t in threads if t.is_alive()]
for th in threads: th.join(120)
time.sleep(1.0)
samples.append((round(time.time() - t0, 1), rss()))
json.dump({"sent": i, **stats, "rss_kib": samples}, open(f"{tmp}/soak.json", "w"))
PY
sleep 1
blocks=0; active=0; ninst=0
for port in $(sed -n 's|^\[[a-z]*[0-9]*\] pdserve serve: listening on http://127.0.0.1:\([0-9]*\) (model.*|\1|p' "$TMP/up.log"); do
  b=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^pdserve_kv_cache_blocks_used/{print $2}')
  a=$(curl -s "http://127.0.0.1:$port/load" | sed -n 's|.*"kv_active":\([0-9]*\).*|\1|p')
  blocks=$((blocks + ${b:-1})); active=$((active + ${a:-1})); ninst=$((ninst + 1))
done
shm_during=$(ls /dev/shm | grep -c "^pdkv-.*$tag" || true)
kill "$UP"; wait "$UP" 2>/dev/null; UP=
shm_after=$(ls /dev/shm | grep -c "^pdkv-.*$tag" || true)
store_after=$(ls -d "${TMPDIR:-/tmp}"/pdserve-kv-"$tag"* 2>/dev/null | wc -l)
sanitizer=$(grep -c -E "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$TMP/up.log" || true)
[ "$sanitizer" = 0 ] || grep -m 5 -A 12 -E "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$TMP/up.log"
python3 - "$TMP/soak.json" "$blocks" "$active" "$ninst" "$shm_during" "$shm_after" "$store_after" "$sanitizer" \
  "$SECS" "$RATE" "$SETUP" "$RSS_BOUND" "$RSS_CHECK" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
blocks, active, ninst, shd, sha, sta, san = (int(x) for x in sys.argv[2:9])
secs, rate, setup, bound, mode = sys.argv[9:14]
rss = d["rss_kib"]; warm = rss[min(2, len(rss) - 1)][1]; last = rss[-1][1]
growth = (last - warm) / warm if warm else 0.0
rss_txt = f"{warm} -> {last} KiB ({growth*100:+.1f}%, {last - warm:+d} KiB)"
if mode == "report":
    rss_check = ("RSS after warm-up (reported only)", True, rss_txt)
elif bound:
    rss_check = (f"RSS growth after warm-up within {int(bound)} KiB", last - warm <= int(bound), rss_txt)
else:
    rss_check = ("RSS after warm-up within 5%", abs(growth) <= 0.05, rss_txt)
checks = [("errors other than client aborts", d["errors"] == 0, f'{d["errors"]} {d["reasons"]}'),
          ("requests completed", d["ok"] > 0, str(d["ok"])),
          rss_check,
          (f"KV blocks in use at the end ({ninst} instances)", ninst > 0 and blocks == 0, str(blocks)),
          ("KV reservations held at the end", ninst > 0 and active == 0, str(active)),
          ("sanitizer reports in the deployment's log", san == 0, str(san)),
          ("shared-memory segments left", sha == 0, f"{shd} while up, {sha} after"),
          ("store directories left", sta == 0, str(sta))]
print(f"soak: {setup}, {secs} s at {rate} req/s: {d['sent']} sent, {d['ok']} ok, "
      f"{d['aborted']} aborted by the client, {d['errors']} errors")
print("RSS samples (s, KiB):", " ".join(f"{t}:{r}" for t, r in rss))
ok = True
for name, good, val in checks:
    print(f"  {'ok  ' if good else 'FAIL'} {name}: {val}"); ok &= good
sys.exit(0 if ok else 1)
PY
