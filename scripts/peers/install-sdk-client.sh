#!/usr/bin/env bash
# Builds the matrix-rust-sdk test client (tests/e2e/sdk-rust: Element X's SDK, matrix-sdk 0.19)
# once per version of its sources and caches the binary outside the clone:
# $PEER_CACHE/sdk-client-<hash of its sources>/gateway-e2e-sdk-client. Idempotent; its build
# directory ($PEER_CACHE/sdk-client-target) is kept, so a changed client rebuilds only itself.
set -euo pipefail
cd "$(dirname "$0")/../../tests/e2e/sdk-rust"
PEER_CACHE=${PEER_CACHE:-/var/cache/matrix-oidc-gateway}
hash=$(cat Cargo.toml Cargo.lock src/main.rs | sha256sum | cut -c1-16)
dest="$PEER_CACHE/sdk-client-$hash"
if [ -x "$dest/gateway-e2e-sdk-client" ]; then
  echo "sdk client: cached in $dest"
  exit 0
fi
# matrix-sdk 0.19 needs Rust 1.96: stable when it is that new, else nightly.
toolchain=nightly
if rustc +stable --version | awk '{ split($2, v, "."); exit !(v[1] > 1 || v[2] >= 96) }'; then
  toolchain=stable
fi
rustup toolchain list | grep -q "^$toolchain" || rustup toolchain install "$toolchain" --profile minimal
echo "sdk client: building matrix-sdk with $(rustc +$toolchain --version)"
start=$(date +%s)
CARGO_TARGET_DIR="$PEER_CACHE/sdk-client-target" cargo +"$toolchain" build --locked --quiet
mkdir -p "$dest"
cp "$PEER_CACHE/sdk-client-target/debug/gateway-e2e-sdk-client" "$dest/"
echo "sdk client: built in $(( $(date +%s) - start )) s into $dest"
