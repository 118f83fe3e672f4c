#!/usr/bin/env bash
# Builds real Dendrite (github.com/matrix-org/dendrite, from the Go module proxy) once and caches
# the binaries outside the clone: $PEER_CACHE/dendrite-<version>/bin. Idempotent.
set -euo pipefail
VERSION=${DENDRITE_VERSION:-v0.13.8}
PEER_CACHE=${PEER_CACHE:-/var/cache/matrix-oidc-gateway}
dest="$PEER_CACHE/dendrite-$VERSION/bin"
if [ -x "$dest/dendrite" ] && [ -x "$dest/generate-keys" ] && [ -x "$dest/generate-config" ]; then
  echo "dendrite $VERSION: cached in $dest"
  exit 0
fi
[ -x /usr/local/go/bin/go ] && PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "install-dendrite: Go is required" >&2; exit 1; }
mkdir -p "$dest"
echo "dendrite $VERSION: building with $(go version | cut -d' ' -f3) (cgo for sqlite)"
start=$(date +%s)
CGO_ENABLED=1 GOBIN="$dest" GOFLAGS=-mod=mod go install \
  "github.com/matrix-org/dendrite/cmd/dendrite@$VERSION" \
  "github.com/matrix-org/dendrite/cmd/generate-keys@$VERSION" \
  "github.com/matrix-org/dendrite/cmd/generate-config@$VERSION"
echo "dendrite $VERSION: built in $(( $(date +%s) - start )) s into $dest"
