#!/usr/bin/env bash
# test_slow_clients.sh: clients that read slowly or not at all, and thousands of idle
# connections, against `pdserve serve` (tiny model, loopback only, each case < 60 s).
# The policy under test (docs/guarantees.md):
#   - a streaming client that leaves --max-stream-backlog tokens unread has its request
#     aborted (KV blocks back at once, an error event at the end of what it reads);
#   - a connection with no byte read or written for --http-timeout seconds is closed;
#   - the server raises its open-file limit to the hard limit and accepts up to that many
#     connections, so idle ones do not lock real clients out.
# Cases:
#   1. 8 clients reading one byte a second from long streams: the engine keeps stepping
#      (a closed-loop bench runs at its normal speed beside them), their requests are
#      aborted, /metrics shows 0 KV blocks, the server's RSS stays bounded, and the
#      connections are closed by the timeout while the clients still hold them;
#   2. 10,000 idle TCP connections (half of them with a half-sent request): a real
#      completion is answered promptly; afterwards the server is unharmed;
#   3. bodies over --max-body-bytes that announce no length (chunked) or wait for
#      "Expect: 100-continue": 413, the latter before a byte of the body is sent.
# Needs python3 (raw sockets). Exit 77 (skipped) without it.
set -uo pipefail
ROOT="${PDSERVE_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
BIN="${PDSERVE_BIN:-$ROOT/build/pdserve}"
[ -x "$BIN" ] || { echo "FAIL: no pdserve binary at $BIN"; exit 1; }
command -v python3 >/dev/null || { echo "SKIP: python3 is needed"; exit 77; }
command -v curl >/dev/null || { echo "SKIP: curl is needed"; exit 77; }

BACKLOG=256
# RSS bounds (KiB of growth): ASan keeps freed memory in quarantine (256 MiB) and shadow
RSS_SLOW=65536 RSS_IDLE=524288
if grep -qa "__asan_init" "$BIN"; then RSS_SLOW=$((RSS_SLOW + 393216)) RSS_IDLE=$((RSS_IDLE + 524288)); fi
TIMEOUT_S=4
IDLE=10000
TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; for l in "$TMP"/serve*.log; do [ -f "$l" ] && tail -15 "$l"; done; exit 1; }

"$BIN" make-model --out "$TMP/model" --preset tiny-llama >"$TMP/make-model.log" 2>&1 ||
  { cat "$TMP/make-model.log"; fail "pdserve make-model failed"; }
VOCAB="$(sed -n 's/.*"vocab_size": *\([0-9]*\).*/\1/p' "$TMP/model/config.json" | head -1)"

# start_server NAME ARGS...: sets PORT, SPID, URL
start_server() {
  local name="$1"; shift
  "$BIN" serve --model "$TMP/model" --host 127.0.0.1 --port 0 --threads 1 --max-model-len 2048 \
    "$@" 2>"$TMP/serve-$name.log" &
  SPID=$!
  PIDS+=("$SPID")
  PORT=""
  for _ in $(seq 300); do
    PORT="$(sed -n 's|.*listening on http://127.0.0.1:\([0-9]*\).*|\1|p' "$TMP/serve-$name.log" | head -1)"
    [ -n "$PORT" ] && break
    kill -0 "$SPID" 2>/dev/null || fail "$name: the server exited at start-up"
    sleep 0.1
  done
  [ -n "$PORT" ] || fail "$name: the server did not start in 30 s"
  URL="http://127.0.0.1:$PORT"
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
nfds() { ls "/proc/$1/fd" | wc -l; }
metric() { curl -s "$URL/metrics" | sed -n "s/^$1{[^}]*${2:-}[^}]*} //p" | head -1; }
# mean E2E latency (s) of a closed-loop run of 24 short requests, 4 at a time; fails on errors
bench_mean() {
  "$BIN" bench --base-url "$URL" --dataset-name random --random-input-len 16 --random-output-len 64 \
    --random-vocab-size "$((VOCAB - 8))" --ignore-eos --disable-tqdm --num-prompts 24 --max-concurrency 4 \
    --seed "$1" --save-result --result-dir "$TMP" --result-filename "b$1.json" >"$TMP/b$1.out" 2>&1
  python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))
assert j["failed"] == 0, j["errors"]
print("%.4f" % (sum(j["e2els"]) / len(j["e2els"])))' "$TMP/b$1.json" || fail "bench: $(tail -5 "$TMP/b$1.out")"
}

# ---- 1. slow readers ----------------------------------------------------------------------------
start_server slow --max-num-seqs 16 --max-stream-backlog $BACKLOG --http-timeout $TIMEOUT_S
T0="$(date +%s)"
B0="$(bench_mean 1)" || exit 1
RSS0="$(rss_kib "$SPID")"
FD0="$(nfds "$SPID")"
python3 - "$PORT" 8 >"$TMP/slow.out" 2>&1 <<'PY' &
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
# logprobs: ~0.5 KB a token, so the stream outgrows the socket buffers (CONN_SNDBUF) soon
body = b'{"prompt":[1,2,3],"max_tokens":1800,"ignore_eos":true,"stream":true,"logprobs":5}'
socks = []
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server blocks soon
    s.connect(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    socks.append(s)
print("connected", flush=True)
got = 0
for _ in range(60):                    # one byte a second from each, until killed
    for s in socks:
        try:
            got += len(s.recv(1))
        except OSError:
            pass
    time.sleep(1)
PY
SLOWPID=$!
PIDS+=("$SLOWPID")
for _ in $(seq 50); do grep -q connected "$TMP/slow.out" && break; sleep 0.1; done
sleep 0.5
B1="$(bench_mean 2)" || exit 1
echo "closed-loop mean E2E: $B0 s alone, $B1 s beside 8 slow readers"
# They share the engine with 8 more sequences for a few hundred steps; a stall would
# hold them until the slow clients are cut off (>= $TIMEOUT_S s).
python3 -c "import sys; sys.exit(0 if $B1 <= 5 * $B0 + 0.5 else 1)" ||
  fail "requests slowed down by slow readers: mean E2E $B1 s against $B0 s alone"
# their requests are aborted once $BACKLOG tokens are unread: blocks back, nothing running
ok=""
for _ in $(seq 100); do
  [ "$(metric pdserve_kv_cache_blocks_used)" = 0 ] && [ "$(metric pdserve_num_requests_running)" = 0 ] && { ok=1; break; }
  sleep 0.1
done
[ -n "$ok" ] || fail "slow readers: KV blocks $(metric pdserve_kv_cache_blocks_used), running $(metric pdserve_num_requests_running)"
ABORTS="$(metric pdserve_request_success_total 'finished_reason="abort"')"
[ "${ABORTS:-0}" -ge 8 ] || fail "slow readers: $ABORTS aborted requests, expected 8"
grep -q "fell $BACKLOG tokens behind" "$TMP/serve-slow.log" || fail "no backlog abort in the log"
RSS1="$(rss_kib "$SPID")"
echo "server RSS: $((RSS0 / 1024)) MiB before, $((RSS1 / 1024)) MiB with 8 slow readers"
[ "$RSS1" -le $((RSS0 + RSS_SLOW)) ] || fail "RSS grew from $RSS0 to $RSS1 KiB"
# the connections are closed by the server after $TIMEOUT_S s without progress
closed=""
for _ in $(seq 100); do
  [ "$(nfds "$SPID")" -le $((FD0 + 2)) ] && { closed=1; break; }
  sleep 0.1
done
kill -0 "$SLOWPID" 2>/dev/null || fail "the slow client ended early: $(cat "$TMP/slow.out")"
[ -n "$closed" ] || fail "slow connections still open: $(nfds "$SPID") fds, $FD0 before"
kill "$SLOWPID"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/health")" = 200 ] || fail "/health after slow readers"
kill -TERM "$SPID"
wait "$SPID" || fail "exit status $? after SIGTERM"
echo "ok   slow readers: others at normal speed, aborted at $BACKLOG unread tokens, closed after $TIMEOUT_S s ($(( $(date +%s) - T0 )) s)"

# ---- 2. 10,000 idle connections -----------------------------------------------------------------
T0="$(date +%s)"
HARD="$(ulimit -Hn)"
[ "$HARD" = unlimited ] && HARD=1048576
if [ "$HARD" -lt $((IDLE + 512)) ]; then
  IDLE=$((HARD - 512))
  echo "note: the hard open-file limit is $HARD: $IDLE idle connections"
fi
start_server idle --http-timeout 30 --max-body-bytes 4096
RSS0="$(rss_kib "$SPID")"
python3 - "$PORT" "$IDLE" "$SPID" <<'PY' || fail "idle connections: see above"
import json, os, resource, socket, sys, time, urllib.request
port, n, spid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
t0 = time.time()
socks = []
for i in range(n):
    s = socket.socket()
    s.connect(("127.0.0.1", port))
    if i % 2:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    socks.append(s)
held = len(os.listdir("/proc/%d/fd" % spid))
print("%d idle connections opened in %.1f s; the server holds %d fds" % (n, time.time() - t0, held))
t1 = time.time()
req = urllib.request.Request("http://127.0.0.1:%d/v1/completions" % port, method="POST",
                             data=b'{"prompt":[1,2,3],"max_tokens":8,"ignore_eos":true}',
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=10) as r:
    j = json.load(r)
dt = time.time() - t1
print("a real request among them: %d tokens in %.3f s" % (j["usage"]["completion_tokens"], dt))
assert j["usage"]["completion_tokens"] == 8
assert dt < 2.0, "a request among idle connections took %.3f s" % dt
assert held >= n * 0.9, "the server holds only %d of %d connections" % (held, n)
for s in socks:
    s.close()
PY
RSS1="$(rss_kib "$SPID")"
echo "server RSS: $((RSS0 / 1024)) MiB before, $((RSS1 / 1024)) MiB after $IDLE idle connections"
[ "$RSS1" -le $((RSS0 + RSS_IDLE)) ] || fail "RSS grew from $RSS0 to $RSS1 KiB"
sleep 0.5
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/health")" = 200 ] || fail "/health after idle connections"
r="$(curl -s -X POST "$URL/v1/completions" -d '{"prompt":[1,2,3],"max_tokens":4,"ignore_eos":true}')"
grep -q '"completion_tokens":4' <<<"$r" || fail "a request after the idle connections: $r"
echo "ok   $IDLE idle connections: a real request answered promptly ($(( $(date +%s) - T0 )) s)"

# ---- 3. bodies over the cap without Content-Length, or behind Expect: 100-continue ---------------
head -c 5000 /dev/zero | tr '\0' ' ' >"$TMP/big.json"
r="$(curl -s -o /dev/null -w '%{http_code} %{size_upload}' -H 'Expect: 100-continue' \
  -X POST --data-binary @"$TMP/big.json" "$URL/v1/completions")"
[ "$r" = "413 0" ] || fail "Expect: 100-continue over the cap: status and bytes sent '$r', want '413 0'"
r="$(curl -s -w ' %{http_code}' -H 'Transfer-Encoding: chunked' -X POST --data-binary @"$TMP/big.json" \
  "$URL/v1/completions")"
grep -q 'request_too_large.* 413$' <<<"$r" || fail "chunked body over the cap: $r"
echo "ok   body cap: chunked and Expect: 100-continue bodies over --max-body-bytes get 413"
kill -TERM "$SPID"
wait "$SPID" || fail "exit status $? after SIGTERM"
grep -q -e "AddressSanitizer" -e "runtime error" "$TMP"/serve-*.log && fail "sanitizer report in a log"
echo "all slow-client tests passed"
