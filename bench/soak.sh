#!/usr/bin/env bash
# Soak: mixed load on two replicas sharing Redis while the OP, the homeserver and Redis are
# restarted; stops by itself and fails when a sign-out is lost, an answer is an unannounced
# error, or RSS or open file descriptors keep growing (bench/soak.py says exactly what counts).
#
#   bench/soak.sh            # 10 minutes: outages at 1/6, 3/6 and 5/6 of the run (for people)
#   bench/soak.sh --smoke    # 60 s with the same outages (CI)
#
# On loopback: bench/op_stub.py as the OP, nginx as the homeserver (the `headers` binding),
# redis-server with an append-only file (restarts keep the shared state, as in production), two
# release gateways with `backend = "redis"`.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true
if $smoke; then DUR=60; DOWN=3; else DUR=600; DOWN=10; fi
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_install
command -v redis-server >/dev/null || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
}
cargo build --release --quiet --bin matrix-oidc-gateway
BIN=$PWD/target/release/matrix-oidc-gateway
ADMIN_TOKEN=soak-admin-token-0123456789abcdef

bench_workdir
HS=$(free_port); OP=$(free_port); REDIS=$(free_port)
mkdir -p "$work/redis"
write_nginx_conf hs "$(static_json_server "$HS" '{"next_batch":"s1"}')"
# The outages' commands (run by bench/soak.py through /bin/sh).
START_HS="nginx -c $work/hs.conf -p $work"
STOP_HS="nginx -c $work/hs.conf -p $work -s stop; while [ -f $work/hs.pid ]; do sleep 0.05; done"
START_OP="python3 bench/op_stub.py $OP >/dev/null 2>&1 & echo \$! >$work/op.pid"
STOP_OP="kill \$(cat $work/op.pid)"
START_REDIS="redis-server --port $REDIS --bind 127.0.0.1 --save '' --appendonly yes --appendfsync always --dir $work/redis --daemonize yes --pidfile $work/redis.pid --logfile $work/redis.log"
STOP_REDIS="redis-cli -p $REDIS shutdown >/dev/null 2>&1; while [ -f $work/redis.pid ]; do sleep 0.05; done"
sh -c "$START_HS"; sh -c "$START_OP"; sh -c "$START_REDIS"
wait_port "$HS"; wait_port "$OP"; wait_port "$REDIS"
cleanup_soak() {
  sh -c "$STOP_HS" 2>/dev/null || true
  sh -c "$STOP_OP" 2>/dev/null || true
  sh -c "$STOP_REDIS" 2>/dev/null || true
  bench_cleanup
}
trap cleanup_soak EXIT INT TERM

replicas=(); admins=(); gw_pids=()
for r in 1 2; do
  port=$(free_port); admin=$(free_port)
  mkdir -p "$work/r$r"
  cat >"$work/r$r/gateway.toml" <<TOML
[listen]
public = "127.0.0.1:$port"
admin = "127.0.0.1:$admin"
threads = 1
[homeserver]
url = "http://127.0.0.1:$HS"
server_name = "example.org"
binding = "headers"
[store]
backend = "redis"
encryption_key = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
[redis]
urls = ["redis://127.0.0.1:$REDIS"]
[[issuers]]
issuer = "http://127.0.0.1:$OP/"
introspection_endpoint = "http://127.0.0.1:$OP/introspect"
client_id = "soak"
client_secret = "soak"
[admin]
token = "$ADMIN_TOKEN"
[log]
level = "warn"
TOML
  "$BIN" --check-config --config "$work/r$r/gateway.toml" >/dev/null
  "$BIN" --config "$work/r$r/gateway.toml" >"$work/r$r/gateway.log" 2>&1 &
  pids+=($!); gw_pids+=($!)
  replicas+=("127.0.0.1:$port"); admins+=("127.0.0.1:$admin")
  wait_port "$port"
done

echo "soak — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, ${DUR} s, two replicas$($smoke && echo ', SMOKE')"
SOAK_STOP_OP=$STOP_OP SOAK_START_OP=$START_OP \
SOAK_STOP_HOMESERVER=$STOP_HS SOAK_START_HOMESERVER=$START_HS \
SOAK_STOP_REDIS=$STOP_REDIS SOAK_START_REDIS=$START_REDIS \
python3 bench/soak.py \
  --replicas "$(IFS=,; echo "${replicas[*]}")" \
  --admins "$(IFS=,; echo "${admins[*]}")" \
  --pids "$(IFS=,; echo "${gw_pids[*]}")" \
  --admin-token "$ADMIN_TOKEN" \
  --duration "$DUR" \
  --outage "$(( DUR / 6 )):op:$DOWN" \
  --outage "$(( DUR / 2 )):homeserver:$DOWN" \
  --outage "$(( DUR * 5 / 6 )):redis:$DOWN" || {
    status=$?
    for r in 1 2; do echo "--- replica $r log (tail)"; tail -20 "$work/r$r/gateway.log"; done >&2
    exit "$status"
  }
