#!/usr/bin/env bash
# Installs real Synapse from PyPI (wheels only) into a venv cached outside the clone:
# $PEER_CACHE/synapse-venv. Idempotent.
set -euo pipefail
PEER_CACHE=${PEER_CACHE:-/var/cache/matrix-oidc-gateway}
VERSION=${SYNAPSE_VERSION:-1.163.2}
venv="$PEER_CACHE/synapse-venv"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import synapse, sys; sys.exit(0 if synapse.__version__ == '$VERSION' else 1)" 2>/dev/null; then
  echo "synapse $VERSION: cached in $venv"
  exit 0
fi
mkdir -p "$PEER_CACHE"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --only-binary=:all: "matrix-synapse==$VERSION"
echo "synapse $VERSION: installed in $venv"
