#!/usr/bin/env bash
# Instructions per request on the gateway's cached-token path, counted by callgrind: a
# deterministic figure for comparing two builds of the request path, where req/s on a shared
# 2-core machine moves by more than the change being measured (bench/README.md, "What was
# tried").
#
#   bench/instructions.sh                  # the release binary of this tree
#   bench/instructions.sh BIN [TOKEN]      # another build; TOKEN bad-token: the refusal path
#
# The gateway (one worker) runs under valgrind in front of an nginx upstream and the OP stub;
# after a warm-up its counters are zeroed, wrk -c8 runs 10 s, and the instructions since the
# zero are divided by the requests served. SHA-256 runs in software under valgrind (about
# 7,000 of the figure for the two digests of a request; hardware SHA extensions take a small
# fraction of that natively). Prints the figure and the most expensive functions, inclusive.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_install
if ! command -v valgrind >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
BIN=${1:-}
if [ -z "$BIN" ]; then
  cargo build --release --quiet --bin matrix-oidc-gateway
  BIN=./target/release/matrix-oidc-gateway
fi
TOKEN=${2:-good-token}

bench_workdir
chmod 755 "$work"
UP=$(free_port); OP=$(free_port); GW=$(free_port); ADMIN=$(free_port)
write_nginx_conf upstream "  keepalive_requests 1000000;
$(static_json_server "$UP" '{"versions":["v1.11"],"ok":true}')"
nginx -c "$work/upstream.conf" -p "$work"
python3 bench/op_stub.py "$OP" >/dev/null 2>&1 &
pids+=($!)
{
  gateway_toml "$GW" "$ADMIN" "$(introspection_issuer)"
  printf '[cache]\ncapacity = 5000\n[log]\nlevel = "warn"\n'
} >"$work/gateway.toml"
valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" "$BIN" --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
gw=$!
pids+=("$gw")
wait_port "$UP"; wait_port "$OP"
for _ in $(seq 1 600); do (exec 3<>"/dev/tcp/127.0.0.1/$GW") 2>/dev/null && break; sleep 0.1; done
wait_port "$GW"
U="http://127.0.0.1:$GW/_matrix/client/v3/sync"
curl -s -o /dev/null -H "Authorization: Bearer $TOKEN" "$U"
wrk -t1 -c8 -d3s -H "Authorization: Bearer $TOKEN" "$U" >/dev/null
callgrind_control -z "$gw" >/dev/null
out=$(wrk -t1 -c8 -d10s -H "Authorization: Bearer $TOKEN" "$U")
callgrind_control -d "$gw" >/dev/null
sleep 1
requests=$(awk '/requests in/ {print $1}' <<<"$out")
dump=$(ls -t "$work"/cg.* | head -1)
total=$(awk '/^summary:/ {print $2}' "$dump")
echo "requests: $requests, instructions per request: $((total / requests))"
callgrind_annotate --inclusive=yes --threshold=100 --auto=no "$dump" 2>/dev/null |
  awk -v n="$requests" '/\(.*%\)/ && /matrix_oidc_gateway|pingora_http|http::header|httparse|mi_|tokio::time/ {
      c = $1; gsub(",", "", c); name = $0; sub(/.*\?\?\?:/, "", name); sub(/ \[.*/, "", name)
      printf "%8d  %s\n", c / n, name }' | head -25
