#!/usr/bin/env bash
# Quickstart: a real OpenID Provider (oidc-provider), a real homeserver (Dendrite, which has no
# OIDC support of its own) and the gateway in front of it, all on loopback. Mints a token for
# alice through the authorization-code + PKCE flow and makes Matrix requests through the gateway.
#
#   scripts/quickstart.sh          # keeps everything running until Ctrl-C
#   scripts/quickstart.sh --once   # shows the requests, then stops everything
set -euo pipefail
cd "$(dirname "$0")/.."
once=false
[ "${1:-}" = "--once" ] && once=true

# Fixed loopback ports (override any of them in the environment). The gateway is not on 8008:
# that is Synapse's default, and a Synapse already running there would answer instead.
OP_PORT=${OP_PORT:-9400}
HS_PORT=${HS_PORT:-9401}
ADMIN_PORT=${ADMIN_PORT:-9402}
GW_PORT=${GW_PORT:-9403}
PEER_CACHE=${PEER_CACHE:-/var/cache/matrix-oidc-gateway}
export PEER_CACHE
work=.e2e/quickstart

# Each step prints one line when it is done: its name and how long it took.
step_name=""
step_started=""
step() {
  step_done
  step_name=$1
  step_started=$EPOCHREALTIME
}
step_done() {
  [ -n "$step_name" ] || return 0
  awk -v a="$step_started" -v b="$EPOCHREALTIME" -v n="$step_name" 'BEGIN { printf "== %-62s %6.1f s\n", n, b - a }'
  step_name=""
}

# Every port must be free before anything starts: a port in use would otherwise show up much
# later, as an OP error page or a gateway that cannot bind.
taken=()
for spec in "OP_PORT=$OP_PORT" "HS_PORT=$HS_PORT" "ADMIN_PORT=$ADMIN_PORT" "GW_PORT=$GW_PORT"; do
  port=${spec#*=}
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then taken+=("$spec"); fi
done
if [ "${#taken[@]}" -gt 0 ]; then
  for spec in "${taken[@]}"; do
    echo "quickstart: port ${spec#*=} (${spec%%=*}) is already in use on 127.0.0.1; stop what listens there or run with ${spec%%=*}=<free port>" >&2
  done
  exit 1
fi

rm -rf "$work"
mkdir -p "$work/dendrite"

step "installing what the quickstart needs (scripts/setup.sh)"
scripts/setup.sh
step "installing Dendrite v0.13.8 (cached in $PEER_CACHE)"
scripts/peers/install-dendrite.sh
step "building the gateway (release)"
cargo build --release --quiet

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

wait_port() {
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "quickstart: nothing listens on port $1 ($2); see $work/*.log" >&2
  exit 1
}

as_token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
# The key that seals the upstream device tokens at rest (store.encryption_key_file).
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/store.key"
chmod 600 "$work/store.key"
step "starting the OpenID Provider (oidc-provider) on :$OP_PORT"
(cd tests/e2e/op && exec node op.mjs --port "$OP_PORT") >"$work/op.log" 2>&1 &
pids+=($!)
wait_port "$OP_PORT" "OP"
step "starting Dendrite on :$HS_PORT (the gateway: its application service)"
scripts/peers/dendrite-config.sh "$work/dendrite" "$as_token" >/dev/null
(cd "$work/dendrite" && exec "$PEER_CACHE/dendrite-v0.13.8/bin/dendrite" -config dendrite.yaml \
  -http-bind-address "127.0.0.1:$HS_PORT") >"$work/dendrite.log" 2>&1 &
pids+=($!)
wait_port "$HS_PORT" "Dendrite"

cat >"$work/gateway.toml" <<TOML
[listen]
public = "127.0.0.1:$GW_PORT"
admin = "127.0.0.1:$ADMIN_PORT"

[homeserver]
url = "http://127.0.0.1:$HS_PORT"
server_name = "localhost"
kind = "dendrite"
binding = "appservice_login"
as_token = "$as_token"

[store]
path = "$PWD/$work/state.sqlite3"
encryption_key_file = "$PWD/$work/store.key"

[discovery]
public_base_url = "http://127.0.0.1:$GW_PORT"

[[issuers]]
issuer = "http://127.0.0.1:$OP_PORT"
client_id = "gateway"
client_secret = "gateway-secret"
TOML
step "starting the gateway on :$GW_PORT (admin :$ADMIN_PORT)"
./target/release/matrix-oidc-gateway --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
pids+=($!)
wait_port "$GW_PORT" "gateway"

step "minting a token for alice (authorization code + PKCE at the OP)"
token=$(cd tests/e2e/op && node mint.mjs --issuer "http://127.0.0.1:$OP_PORT" --user alice \
  --scope "urn:matrix:client:api:* urn:matrix:client:device:QUICKSTART" |
  node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).access_token))')
step_done

show() {
  echo
  echo "\$ $1"
  shift
  curl -sS "$@"
  echo
}
show "curl -H 'Authorization: Bearer <alice>' http://127.0.0.1:$GW_PORT/_matrix/client/v3/account/whoami" \
  -H "Authorization: Bearer $token" "http://127.0.0.1:$GW_PORT/_matrix/client/v3/account/whoami"
show "curl -X POST -H 'Authorization: Bearer <alice>' http://127.0.0.1:$GW_PORT/_matrix/client/v3/createRoom -d '{\"name\":\"quickstart\"}'" \
  -X POST -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  -d '{"name":"quickstart"}' "http://127.0.0.1:$GW_PORT/_matrix/client/v3/createRoom"
show "curl http://127.0.0.1:$GW_PORT/_matrix/client/v3/account/whoami    # no token" \
  "http://127.0.0.1:$GW_PORT/_matrix/client/v3/account/whoami"
show "curl -X POST http://127.0.0.1:$GW_PORT/_matrix/client/v3/login    # password login belongs to the OP now" \
  -X POST -d '{}' "http://127.0.0.1:$GW_PORT/_matrix/client/v3/login"
show "curl http://127.0.0.1:$GW_PORT/_matrix/client/v1/auth_metadata    # where clients find the OP" \
  "http://127.0.0.1:$GW_PORT/_matrix/client/v1/auth_metadata" -o /dev/null -w "HTTP %{http_code}\n"
echo
if $once; then
  echo "quickstart: OK"
  exit 0
fi
echo "Try it yourself (token valid for 10 minutes):"
echo "  curl -H 'Authorization: Bearer $token' http://127.0.0.1:$GW_PORT/_matrix/client/v3/sync"
echo "Logs: $work/*.log. Ctrl-C stops everything."
wait
