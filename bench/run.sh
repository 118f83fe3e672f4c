#!/usr/bin/env bash
# The side-by-side benchmark: the gateway against nginx references measured in the same run.
#
#   bench/run.sh            # full run (3 x 10 s per scenario, 1,000,000 cached identities)
#   bench/run.sh --smoke    # seconds, no thresholds (CI)
#
# Scenarios (wrk -t1 -c64, loopback, one worker each, medians):
#   direct      wrk -> nginx upstream (the physical limit)
#   nginx       wrk -> nginx proxy_pass (keepalive) -> upstream, no auth
#   gateway     wrk -> gateway (valid, cached token) -> upstream
#   nginx-401   nginx answering 401 JSON itself
#   gateway-401 gateway refusing a negative-cached token
# Plus: RSS of N cached identities, introspections for 1,000 concurrent first requests of one
# token, first-seen RS256 JWT validations per second on one core, and a sustained run with
# 10,000 distinct tokens through a 5,000-entry cache.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true
if $smoke; then DUR=2s; RUNS=1; CACHE_N=100000; JWT_N=2000; else DUR=10s; RUNS=3; CACHE_N=1000000; JWT_N=20000; fi

# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_install

# BENCH_SCENARIOS="nginx gateway" limits the load scenarios; BENCH_EXTRAS=0 skips the rest;
# BENCH_CARGO_FLAGS (e.g. --no-default-features) builds a variant for comparisons.
SCENARIOS=${BENCH_SCENARIOS:-direct nginx gateway nginx-401 gateway-401}
EXTRAS=${BENCH_EXTRAS:-1}
echo "== building (release)"
# shellcheck disable=SC2086
cargo build --release --quiet --bin matrix-oidc-gateway --examples ${BENCH_CARGO_FLAGS:-}

bench_workdir
UP=$(free_port); PROXY=$(free_port); N401=$(free_port); OP=$(free_port); GW=$(free_port); ADMIN=$(free_port)

cat >"$work/nginx.conf" <<NGINX
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$UP;
    location / { default_type application/json; return 200 '{"versions":["v1.11"],"ok":true}'; }
  }
  server {
    listen 127.0.0.1:$PROXY;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Matrix-User-Id "@bench:example.org";
    }
  }
  server {
    listen 127.0.0.1:$N401;
    location / { default_type application/json; return 401 '{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid access token","soft_logout":false}'; }
  }
}
NGINX
nginx -c "$work/nginx.conf" -p "$work"
python3 bench/op_stub.py "$OP" >/dev/null 2>&1 &
pids+=($!)
wait_port "$UP"; wait_port "$OP"

cat >"$work/gateway.toml" <<TOML
[listen]
public = "127.0.0.1:$GW"
admin = "127.0.0.1:$ADMIN"
threads = 1
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
[cache]
capacity = 5000
[log]
level = "warn"
TOML
./target/release/matrix-oidc-gateway --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
pids+=($!)
wait_port "$GW"
curl -s -o /dev/null -H "Authorization: Bearer good-token" "http://127.0.0.1:$GW/_matrix/client/v3/sync"
curl -s -o /dev/null -H "Authorization: Bearer bad-token" "http://127.0.0.1:$GW/_matrix/client/v3/sync"

# wrk_run NAME URL [extra wrk args...] -> appends "NAME rps p50_ms p99_ms" (median of RUNS)
results="$work/results"
: >"$results"
wrk_run() {
  local name=$1 url=$2; shift 2
  wrk -t1 -c64 -d1s "$@" "$url" >/dev/null 2>&1 || true
  local rows=()
  for _ in $(seq 1 "$RUNS"); do
    local out
    out=$(wrk -t1 -c64 -d"$DUR" --latency "$@" "$url")
    local rps p50 p99
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out" | to_ms)
    p99=$(awk '$1=="99%" {print $2}' <<<"$out" | to_ms)
    rows+=("$rps $p50 $p99")
  done
  printf '%s\n' "${rows[@]}" | sort -n -k1 | awk -v n="$name" '{a[NR]=$0} END {print n, a[int((NR+1)/2)]}' >>"$results"
}
U="/_matrix/client/v3/sync"
echo "== load (wrk -t1 -c64 -d$DUR, $RUNS run(s) each)"
has() { [[ " $SCENARIOS " == *" $1 "* ]]; }
has direct && wrk_run direct "http://127.0.0.1:$UP$U"
has nginx && wrk_run nginx "http://127.0.0.1:$PROXY$U"
has gateway && wrk_run gateway "http://127.0.0.1:$GW$U" -H "Authorization: Bearer good-token"
has nginx-401 && wrk_run nginx-401 "http://127.0.0.1:$N401$U"
has gateway-401 && wrk_run gateway-401 "http://127.0.0.1:$GW$U" -H "Authorization: Bearer bad-token"
if [ "$EXTRAS" = 0 ]; then
  echo
  awk -v n="$(awk '$1=="nginx"{print $2}' "$results")" -v n401="$(awk '$1=="nginx-401"{print $2}' "$results")" '
    { ref = ($1 ~ /401/) ? n401 : n; printf "%s %.0f req/s p50 %.2f ms p99 %.2f ms ratio %.2f\n", $1, $2, $3, $4, (ref > 0 ? $2/ref : 0) }' "$results"
  exit 0
fi

# 1,000 concurrent first requests of one new token.
before=$(op_count "$OP" introspections)
first=$(./target/release/examples/bench_first_requests "http://127.0.0.1:$GW" 1000 "first-seen-token-$$")
after=$(op_count "$OP" introspections)
intros=$((after - before))

# Sustained: 10,000 distinct tokens through a 5,000-entry cache.
seq 1 10000 | sed 's/^/cycle-token-/' >"$work/tokens.txt"
before=$(op_count "$OP" introspections)
sustained=$(TOKENS_FILE="$work/tokens.txt" wrk -t1 -c64 -d"$DUR" -s bench/tokens.lua "http://127.0.0.1:$GW$U" | awk '/Requests\/sec/ {print $2}')
after=$(op_count "$OP" introspections)
sustained_intros=$((after - before))

# The load-test kit, end to end: real tokens from the development OP, cycled through the gateway.
kit="skipped (no Node.js)"
if command -v node >/dev/null && [ -d tests/e2e/op/node_modules/oidc-provider ]; then
  DEVOP=$(free_port)
  (cd tests/e2e/op && exec node op.mjs --port "$DEVOP") >/dev/null 2>&1 &
  pids+=($!)
  wait_port "$DEVOP"
  kit_out=$(bench/loadtest.sh --gateway "http://127.0.0.1:$GW" --issuer "http://127.0.0.1:$DEVOP"     --count "$($smoke && echo 3 || echo 20)" --duration "$DUR" --path "$U" 2>&1)
  kit="$(awk '/Requests\/sec/ {print $2}' <<<"$kit_out") req/s over real OP tokens ($(grep -o 'minted [0-9]* tokens' <<<"$kit_out"))"
fi

memory=$(./target/release/examples/bench_cache_memory "$CACHE_N")
jwt=$(./target/release/examples/bench_jwt "$JWT_N")

echo
echo "matrix-oidc-gateway benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -m)$($smoke && echo ', SMOKE (not for conclusions)')"
echo
awk -v d="$(awk '$1=="direct"{print $2}' "$results")" -v n="$(awk '$1=="nginx"{print $2}' "$results")" \
    -v n401="$(awk '$1=="nginx-401"{print $2}' "$results")" '
  BEGIN { printf "| scenario | req/s | p50 ms | p99 ms | vs nginx | vs direct |\n|---|---:|---:|---:|---:|---:|\n" }
  { ref = ($1 ~ /401/) ? n401 : n
    printf "| %s | %.0f | %.2f | %.2f | %.2f | %.2f |\n", $1, $2, $3, $4, $2/ref, $2/d }' "$results"
echo
echo "- 1,000 concurrent first requests of one token: $first, introspections: $intros"
echo "- sustained, 10,000 tokens through a 5,000-entry cache: $sustained req/s, introspections: $sustained_intros"
echo "- $memory"
echo "- $jwt"
echo "- load-test kit: $kit"
