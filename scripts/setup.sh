#!/usr/bin/env bash
# Installs everything the build, the tests and the quickstart need, from scratch, idempotently:
# Debian packages (as root), the Node packages of the e2e OpenID Provider.
# Called by scripts/test.sh and scripts/quickstart.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in cmake pkg-config build-essential curl redis-server prometheus; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages: ${need_apt[*]} (run as root or install them)" >&2
    exit 1
  fi
  echo "setup: installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: Rust (cargo) is required" >&2; exit 1; }
command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || { echo "setup: Go is required (to build Dendrite)" >&2; exit 1; }
command -v node >/dev/null || { echo "setup: Node.js 20+ is required" >&2; exit 1; }
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 20 ] || { echo "setup: Node.js 20+ is required (found $(node --version))" >&2; exit 1; }

if [ ! -d tests/e2e/op/node_modules/oidc-provider ] || [ tests/e2e/op/package-lock.json -nt tests/e2e/op/node_modules ]; then
  echo "setup: installing the e2e OpenID Provider (npm ci)"
  (cd tests/e2e/op && npm ci --no-audit --no-fund --loglevel=error)
fi
if [ ! -d tests/e2e/sdk-js/node_modules/matrix-js-sdk ] || [ tests/e2e/sdk-js/package-lock.json -nt tests/e2e/sdk-js/node_modules ]; then
  echo "setup: installing matrix-js-sdk for the SDK end-to-end suite (npm ci)"
  # matrix-js-sdk asks for Node 22 in its engines field; the parts the suite uses run on 20.
  (cd tests/e2e/sdk-js && npm ci --no-audit --no-fund --loglevel=error --engine-strict=false)
fi
echo "setup: done"
