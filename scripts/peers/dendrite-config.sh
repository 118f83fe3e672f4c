#!/usr/bin/env bash
# Writes a loopback Dendrite set-up into DIR: signing key, the gateway's appservice registration
# and dendrite.yaml (sqlite, registration and guests disabled, no federation key fetching), and
# a fresh random registration shared secret in DIR/registration_shared_secret (generate-config's
# CI default is a well-known word), with which an admin account can be created.
# Used by the quickstart and the end-to-end suites.
#
#   scripts/peers/dendrite-config.sh DIR AS_TOKEN [SERVER_NAME]
set -euo pipefail
dir=$(cd "$1" && pwd)
as_token=$2
server_name=${3:-localhost}
PEER_CACHE=${PEER_CACHE:-/var/cache/matrix-oidc-gateway}
bin="$PEER_CACHE/dendrite-${DENDRITE_VERSION:-v0.13.8}/bin"
[ -x "$bin/dendrite" ] || { echo "dendrite-config: run scripts/peers/install-dendrite.sh first" >&2; exit 1; }

"$bin/generate-keys" --private-key "$dir/matrix_key.pem" >/dev/null
cat >"$dir/appservice.yaml" <<YAML
id: matrix-oidc-gateway
url: null
as_token: "$as_token"
hs_token: "unused-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
sender_localpart: oidc-gateway
rate_limited: false
namespaces:
  users:
    - exclusive: true
      regex: '@.*:$(printf '%s' "$server_name" | sed 's/\./\\\\./g')'
  aliases: []
  rooms: []
YAML
"$bin/generate-config" -ci -server "$server_name" -dir "$dir" >"$dir/dendrite.yaml.generated"
# The generated file's shape is pinned by the Dendrite version; fail loudly if it changes.
for key in '  registration_shared_secret: complement' '  config_files: \[\]' '  registration_disabled: false' '  guests_disabled: false' '  private_key: matrix_key.pem' '  level: trace'; do
  grep -q "^$key\$" "$dir/dendrite.yaml.generated" || { echo "dendrite-config: generated config has no '$key'" >&2; exit 1; }
done
shared_secret=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '%s' "$shared_secret" >"$dir/registration_shared_secret"
sed -e "s|^  registration_shared_secret: complement\$|  registration_shared_secret: $shared_secret|" \
    -e "s|^  config_files: \[\]\$|  config_files: [$dir/appservice.yaml]|" \
    -e 's|^  registration_disabled: false$|  registration_disabled: true|' \
    -e 's|^  guests_disabled: false$|  guests_disabled: true|' \
    -e "s|^  private_key: matrix_key.pem\$|  private_key: $dir/matrix_key.pem|" \
    -e 's|^  level: trace$|  level: info|' \
    "$dir/dendrite.yaml.generated" >"$dir/dendrite.yaml"
echo "$dir/dendrite.yaml"
