#!/usr/bin/env bash
# Create a SoftHSM2 token under a local state directory, for development, tests and CI.
#
#   hsm/softhsm-init.sh STATE_DIR [TOKEN_LABEL]
#
# Writes STATE_DIR/softhsm2.conf (tokens in STATE_DIR/tokens), a random user PIN in
# STATE_DIR/user.pin and SO PIN in STATE_DIR/so.pin (mode 0600), and initializes the token
# (default label "warden"). Idempotent: an existing token with that label is kept.
# Prints the SOFTHSM2_CONF line to export.
set -euo pipefail

state=${1:?usage: softhsm-init.sh STATE_DIR [TOKEN_LABEL]}
label=${2:-warden}
mkdir -p "$state/tokens"
state=$(cd "$state" && pwd)
umask 077

conf="$state/softhsm2.conf"
if [ ! -f "$conf" ]; then
  cat >"$conf" <<CONF
directories.tokendir = $state/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
fi
export SOFTHSM2_CONF="$conf"

random_pin() { od -An -N8 -tx1 /dev/urandom | tr -d ' \n'; }
[ -s "$state/user.pin" ] || random_pin >"$state/user.pin"
[ -s "$state/so.pin" ] || random_pin >"$state/so.pin"

if softhsm2-util --show-slots 2>/dev/null | grep -Eq "Label:[[:space:]]+$label[[:space:]]*\$"; then
  echo "token '$label' already present in $state/tokens" >&2
else
  softhsm2-util --init-token --free --label "$label" \
    --pin "$(cat "$state/user.pin")" --so-pin "$(cat "$state/so.pin")" >/dev/null
  echo "token '$label' initialized in $state/tokens" >&2
fi
echo "export SOFTHSM2_CONF=$conf"
