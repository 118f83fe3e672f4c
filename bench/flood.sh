#!/usr/bin/env bash
# Flood benchmark: does a flood of made-up tokens hurt users whose identity is cached, and how
# many OP calls does it cost?
#
#   bench/flood.sh            # 3 x 10 s
#   bench/flood.sh --smoke    # seconds, no thresholds (CI)
#
# On loopback: bench/op_stub.py as the OP (5 ms per introspection; it reports the most calls it
# had in flight at once), nginx as the upstream, the release gateway with
# `max_concurrent_introspections = 16` and `introspection_queue = 64`, one worker thread, the
# default per-address budget of new tokens (100/s, burst 1000) and `trust_forwarded_headers`.
#   idle    wrk -c16 with one cached valid token: p50/p99 of a cached user alone
#   flood   the same, while a second wrk (-c256) sends 5,000 distinct made-up tokens: paced
#           (50 ms between a connection's requests, about 5,000 req/s: more than the OP
#           stub can take at the bound, so some are shed) and flat out (the gateway's one
#           worker saturated: then every request waits its turn, cached or not); each from
#           one address (the budget answers 429 past it) and from 5,000 addresses (one per
#           token through X-Forwarded-For: only the per-issuer bound holds those back)
#   control the paced and flat-out loads again with the cached user's own valid token: what
#           the volume alone costs, without a single made-up token
# Prints both, their ratio, the flood's answers (401 once the OP judged a token, 503 when shed,
# 429 over the address's budget) and the OP's peak concurrency against the configured bound.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true
if $smoke; then DUR=3s; RUNS=1; else DUR=10s; RUNS=3; fi
MAXC=16
QUEUE=64
FLOOD_TOKENS=5000
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_install
cargo build --release --quiet --bin matrix-oidc-gateway

bench_workdir
UP=$(free_port); OP=$(free_port); GW=$(free_port); ADMIN=$(free_port)
write_nginx_conf nginx "$(static_json_server "$UP" '{"ok":true}')"
nginx -c "$work/nginx.conf" -p "$work"
python3 bench/op_stub.py "$OP" >/dev/null 2>&1 &
pids+=($!)
wait_port "$UP"; wait_port "$OP"
cat >"$work/gateway.toml" <<TOML
[listen]
public = "127.0.0.1:$GW"
admin = "127.0.0.1:$ADMIN"
threads = 1
trust_forwarded_headers = true
[homeserver]
url = "http://127.0.0.1:$UP"
server_name = "example.org"
[store]
path = "$work/state.sqlite3"
encryption_key = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
[[issuers]]
issuer = "http://127.0.0.1:$OP/"
introspection_endpoint = "http://127.0.0.1:$OP/introspect"
client_id = "bench"
client_secret = "bench"
max_concurrent_introspections = $MAXC
introspection_queue = $QUEUE
[cache]
capacity = 100000
[log]
level = "error"
TOML
./target/release/matrix-oidc-gateway --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
pids+=($!)
wait_port "$GW"
U="http://127.0.0.1:$GW/_matrix/client/v3/sync"
curl -s -o /dev/null -H "Authorization: Bearer good-token" "$U"
wrk -t1 -c16 -d1s -H "Authorization: Bearer good-token" "$U" >/dev/null 2>&1 || true  # warm-up

cached() { wrk -t1 -c16 -d"$DUR" --latency -H "Authorization: Bearer good-token" "$U"; }
p() { awk -v q="$1" '$1==q {print $2}' | to_ms; }
shed_total() {
  curl -s "http://127.0.0.1:$ADMIN/metrics" |
    awk '/^matrix_oidc_gateway_introspection_requests_total\{result="op_overloaded"\}/ {print $2}' | awk '{s+=$1} END {print s+0}'
}
limited_total() {
  curl -s "http://127.0.0.1:$ADMIN/metrics" |
    awk '/^matrix_oidc_gateway_requests_total\{.*outcome="M_LIMIT_EXCEEDED"/ {print $2}' | awk '{s+=$1} END {print s+0}'
}
rows="$work/rows"
: >"$rows"
# Scenarios: name, the flood's token (empty: made-up ones), pace (ms between a connection's
# requests, 0: flat out), and whether each made-up token comes from its own address. The
# one-address floods meet the per-address budget of new tokens (429 past it); the spread ones
# (X-Forwarded-For through a trusted proxy) meet only the per-issuer introspection bound.
# The controls send the cached user's own valid token at the same volume: what the volume alone
# costs a cached user on these cores, without a single made-up token.
scenarios=(
  "paced,_one_address||50|0"
  "paced,_5,000_addresses||50|1"
  "flat_out,_one_address||0|0"
  "flat_out,_5,000_addresses||0|1"
  "control:_paced,_valid_token|good-token|50|0"
  "control:_flat_out,_valid_token|good-token|0|0"
)
for scenario in "${scenarios[@]}"; do
IFS='|' read -r label token pace spread <<<"$scenario"
for run in $(seq 1 "$RUNS"); do
  idle=$(cached)
  shed0=$(shed_total)
  limited0=$(limited_total)
  intro0=$(op_count "$OP" introspections)
  env ${token:+FLOOD_TOKEN=$token} FLOOD_PREFIX="$run-${label//[^a-z0-9]/}" FLOOD_TOKENS=$FLOOD_TOKENS \
    FLOOD_DELAY_MS=$pace FLOOD_SPREAD="$spread" \
    wrk -t1 -c256 -d"$DUR" -s bench/flood.lua "$U" >"$work/flood.out" 2>&1 &
  flood_pid=$!
  sleep 0.3
  busy=$(cached)
  wait "$flood_pid" || true
  flood_rps=$(awk '/Requests\/sec/ {print $2}' "$work/flood.out")
  # The cached user's answers must all be 200s: a fast refusal would flatter its latency.
  bad=$(awk '/Non-2xx/ {print $NF}' <<<"$idle"$'\n'"$busy" | awk '{s+=$1} END {print s+0}')
  if [ "$bad" -gt 0 ]; then
    echo "flood: the cached user got $bad non-2xx answers ($label)" >&2
    exit 1
  fi
  printf '%s %s %s %s %s %s %s %s %s\n' "$label" \
    "$(p 50% <<<"$idle")" "$(p 99% <<<"$idle")" "$(p 50% <<<"$busy")" "$(p 99% <<<"$busy")" \
    "$flood_rps" "$(( $(op_count "$OP" introspections) - intro0 ))" "$(( $(shed_total) - shed0 ))" \
    "$(( $(limited_total) - limited0 ))" >>"$rows"
done
done
peak=$(op_count "$OP" max_in_flight)

echo
echo "flood benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores$($smoke && echo ', SMOKE (not for conclusions)')"
echo "max_concurrent_introspections = $MAXC, introspection_queue = $QUEUE, $FLOOD_TOKENS distinct made-up tokens"
echo
echo "| flood | cached idle p50/p99 ms | cached under flood p50/p99 ms | p99 ratio | flood req/s | OP calls | shed (503) | over budget (429) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
awk '{l = $1; gsub(/_/, " ", l); printf "| %s | %.2f / %.2f | %.2f / %.2f | %.2f | %.0f | %d | %d | %d |\n", l, $2, $3, $4, $5, ($3 > 0 ? $5/$3 : 0), $6, $7, $8, $9}' "$rows"
echo
echo "- OP peak concurrency: $peak (bound: $MAXC)"
if [ "$peak" -gt "$MAXC" ]; then
  echo "flood: the OP saw more calls in flight than the configured bound" >&2
  exit 1
fi
