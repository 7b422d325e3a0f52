#!/usr/bin/env bash
# test_router_health.sh: the router's health checks against a stand-in instance (a
# Python HTTP server on loopback whose GET /load can be made to answer late): one health
# check that times out (2 s) leaves the instance healthy, two in a row mark it
# unhealthy, the next good answer brings it back, and a refused connection (the
# stand-in gone) marks it at once.
set -uo pipefail
BIN="${PDSERVE_BIN:?PDSERVE_BIN not set}"
TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; [ -f "$TMP/router.log" ] && tail -20 "$TMP/router.log"; exit 1; }

# the stand-in: /load answers {"running":0,"waiting":0}; each line in $TMP/slow makes one
# answer 2.6 s late (the router's timeout is 2 s)
cat >"$TMP/stand_in.py" <<'PY'
import http.server, os, sys, time
slow = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path != "/load":
            self.send_response(404); self.end_headers(); return
        try:
            with open(slow) as f: lines = f.read().splitlines()
        except FileNotFoundError: lines = []
        if lines:
            with open(slow, "w") as f: f.write("\n".join(lines[1:]) + ("\n" if lines[1:] else ""))
            time.sleep(2.6)
        body = b'{"running":0,"waiting":0}'
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
PY
python3 "$TMP/stand_in.py" "$TMP/slow" >"$TMP/stand_in.port" 2>"$TMP/stand_in.log" &
SPID=$!
PIDS+=("$SPID")
for _ in $(seq 100); do [ -s "$TMP/stand_in.port" ] && break; sleep 0.05; done
SPORT="$(head -1 "$TMP/stand_in.port")"
[ -n "$SPORT" ] || fail "the stand-in did not start"

"$BIN" serve --role router --port 0 --instances "http://127.0.0.1:$SPORT" 2>"$TMP/router.log" &
RPID=$!
PIDS+=("$RPID")
RPORT=""
for _ in $(seq 200); do
  RPORT="$(sed -n 's|.*listening on http://[0-9.]*:\([0-9]*\).*|\1|p' "$TMP/router.log" | head -1)"
  [ -n "$RPORT" ] && break
  sleep 0.05
done
[ -n "$RPORT" ] || fail "the router did not start"
healthy() { curl -s "http://127.0.0.1:$RPORT/metrics" | sed -n 's|^pdserve_router_instance_healthy{.*} \([01]\)$|\1|p'; }
wait_for() { # wait_for VALUE SECONDS
  for _ in $(seq $(( $2 * 20 ))); do [ "$(healthy)" = "$1" ] && return 0; sleep 0.05; done
  return 1
}
wait_for 1 10 || fail "the stand-in never became healthy"
echo "ok   the stand-in is healthy"

# one late answer: never unhealthy while it is late, nor after
echo 1 >"$TMP/slow"
t0=$(date +%s%N)
while [ $(( ($(date +%s%N) - t0) / 1000000 )) -lt 4000 ]; do
  [ "$(healthy)" = 1 ] || fail "one timed-out health check marked the instance unhealthy"
  sleep 0.1
done
grep -q "health check timed out (1 in a row)" "$TMP/router.log" || fail "the late answer was not noticed"
echo "ok   one health check that times out leaves the instance healthy"

# two late answers in a row: unhealthy (the router's log says when: the good answer
# that follows may come within milliseconds), then healthy again
printf '1\n1\n' >"$TMP/slow"
for _ in $(seq 200); do grep -q "is unhealthy: health check: Timeout" "$TMP/router.log" && break; sleep 0.05; done
grep -q "health check timed out (1 in a row)" "$TMP/router.log" &&
  grep -q "is unhealthy: health check: Timeout" "$TMP/router.log" ||
  fail "two timed-out health checks in a row did not mark the instance unhealthy"
wait_for 1 10 || fail "the instance did not come back after a good answer"
echo "ok   two in a row mark it unhealthy; the next good answer brings it back"

# refused: at once (within two poll intervals and a connect)
kill -9 "$SPID"
t0=$(date +%s%N)
wait_for 0 5 || fail "a refused health check did not mark the instance unhealthy"
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
[ "$ms" -lt 2000 ] || fail "a refused connection took $ms ms to mark the instance"
echo "ok   a refused health check marks it at once ($ms ms)"
kill -TERM "$RPID"
wait "$RPID" || fail "router exit status $?"
echo "router health: all passed"
