#!/usr/bin/env bash
# nfv-warden quick start on a fresh Debian 12 machine (README, command 1).
#
# Installs the system packages, builds warden, creates a SoftHSM token, a PIN file, a config
# and the store (`warden store init`) under ./state (or $WARDEN_STATE), makes the CA key and
# root and the agent's TLS key and certificate inside the token, checks everything, then runs
# `warden serve` on https://127.0.0.1:8443 until Ctrl-C. Idempotent: a second run reuses what
# exists (the store is created only when the file does not exist).
#
# WARDEN_TPM=1 also starts a private swtpm (Unix socket under the state dir, stopped by PID
# on exit) and adds it as the TPM backend. WARDEN_LISTEN=addr:port changes the address.
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)
state=${WARDEN_STATE:-$here/state}
listen=${WARDEN_LISTEN:-127.0.0.1:8443}

need_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=$(grep -v '^#' .ci/packages | while read -r p; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  echo "== installing: $missing"
  need_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # shellcheck disable=SC2086
  need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }

echo "== building warden (release)"
cargo build --release --locked --bin warden
warden="$here/target/release/warden"

echo "== SoftHSM token under $state"
eval "$(hsm/softhsm-init.sh "$state" warden)"

tpm_backend=""
if [ "${WARDEN_TPM:-0}" = 1 ]; then
  tcti=$(tpm/swtpm-start.sh "$state/swtpm" "${WARDEN_TPM_PORT:-2321}")
  trap 'tpm/swtpm-stop.sh "$state/swtpm"' EXIT
  tpm_backend=$(printf '\n[[backend]]\ntype = "tpm"\ntcti = "%s"\n' "$tcti")
fi

# A demo VNFM identity (the VNFM's side, so openssl and files): a root for VNFM client
# certificates and one client certificate, consumer "vnfm-demo" of trust domain "demo".
if [ ! -f "$state/vnfm-demo.pem" ]; then
  (cd "$state" && umask 077 &&
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout vnfm-root.key \
      -out vnfm-root.pem -subj /CN=quickstart-vnfm-root -days 365 2>/dev/null &&
    printf 'subjectAltName=DNS:vnfm-demo\nextendedKeyUsage=clientAuth\n' >vnfm-demo.ext &&
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout vnfm-demo.key \
      -out vnfm-demo.csr -subj /CN=vnfm-demo 2>/dev/null &&
    openssl x509 -req -in vnfm-demo.csr -CA vnfm-root.pem -CAkey vnfm-root.key -CAcreateserial \
      -days 365 -extfile vnfm-demo.ext -out vnfm-demo.pem 2>/dev/null)
fi

config="$state/warden.toml"
cat >"$config" <<CONF
# Written by quickstart.sh; see systemd/warden.toml for every key and its default.
[[backend]]
type = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "warden"
pin = { file = "$state/user.pin" }
$tpm_backend
[store]
path = "$state/warden.redb"

[server]
listen = "$listen"
tls_key = "pkcs11:token=warden;object=warden-tls"
tls_certificate = "$state/tls-chain.pem"

[ca]
key = "pkcs11:token=warden;object=warden-ca"
certificate = "$state/ca.pem"

[cmf]
client_ca = "$state/vnfm-root.pem"

# The demo VNFM's trust domain: the names it may register (README "Names and trust domains").
[[cmf.trust_domain]]
id = "demo"
dns_suffixes = ["vnf.example"]
vnfc_id_patterns = ["vnfc-*"]
ip_ranges = ["192.0.2.0/24"]
cas = ["default"]

[[cmf.consumer]]
id = "vnfm-demo"
trust_domain = "demo"
CONF

# Only `store init` creates the store; serve and the other commands refuse a missing one.
if [ ! -e "$state/warden.redb" ]; then
  "$warden" --config "$config" store init
fi
if [ ! -f "$state/ca.pem" ]; then
  "$warden" --config "$config" ca init --subject "CN=nfv-warden quickstart CA,O=nfv-warden"
fi
if [ ! -f "$state/tls-chain.pem" ]; then
  "$warden" --config "$config" tls init --san localhost --san 127.0.0.1
fi
"$warden" --config "$config" check

echo "== warden serve (Ctrl-C stops it); try:"
echo "   curl --cacert $state/ca.pem https://localhost:${listen##*:}/healthz"
echo "   and the VNFM walkthrough in README.md (Certificate Management Function)"
# Run serve as a child and pass Ctrl-C / SIGTERM on to it by its PID, so the EXIT trap
# (swtpm) runs after warden has drained and stopped.
"$warden" --config "$config" serve &
serve_pid=$!
trap 'kill -TERM "$serve_pid" 2>/dev/null' INT TERM
status=0
wait "$serve_pid" || status=$?
if [ "$status" -gt 128 ]; then # interrupted by the trap: wait for warden itself
  status=0
  wait "$serve_pid" || status=$?
fi
exit "$status"
