#!/usr/bin/env bash
# The whole test suite from a fresh machine: installs what the tests need, then lint, unit,
# in-process integration and end-to-end tests (real oidc-provider, built gateway binary).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

scripts/setup.sh
# Real homeservers for the end-to-end suites, cached outside the clone ($PEER_CACHE).
scripts/peers/install-synapse.sh
scripts/peers/install-dendrite.sh
scripts/peers/install-tools.sh
# Element X's SDK as a test client (matrix-sdk, built once per version of its sources).
scripts/peers/install-sdk-client.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets --features e2e -- -D warnings"
cargo clippy --all-targets --features e2e --quiet -- -D warnings
echo "== cargo test --features e2e (unit, in-process and end-to-end suites)"
cargo test --all-targets --features e2e --no-fail-fast
echo "== fuzzing (each target ${FUZZ_SECONDS:-20} s from the committed corpus)"
scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
