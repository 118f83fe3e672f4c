#!/usr/bin/env bash
# The side-by-side benchmark: the gateway against nginx references and the do-it-yourself
# competitors, all measured in the same run.
#
#   bench/run.sh            # full run (5 interleaved rounds of 10 s per scenario, 1,000,000
#                           # cached identities; BENCH_RUNS sets the rounds)
#   bench/run.sh --smoke    # seconds, no thresholds (CI)
#
# Scenarios (wrk -t1 -c64, loopback; every proxy is one worker in a process of its own, in
# front of the same upstream, a separate nginx process):
#   direct          wrk -> upstream (the physical limit)
#   nginx           wrk -> nginx proxy_pass (keepalive) -> upstream, no auth
#   nginx-authreq   wrk -> nginx auth_request + proxy_cache keyed on Authorization (the
#                   do-it-yourself edge, as ingress-nginx's auth-cache-key builds it; the
#                   introspection adapter behind it only sees misses) -> upstream
#   gateway         wrk -> gateway (introspection mode, a valid cached token) -> upstream
#   oauth2-proxy    wrk -> oauth2-proxy --skip-jwt-bearer-tokens (an RS256 JWT) -> upstream
#   gateway-jwt     wrk -> gateway (jwt mode, the same JWT) -> upstream
#   nginx-401       nginx answering 401 JSON itself
#   gateway-401     gateway refusing a negative-cached token
# They run interleaved, RUNS rounds of each; the table gives min / median / max req/s and the
# medians of the rounds' p50 and p99. Plus: RSS of N cached identities (and of the cache's own cost per entry, against
# moka's), introspections for 1,000 concurrent first requests of one token, first-seen RS256
# JWT validations per second on one core, and a sustained run with 10,000 distinct tokens
# through a 5,000-entry cache.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true
if $smoke; then DUR=2s; RUNS=1; CACHE_N=100000; JWT_N=2000; else DUR=10s; RUNS=${BENCH_RUNS:-5}; CACHE_N=1000000; JWT_N=20000; fi

# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_install

# BENCH_SCENARIOS="nginx gateway" limits the load scenarios; BENCH_EXTRAS=0 skips the rest;
# BENCH_CARGO_FLAGS (e.g. --no-default-features) builds a variant for comparisons.
SCENARIOS=${BENCH_SCENARIOS:-direct nginx nginx-authreq gateway oauth2-proxy gateway-jwt nginx-401 gateway-401}
EXTRAS=${BENCH_EXTRAS:-1}
has() { [[ " $SCENARIOS " == *" $1 "* ]]; }
if has oauth2-proxy; then
  echo "== oauth2-proxy (scripts/peers/install-oauth2-proxy.sh)"
  O2P_BIN=$(scripts/peers/install-oauth2-proxy.sh | tail -1)
fi
echo "== building (release)"
# shellcheck disable=SC2086
cargo build --release --quiet --bin matrix-oidc-gateway --examples ${BENCH_CARGO_FLAGS:-}

bench_workdir
# nginx workers run as nobody: they read and write the auth cache under $work.
chmod 755 "$work"
UP=$(free_port); PROXY=$(free_port); AUTHN=$(free_port); N401=$(free_port); OP=$(free_port)
GW=$(free_port); ADMIN=$(free_port); GWJ=$(free_port); ADMINJ=$(free_port); O2P=$(free_port)
BODY='{"versions":["v1.11"],"ok":true}'

write_nginx_conf upstream "  keepalive_requests 1000000;
$(static_json_server "$UP" "$BODY")"
write_nginx_conf proxy "
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$PROXY;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header X-Matrix-User-Id \"@bench:example.org\";
    }
  }
  server {
    listen 127.0.0.1:$N401;
    location / { default_type application/json; return 401 '{\"errcode\":\"M_UNKNOWN_TOKEN\",\"error\":\"Invalid access token\",\"soft_logout\":false}'; }
  }"
write_nginx_conf authreq "
  keepalive_requests 1000000;
  proxy_cache_path $work/authcache levels=1:2 keys_zone=auth:10m max_size=100m inactive=10m;
  upstream up { server 127.0.0.1:$UP; keepalive 128; }
  upstream op { server 127.0.0.1:$OP; keepalive 16; }
  server {
    listen 127.0.0.1:$AUTHN;
    location / {
      auth_request /_auth;
      auth_request_set \$matrix_user \$upstream_http_x_matrix_user_id;
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header X-Matrix-User-Id \$matrix_user;
    }
    location = /_auth {
      internal;
      proxy_pass http://op/auth;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_pass_request_body off;
      proxy_set_header Content-Length \"\";
      proxy_cache auth;
      proxy_cache_key \$http_authorization;
      proxy_cache_valid 200 401 120s;
      proxy_cache_lock on;
    }
  }"
for n in upstream proxy authreq; do nginx -c "$work/$n.conf" -p "$work"; done
python3 bench/op_stub.py "$OP" >/dev/null 2>&1 &
pids+=($!)
wait_port "$UP"; wait_port "$OP"; wait_port "$AUTHN"

# gateway_conf PORT ADMIN ISSUER_LINES: a gateway configuration (one worker thread).
gateway_conf() {
  gateway_toml "$1" "$2" "$3"
  printf '[cache]\ncapacity = 5000\n[log]\nlevel = "warn"\n'
}
gateway_conf "$GW" "$ADMIN" "$(introspection_issuer)" >"$work/gateway.toml"
# The sustained run's new tokens all come from one loopback address: no per-address budget,
# so that it measures the cache (bench/flood.sh measures the budget).
printf '[auth]\nnew_tokens_per_address = 0\n' >>"$work/gateway.toml"
gateway_conf "$GWJ" "$ADMINJ" "mode = \"jwt\"
audiences = [\"bench\"]
jwks_uri = \"http://127.0.0.1:$OP/jwks\"" >"$work/gateway-jwt.toml"
./target/release/matrix-oidc-gateway --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
pids+=($!)
if has gateway-jwt; then
  ./target/release/matrix-oidc-gateway --config "$work/gateway-jwt.toml" >"$work/gateway-jwt.log" 2>&1 &
  pids+=($!)
  wait_port "$GWJ"
fi
JWT=$(./target/release/examples/bench_mint_jwt "http://127.0.0.1:$OP/" bench 1)
if has oauth2-proxy; then
  GOMAXPROCS=1 "$O2P_BIN" --http-address="127.0.0.1:$O2P" --provider=oidc \
    --oidc-issuer-url="http://127.0.0.1:$OP/" --skip-oidc-discovery \
    --login-url="http://127.0.0.1:$OP/authorize" --redeem-url="http://127.0.0.1:$OP/token" \
    --oidc-jwks-url="http://127.0.0.1:$OP/jwks" --client-id=bench --client-secret=bench \
    --cookie-secret=0123456789abcdef0123456789abcdef --cookie-secure=false --email-domain='*' \
    --redirect-url="http://127.0.0.1:$O2P/oauth2/callback" --upstream="http://127.0.0.1:$UP/" \
    --skip-jwt-bearer-tokens=true --request-logging=false --auth-logging=false \
    --standard-logging=false >"$work/oauth2-proxy.log" 2>&1 &
  pids+=($!)
  wait_port "$O2P"
fi
wait_port "$GW"
U="/_matrix/client/v3/sync"
# The first request of each token is a miss everywhere; the load measures the cached path.
expect() {
  local got
  got=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $2" "$3")
  [ "$got" = "$1" ] || { echo "bench: $3 answered $got, not $1" >&2; cat "$work"/*.log >&2; exit 1; }
}
expect 200 good-token "http://127.0.0.1:$GW$U"
expect 401 bad-token "http://127.0.0.1:$GW$U"
expect 200 good-token "http://127.0.0.1:$AUTHN$U"
expect 401 bad-token "http://127.0.0.1:$AUTHN$U"
has gateway-jwt && expect 200 "$JWT" "http://127.0.0.1:$GWJ$U"
has oauth2-proxy && expect 200 "$JWT" "http://127.0.0.1:$O2P$U"

# The load scenarios run interleaved: round after round, each scenario once per round (after a
# 1 s warm-up each), so that a burst of other load on the machine's cores costs one run of
# each scenario it overlaps rather than all the runs of one scenario. Per scenario, the table
# gives min / median / max req/s over the rounds and the medians of their p50 and p99.
results="$work/results"
runs="$work/runs"
: >"$results"
: >"$runs"
load() { # NAME: one wrk run of that scenario, as "NAME rps p50_ms p99_ms"
  local name=$1 url token=""
  case $name in
    direct) url="http://127.0.0.1:$UP$U" ;;
    nginx) url="http://127.0.0.1:$PROXY$U" ;;
    nginx-authreq) url="http://127.0.0.1:$AUTHN$U" token=good-token ;;
    gateway) url="http://127.0.0.1:$GW$U" token=good-token ;;
    oauth2-proxy) url="http://127.0.0.1:$O2P$U" token=$JWT ;;
    gateway-jwt) url="http://127.0.0.1:$GWJ$U" token=$JWT ;;
    nginx-401) url="http://127.0.0.1:$N401$U" ;;
    gateway-401) url="http://127.0.0.1:$GW$U" token=bad-token ;;
  esac
  local args=()
  [ -n "$token" ] && args=(-H "Authorization: Bearer $token")
  args+=("$url")
  if [ "${2:-}" = warm ]; then
    wrk -t1 -c64 -d1s "${args[@]}" >/dev/null 2>&1 || true
    return
  fi
  local out
  out=$(wrk -t1 -c64 -d"$DUR" --latency "${args[@]}")
  printf '%s %s %s %s\n' "$name" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1=="50%" {print $2}' <<<"$out" | to_ms)" "$(awk '$1=="99%" {print $2}' <<<"$out" | to_ms)"
}
LOADS=()
for name in direct nginx nginx-authreq gateway oauth2-proxy gateway-jwt nginx-401 gateway-401; do
  has "$name" && LOADS+=("$name")
done
echo "== load (wrk -t1 -c64 -d$DUR, $RUNS interleaved round(s) of ${LOADS[*]})"
for name in "${LOADS[@]}"; do load "$name" warm; done
for _ in $(seq 1 "$RUNS"); do
  for name in "${LOADS[@]}"; do load "$name" >>"$runs"; done
done
for name in "${LOADS[@]}"; do
  rps=$(awk -v n="$name" '$1==n {print $2}' "$runs" | sort -g)
  printf '%s %s %s %s %s %s\n' "$name" "$(head -1 <<<"$rps")" "$(median <<<"$rps")" "$(tail -1 <<<"$rps")" \
    "$(awk -v n="$name" '$1==n {print $3}' "$runs" | median)" \
    "$(awk -v n="$name" '$1==n {print $4}' "$runs" | median)" >>"$results"
done
# The reference of each scenario's ratio: nginx's own 401 for refusals, the competitor for
# the competitors' rows, nginx proxy_pass otherwise.
table() {
  awk -v d="$(awk '$1=="direct"{print $3}' "$results")" -v n="$(awk '$1=="nginx"{print $3}' "$results")" \
      -v n401="$(awk '$1=="nginx-401"{print $3}' "$results")" -v ar="$(awk '$1=="nginx-authreq"{print $3}' "$results")" \
      -v o2p="$(awk '$1=="oauth2-proxy"{print $3}' "$results")" '
    function ratio(x, ref) { return ref > 0 ? sprintf("%.2f", x / ref) : "-" }
    BEGIN { printf "| scenario | req/s min | median | max | p50 ms | p99 ms | vs nginx | vs direct | vs competitor |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n" }
    { ref = ($1 ~ /401/) ? n401 : n
      comp = ($1 == "gateway") ? ratio($3, ar) : ($1 == "gateway-jwt") ? ratio($3, o2p) : "-"
      printf "| %s | %.0f | %.0f | %.0f | %.2f | %.2f | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, ratio($3, ref), ratio($3, d), comp }' "$results"
}
if [ "$EXTRAS" = 0 ]; then
  echo
  table
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
sustained_hits0=$(cache_lookups "$ADMIN" hit); sustained_all0=$(cache_lookups "$ADMIN")
sustained=$(TOKENS_FILE="$work/tokens.txt" wrk -t1 -c64 -d"$DUR" -s bench/tokens.lua "http://127.0.0.1:$GW$U" | awk '/Requests\/sec/ {print $2}')
after=$(op_count "$OP" introspections)
sustained_intros=$((after - before))
sustained_hits=$(( $(cache_lookups "$ADMIN" hit) - sustained_hits0 ))
sustained_all=$(( $(cache_lookups "$ADMIN") - sustained_all0 ))
sustained_ratio=$(awk -v h="$sustained_hits" -v a="$sustained_all" 'BEGIN {printf "%.3f", (a > 0 ? h / a : 0)}')
sustained_rate=$(awk -v n="$sustained_intros" -v d="${DUR%s}" 'BEGIN {printf "%.0f", n / d}')

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

# Cost growth: the cached-token path and the gateway's RSS with 10^3, 10^5 and 10^6 identities
# cached (10^3 and 10^4 in smoke mode), filled through a gateway in jwt mode with HS256 (fast
# local checks; the cached verdict is the same as an introspected token's).
GWH=$(free_port); ADMINH=$(free_port)
HS_SECRET=bench-hmac-secret-0123456789abcdef
gateway_conf "$GWH" "$ADMINH" "mode = \"jwt\"
audiences = [\"bench\"]
algorithms = [\"HS256\"]
hmac_secret = \"$HS_SECRET\"
jwks_uri = \"http://127.0.0.1:$OP/jwks\"" | sed 's/^capacity = 5000$/capacity = 1100000/' >"$work/gateway-hs.toml"
# One loopback address sends every new token of the fill: no per-address budget.
printf '[auth]\nnew_tokens_per_address = 0\n' >>"$work/gateway-hs.toml"
./target/release/matrix-oidc-gateway --config "$work/gateway-hs.toml" >"$work/gateway-hs.log" 2>&1 &
gwh_pid=$!
pids+=($gwh_pid)
wait_port "$GWH"
rss_mib() { awk '/^VmRSS:/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
growth="$work/growth"
echo "| cached identities | RSS MiB | RSS per identity B | cached-token req/s | p99 ms | hit ratio |" >"$growth"
echo "|---:|---:|---:|---:|---:|---:|" >>"$growth"
rss0=$(rss_mib "$gwh_pid")
filled=0
for target in $($smoke && echo "1000 10000" || echo "1000 100000 1000000"); do
  before_fill=$filled
  fill=$(./target/release/examples/bench_fill "http://127.0.0.1:$GWH" "http://127.0.0.1:$OP/" "$HS_SECRET" $((target - filled)) "$filled")
  filled=$target
  token=$(sed -n 's/.* token=//p' <<<"$fill")
  hits=$(cache_lookups "$ADMINH" hit); all=$(cache_lookups "$ADMINH")
  out=$(wrk -t1 -c64 -d"$DUR" --latency -H "Authorization: Bearer $token" "http://127.0.0.1:$GWH$U")
  hits2=$(cache_lookups "$ADMINH" hit); all2=$(cache_lookups "$ADMINH")
  rss=$(rss_mib "$gwh_pid")
  awk -v n="$target" -v rss="$rss" -v rss0="$rss0" -v rps="$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
      -v p99="$(awk '$1=="99%" {print $2}' <<<"$out" | to_ms)" -v h=$((hits2 - hits)) -v a=$((all2 - all)) -v f="$fill" \
    'BEGIN { printf "| %d | %d | %.0f | %.0f | %.2f | %.4f |\n", n, rss, (rss - rss0) * 1048576 / n, rps, p99, (a > 0 ? h / a : 0) }' >>"$growth"
  grep -q " ok=$((target - before_fill)) " <<<"$fill" || { echo "bench: fill to $target: ${fill% token=*}" >&2; exit 1; }
done

memory=$(./target/release/examples/bench_cache_memory "$CACHE_N" identities)
memory_refusals=$(./target/release/examples/bench_cache_memory "$CACHE_N" refusals)
memory_moka=$(./target/release/examples/bench_cache_memory "$CACHE_N" moka-refusals)
jwt=$(./target/release/examples/bench_jwt "$JWT_N")

echo
echo "matrix-oidc-gateway benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -m)$($smoke && echo ', SMOKE (not for conclusions)')"
echo
table
echo
echo "- 1,000 concurrent first requests of one token: $first, introspections: $intros"
echo "- sustained, 10,000 tokens through a 5,000-entry cache: $sustained req/s, introspections: $sustained_intros ($sustained_rate/s), hit ratio $sustained_ratio"
echo
echo "Cost growth (gateway in jwt mode, HS256 tokens; RSS of the whole process, per identity over the empty gateway's $rss0 MiB):"
echo
cat "$growth"
echo
echo "- $memory"
echo "- $memory_refusals (the cache's own cost per entry)"
echo "- $memory_moka (the same in moka, as before)"
echo "- $jwt"
echo "- load-test kit: $kit"
