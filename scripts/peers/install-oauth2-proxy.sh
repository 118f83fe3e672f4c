#!/usr/bin/env bash
# oauth2-proxy, the benchmark's JWT competitor (bench/run.sh), built with `go install` from the
# Go module proxy at a pinned version into a directory cached outside the clone:
# $PEER_CACHE/oauth2-proxy-<version>/oauth2-proxy. Idempotent; prints the binary's path last.
set -euo pipefail
PEER_CACHE=${PEER_CACHE:-/var/cache/matrix-oidc-gateway}
version=${OAUTH2_PROXY_VERSION:-v7.15.6}
dir="$PEER_CACHE/oauth2-proxy-$version"
if [ -x "$dir/oauth2-proxy" ]; then
  echo "$dir/oauth2-proxy"
  exit 0
fi
command -v go >/dev/null || { echo "oauth2-proxy: needs Go (https://go.dev/dl/)" >&2; exit 1; }
mkdir -p "$dir"
started=$SECONDS
GOBIN="$dir" GOFLAGS=-mod=mod go install "github.com/oauth2-proxy/oauth2-proxy/v7@$version" >&2
echo "oauth2-proxy $version: built in $((SECONDS - started)) s" >&2
echo "$dir/oauth2-proxy"
