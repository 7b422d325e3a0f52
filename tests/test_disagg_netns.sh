#!/usr/bin/env bash
# test_disagg_netns.sh: a deployment over two "hosts": two network namespaces made here
# (ip netns + a veth pair, addresses 10.200.X.1 and 10.200.X.2 inside them only), one
# deployment file, `pdserve up --deployment FILE --only-host H` once per host: the
# prefill instance and the router on host 1, the decode instance on host 2, KV over tcp
# between them, internal endpoints under the file's secret. 32 concurrent requests
# through the router must equal a colocated instance's greedy outputs; pools empty;
# both `up`s stop cleanly. Skipped (77) when not root or without `ip netns`.
source "$(dirname "${BASH_SOURCE[0]}")/disagg_common.sh"
[ "$(id -u)" = 0 ] || { echo "SKIP: needs root for ip netns"; exit 77; }
command -v ip >/dev/null && ip netns list >/dev/null 2>&1 || { echo "SKIP: ip netns is not available"; exit 77; }
make_model

X=$(( ($$ % 200) + 20 ))
H1=10.200.$X.1
H2=10.200.$X.2
NS1=pdtest-$$-a
NS2=pdtest-$$-b
netns_cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  ip netns del "$NS1" 2>/dev/null
  ip netns del "$NS2" 2>/dev/null
  rm -rf "$TMP"
}
trap netns_cleanup EXIT
ip netns add "$NS1" && ip netns add "$NS2" || { echo "SKIP: cannot create network namespaces"; exit 77; }
ip link add "pdv$$a" type veth peer name "pdv$$b" || { echo "SKIP: cannot create a veth pair"; exit 77; }
ip link set "pdv$$a" netns "$NS1"
ip link set "pdv$$b" netns "$NS2"
ip -n "$NS1" addr add "$H1/24" dev "pdv$$a"
ip -n "$NS2" addr add "$H2/24" dev "pdv$$b"
for ns in "$NS1" "$NS2"; do ip -n "$ns" link set lo up; done
ip -n "$NS1" link set "pdv$$a" up
ip -n "$NS2" link set "pdv$$b" up
ip netns exec "$NS1" bash -c "exec 3<>/dev/tcp/$H2/9 " 2>&1 | grep -q -i "refused" ||
  ip netns exec "$NS1" ip route get "$H2" >/dev/null || fail "the two namespaces cannot reach each other"

# references from a colocated instance (root namespace, loopback)
start_serve reference
PDSERVE_URL="http://127.0.0.1:$PORT" node "$ROOT/tests/node/disagg.mjs" reference "$TMP/ref.json" ||
  fail "references"
kill -TERM "$SPID"

cat >"$TMP/deploy.json" <<JSON
{
  "model": "$MODEL",
  "medium": "tcp",
  "internal_secret": "netns-test-secret",
  "router": {"host": "$H1", "port": 8000, "policy": "least-loaded"},
  "instances": [
    {"name": "prefill-a", "host": "$H1", "role": "prefill", "port": 8101, "gpus": []},
    {"name": "decode-b", "host": "$H2", "role": "decode", "port": 8201, "kv_port": 8301, "gpus": []}
  ]
}
JSON

ip netns exec "$NS2" "$BIN" up --deployment "$TMP/deploy.json" --only-host "$H2" -- "${SERVE_ARGS[@]}" \
  2>"$TMP/host2.log" &
UP2=$!
PIDS+=("$UP2")
for _ in $(seq 600); do grep -q "ready:" "$TMP/host2.log" && break; kill -0 $UP2 2>/dev/null || break; sleep 0.1; done
grep -q "ready:" "$TMP/host2.log" || { cat "$TMP/host2.log"; fail "host 2 (decode) did not start"; }
ip netns exec "$NS1" "$BIN" up --deployment "$TMP/deploy.json" --only-host "$H1" -- "${SERVE_ARGS[@]}" \
  2>"$TMP/host1.log" &
UP1=$!
PIDS+=("$UP1")
for _ in $(seq 600); do grep -q "ready:" "$TMP/host1.log" && break; kill -0 $UP1 2>/dev/null || break; sleep 0.1; done
grep -q "ready: .* on http://$H1:8000" "$TMP/host1.log" || { cat "$TMP/host1.log"; fail "host 1 (prefill + router) did not start"; }
echo "two hosts: prefill + router on $H1, decode on $H2, KV over tcp"

# the internal endpoints want the file's secret, also across hosts
code="$(ip netns exec "$NS1" curl -s -o /dev/null -w '%{http_code}' -X POST "http://$H2:8201/internal/reserve" -d '{"prompt":"a"}')"
[ "$code" = 401 ] || fail "cross-host /internal/reserve without the secret: $code"

ip netns exec "$NS1" env PDSERVE_URL="http://$H1:8000" PDSERVE_INSTANCES="http://$H1:8101,http://$H2:8201" \
  node "$ROOT/tests/node/disagg.mjs" compare "$TMP/ref.json" ||
  { tail -30 "$TMP/host1.log" "$TMP/host2.log"; fail "two hosts: outputs or pools"; }
grep -q "address $H2:" "$TMP/host2.log" || fail "the decode instance's KV address is not on $H2"

for p in $UP1 $UP2; do
  kill -TERM "$p"
  for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$p" 2>/dev/null && fail "pdserve up (pid $p) did not stop"
  wait "$p" || fail "pdserve up (pid $p) exit status $?"
done
echo "ok   two hosts: both deployments stopped cleanly"
echo "all two-host tests passed"
