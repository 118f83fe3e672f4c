#!/usr/bin/env bash
# Quickstart: a real OpenID Provider (oidc-provider), an upstream, and the gateway, all on
# loopback; mints a real token through the authorization-code + PKCE flow and sends a request
# through the gateway.
#
#   scripts/quickstart.sh          # keeps everything running until Ctrl-C
#   scripts/quickstart.sh --once   # shows the request, then stops everything
set -euo pipefail
cd "$(dirname "$0")/.."
once=false
[ "${1:-}" = "--once" ] && once=true

OP_PORT=${OP_PORT:-9400}
UP_PORT=${UP_PORT:-9401}
GW_PORT=${GW_PORT:-8008}
work=.e2e/quickstart
mkdir -p "$work"

scripts/setup.sh
echo "== building the gateway (release)"
cargo build --release --quiet

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "quickstart: nothing listens on port $1 ($2); see $work/*.log" >&2
  exit 1
}

echo "== starting the OpenID Provider on :$OP_PORT"
(cd tests/e2e/op && exec node op.mjs --port "$OP_PORT") >"$work/op.log" 2>&1 &
pids+=($!)
echo "== starting the upstream (header echo) on :$UP_PORT"
python3 scripts/dev/echo_upstream.py "$UP_PORT" >"$work/upstream.log" 2>&1 &
pids+=($!)
wait_port "$OP_PORT" "OP"
wait_port "$UP_PORT" "upstream"

cat >"$work/gateway.toml" <<TOML
[listen]
public = "127.0.0.1:$GW_PORT"

[homeserver]
url = "http://127.0.0.1:$UP_PORT"
server_name = "localhost"

[store]
path = "$PWD/$work/state.sqlite3"

[[issuers]]
issuer = "http://127.0.0.1:$OP_PORT"
client_id = "gateway"
client_secret = "gateway-secret"
TOML
echo "== starting the gateway on :$GW_PORT"
./target/release/matrix-oidc-gateway --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
pids+=($!)
wait_port "$GW_PORT" "gateway"

echo "== minting a token for alice (authorization code + PKCE at the OP)"
token=$(cd tests/e2e/op && node mint.mjs --issuer "http://127.0.0.1:$OP_PORT" --user alice \
  --scope "urn:matrix:client:api:* urn:matrix:client:device:QUICKSTART" |
  node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).access_token))')

echo
echo "\$ curl -s -H 'Authorization: Bearer <token>' http://127.0.0.1:$GW_PORT/_matrix/client/v3/account/whoami"
curl -sS -H "Authorization: Bearer $token" "http://127.0.0.1:$GW_PORT/_matrix/client/v3/account/whoami"
echo
echo "\$ curl -s http://127.0.0.1:$GW_PORT/_matrix/client/v3/account/whoami    # no token"
curl -sS "http://127.0.0.1:$GW_PORT/_matrix/client/v3/account/whoami"
echo
echo
if $once; then
  echo "quickstart: OK"
  exit 0
fi
echo "Try it yourself (token valid for 10 minutes):"
echo "  curl -H 'Authorization: Bearer $token' http://127.0.0.1:$GW_PORT/_matrix/client/v3/sync"
echo "Logs: $work/*.log. Ctrl-C stops everything."
wait
