#!/usr/bin/env bash
# soak.sh: Poisson traffic with random client aborts against a disaggregated CPU
# deployment (`pdserve up --setup dis-cpu` by default), for SOAK_SECONDS (default 1200).
# Checks at the end: no error other than the aborts the client made itself, the
# instances' resident memory flat after warm-up (last sample within 5% of the sample
# taken once warm), every KV pool empty (/metrics), no shared-memory segment or store
# file left after the deployment stops. Prints a table; exit 0 when every check holds.
#   SOAK_SECONDS=60 SOAK_RATE=8 SOAK_SETUP=dis-disk scripts/soak.sh
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${PDSERVE_BIN:-build/pdserve}
SECS=${SOAK_SECONDS:-1200}
RATE=${SOAK_RATE:-6}
SETUP=${SOAK_SETUP:-dis-cpu}
TMP=$(mktemp -d)
UP=
cleanup() { [ -n "$UP" ] && kill "$UP" 2>/dev/null; wait 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT
"$BIN" make-model --out "$TMP/model" --preset tiny-llama 2>/dev/null || { echo "make-model failed"; exit 1; }
shm_before=$(ls /dev/shm | grep -c '^pdkv-' || true)
"$BIN" up --setup "$SETUP" --model "$TMP/model" --port 0 -- --threads 1 --max-num-seqs 32 \
  --kv-cache-memory 32MiB >"$TMP/up.log" 2>&1 &
UP=$!
url=
for _ in $(seq 1 300); do
  url=$(grep -o "ready: $SETUP on http://[0-9.:]*" "$TMP/up.log" | sed 's/.* on //')
  [ -n "$url" ] && break
  sleep 0.1
done
[ -n "$url" ] || { tail -20 "$TMP/up.log"; echo "soak: deployment did not come up"; exit 1; }
pids=$(pgrep -P "$UP" | tr '\n' ' ')
rss() { local t=0; for p in $pids; do t=$((t + $(awk '/VmRSS/{print $2}' /proc/$p/status 2>/dev/null || echo 0))); done; echo $t; }

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
used=$(curl -s "$url/metrics" | true)
blocks=0
for port in $(grep -o '\] pdserve serve: listening on http://127.0.0.1:[0-9]*' "$TMP/up.log" | grep -v router | sed 's/.*://'); do
  b=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^pdserve_kv_cache_blocks_used/{print $2}')
  blocks=$((blocks + ${b:-0}))
done
kill "$UP"; wait "$UP" 2>/dev/null; UP=
shm_after=$(ls /dev/shm | grep -c '^pdkv-' || true)
python3 - "$TMP/soak.json" "$blocks" "$shm_before" "$shm_after" "$SECS" "$RATE" "$SETUP" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); blocks, shb, sha = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rss = d["rss_kib"]; warm = rss[min(2, len(rss) - 1)][1]; last = rss[-1][1]
growth = (last - warm) / warm if warm else 0.0
checks = [("errors other than client aborts", d["errors"] == 0, f'{d["errors"]} {d["reasons"]}'),
          ("RSS after warm-up within 5%", abs(growth) <= 0.05, f"{warm} -> {last} KiB ({growth*100:+.1f}%)"),
          ("KV blocks in use at the end", blocks == 0, str(blocks)),
          ("shared-memory segments left", sha <= shb, f"{shb} before, {sha} after")]
print(f"soak: {sys.argv[7]}, {sys.argv[5]} s at {sys.argv[6]} req/s: {d['sent']} sent, {d['ok']} ok, "
      f"{d['aborted']} aborted by the client, {d['errors']} errors")
print("RSS samples (s, KiB):", " ".join(f"{t}:{r}" for t, r in rss))
ok = True
for name, good, val in checks:
    print(f"  {'ok  ' if good else 'FAIL'} {name}: {val}"); ok &= good
sys.exit(0 if ok else 1)
PY
