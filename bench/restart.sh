#!/usr/bin/env bash
# Restart benchmark: does replacing the gateway under load fail a request?
#
#   bench/restart.sh            # 3 runs of each, 12 s of load
#   bench/restart.sh --smoke    # 1 run of each, 6 s (CI)
#
# On loopback: nginx as the homeserver, bench/op_stub.py as the OP, the release gateway (one
# worker thread), wrk -t1 -c64 with one valid token, requests without pause.
#   reload    wrk -> gateway; a third of the way in, `matrix-oidc-gateway --reload` (systemd's
#             ExecReload): a new process takes the listening sockets over, the old one drains
#             and exits.
#   rolling   wrk -> nginx load balancer (the role of a Kubernetes Service: keep-alive to the
#             replicas, proxy_next_upstream on connection errors) -> two gateway replicas; each
#             replica in turn gets SIGTERM, drains, exits and is started again, and the next one
#             is only stopped once the restarted one answers /readyz.
# Prints requests, failures (wrk's socket errors plus non-2xx answers) and req/s per run; exits
# non-zero when any request failed.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true
if $smoke; then DUR=6; RUNS=1; else DUR=12; RUNS=3; fi
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_install
cargo build --release --quiet --bin matrix-oidc-gateway
BIN=$PWD/target/release/matrix-oidc-gateway

bench_workdir
UP=$(free_port); OP=$(free_port); LB=$(free_port)
write_nginx_conf nginx "$(static_json_server "$UP" '{"ok":true}')
  include $work/lb.conf;"
: >"$work/lb.conf"

# gateway_config NAME PORT ADMIN: a replica's configuration (own store and runtime directory).
gateway_config() {
  mkdir -p "$work/$1"
  {
    gateway_toml "$2" "$3" "$(introspection_issuer)" "runtime_dir = \"$work/$1/run\"
shutdown_grace = \"10s\""
    printf '[log]\nlevel = "warn"\n'
  } >"$work/$1/gateway.toml"
}
# start_gateway NAME: starts a replica in the background, logging to NAME/gateway.log.
start_gateway() {
  "$BIN" --config "$work/$1/gateway.toml" >>"$work/$1/gateway.log" 2>&1 &
  pids+=($!)
  echo $! >"$work/$1/pid"
}
wait_ready() {
  for _ in $(seq 1 200); do
    curl -sf -o /dev/null "http://127.0.0.1:$1/readyz" && return 0
    sleep 0.05
  done
  echo "restart: replica on admin port $1 never became ready" >&2
  exit 1
}
wait_gone() {
  for _ in $(seq 1 400); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.05; done
  echo "restart: pid $1 still runs" >&2
  exit 1
}
# failures FILE: socket errors plus non-2xx answers in one wrk output.
failures() {
  awk '/Socket errors/ {gsub(/,/, ""); s += $4 + $6 + $8 + $10}
       /Non-2xx/ {s += $NF}
       END {print s + 0}' "$1"
}
requests() { awk '/requests in/ {print $1}' "$1"; }
rps() { awk '/Requests\/sec/ {printf "%.0f", $2}' "$1"; }

python3 bench/op_stub.py "$OP" >/dev/null 2>&1 &
pids+=($!)
A=$(free_port); A_ADMIN=$(free_port)
R1=$(free_port); R1_ADMIN=$(free_port); R2=$(free_port); R2_ADMIN=$(free_port)
gateway_config a "$A" "$A_ADMIN"
gateway_config r1 "$R1" "$R1_ADMIN"
gateway_config r2 "$R2" "$R2_ADMIN"
cat >"$work/lb.conf" <<NGINX
upstream replicas {
  server 127.0.0.1:$R1 max_fails=0;
  server 127.0.0.1:$R2 max_fails=0;
  keepalive 64;
}
server {
  listen 127.0.0.1:$LB;
  location / {
    proxy_pass http://replicas;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_next_upstream error timeout;
  }
}
NGINX
nginx -c "$work/nginx.conf" -p "$work"
wait_port "$UP"; wait_port "$OP"; wait_port "$LB"
start_gateway a; start_gateway r1; start_gateway r2
wait_ready "$A_ADMIN"; wait_ready "$R1_ADMIN"; wait_ready "$R2_ADMIN"
PATH_Q=/_matrix/client/v3/sync
for port in "$A" "$LB"; do
  curl -s -o /dev/null -H "Authorization: Bearer good-token" "http://127.0.0.1:$port$PATH_Q"
done

rows="$work/rows"
: >"$rows"
load() { wrk -t1 -c64 -d"${DUR}s" -H "Authorization: Bearer good-token" "http://127.0.0.1:$1$PATH_Q" >"$2" 2>&1; }
for run in $(seq 1 "$RUNS"); do
  # reload
  load "$A" "$work/reload.out" &
  wrk_pid=$!
  sleep "$(( DUR / 3 ))"
  old=$(cat "$work/a/run/gateway.pid")
  "$BIN" --config "$work/a/gateway.toml" --reload >>"$work/a/gateway.log" 2>&1
  new=$(cat "$work/a/run/gateway.pid")
  pids+=("$new")
  wait_gone "$old"
  wait "$wrk_pid" || true
  echo "reload $(requests "$work/reload.out") $(failures "$work/reload.out") $(rps "$work/reload.out")" >>"$rows"

  # rolling restart of two replicas behind the load balancer
  load "$LB" "$work/rolling.out" &
  wrk_pid=$!
  sleep 1
  for r in r1 r2; do
    admin_port=$([ "$r" = r1 ] && echo "$R1_ADMIN" || echo "$R2_ADMIN")
    pid=$(cat "$work/$r/pid")
    kill -TERM "$pid"
    wait_gone "$pid"
    start_gateway "$r"
    wait_ready "$admin_port"
    sleep 0.5
  done
  wait "$wrk_pid" || true
  echo "rolling $(requests "$work/rolling.out") $(failures "$work/rolling.out") $(rps "$work/rolling.out")" >>"$rows"
done

echo
echo "restart benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, wrk -t1 -c64 -d${DUR}s$($smoke && echo ', SMOKE (not for conclusions)')"
echo
echo "| scenario | requests | failed | req/s |"
echo "|---|---:|---:|---:|"
awk '{printf "| %s | %d | %d | %d |\n", $1, $2, $3, $4}' "$rows"
failed=$(awk '{s += $3} END {print s + 0}' "$rows")
if [ "$failed" -gt 0 ]; then
  echo "restart: $failed requests failed" >&2
  tail -5 "$work/reload.out" "$work/rolling.out" >&2
  exit 1
fi
