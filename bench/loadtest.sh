#!/usr/bin/env bash
# Load-test kit: mint a pool of real tokens, then drive the gateway's authenticated path.
#
#   bench/loadtest.sh --gateway http://127.0.0.1:8008 --issuer http://127.0.0.1:9400 --count 50
#   bench/loadtest.sh --gateway URL --tokens tokens.txt --duration 60s --connections 128
#   bench/loadtest.sh --issuer URL --count 50 --mint-only > tokens.txt
#
# Minting drives the authorization-code + PKCE flow of the development OP (tests/e2e/op); for
# Keycloak or MAS write one access token per line into a file and pass --tokens (bench/README.md
# shows how). Each token gets its own device scope, like a real client. Requests cycle through
# the tokens (bench/tokens.lua); the k6 equivalent is bench/k6/authenticated.js.
set -euo pipefail
cd "$(dirname "$0")/.."
gateway="" issuer="http://127.0.0.1:9400" count=20 tokens="" duration="30s" connections=64 mint_only=false
path="/_matrix/client/v3/account/whoami"
while [ $# -gt 0 ]; do
  case "$1" in
    --gateway) gateway=$2; shift 2 ;;
    --issuer) issuer=$2; shift 2 ;;
    --count) count=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --path) path=$2; shift 2 ;;
    --mint-only) mint_only=true; shift ;;
    *) echo "loadtest: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$tokens" ]; then
  tokens=$(mktemp)
  trap 'rm -f "$tokens"' EXIT
  for i in $(seq 1 "$count"); do
    (cd tests/e2e/op && node mint.mjs --issuer "$issuer" --user "load$i" \
      --scope "urn:matrix:client:api:* urn:matrix:client:device:LOAD$(printf '%06d' "$i")") |
      node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).access_token))' >>"$tokens"
  done
  echo "loadtest: minted $(wc -l <"$tokens") tokens at $issuer" >&2
fi
if $mint_only; then
  cat "$tokens"
  exit 0
fi
[ -n "$gateway" ] || { echo "loadtest: --gateway is required" >&2; exit 2; }
command -v wrk >/dev/null || { echo "loadtest: install wrk (apt-get install wrk)" >&2; exit 1; }
TOKENS_FILE="$tokens" wrk -t1 -c"$connections" -d"$duration" --latency -s bench/tokens.lua "$gateway$path"
