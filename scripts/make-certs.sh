#!/usr/bin/env bash
# Makes a test CA and certificates for pmlmig's mutual TLS, plus a token
# file, for a user who has none. Not for production: the CA key sits next to
# the certificates, unencrypted.
#
#   scripts/make-certs.sh DIR [NAME...]
#
# DIR gets (mode 0600 for keys and the token, 0644 for certificates):
#   ca.pem, ca.key           the test CA (10 years, EC P-256)
#   receiver.pem/.key        for 'pmlmig receive': valid for localhost,
#                            127.0.0.1, ::1 and every NAME (host names or IP
#                            addresses the source will connect to)
#   sender.pem/.key          for 'pmlmig run --migrate-to' / 'pmlmig migrate'
#   token                    a random 43-character shared secret (--token-file)
# Then:
#   pmlmig receive --listen HOST:PORT --tls-ca DIR/ca.pem --tls-cert DIR/receiver.pem --tls-key DIR/receiver.key
#   pmlmig run ... --migrate-to HOST:PORT --tls-ca DIR/ca.pem --tls-cert DIR/sender.pem --tls-key DIR/sender.key
set -euo pipefail

usage() { echo "usage: $0 DIR [NAME...]  (NAME: extra host name or IP the receiver is reached at)" >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage ;; esac
dir=$1
shift
if ! command -v openssl >/dev/null; then
  echo "make-certs: installing openssl" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends openssl
fi
mkdir -p "$dir"
umask 077

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san="$san,IP:$name"; else san="$san,DNS:$name"; fi
done

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key "$dir/ca.key"
openssl req -x509 -new -key "$dir/ca.key" -days 3650 -subj "/CN=pmlmig test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$dir/ca.pem" 2>/dev/null

# sign NAME CN EXTENSIONS
sign() {
  local name=$1 cn=$2 ext=$3
  key "$dir/$name.key"
  openssl req -new -key "$dir/$name.key" -subj "/CN=$cn" -out "$dir/$name.csr" 2>/dev/null
  printf '%b' "$ext" >"$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 825 -extfile "$dir/$name.ext" -out "$dir/$name.pem" 2>/dev/null
  rm -f "$dir/$name.csr" "$dir/$name.ext"
}
sign receiver "pmlmig receiver" "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=$san\n"
sign sender "pmlmig sender" "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"
rm -f "$dir/ca.srl"

openssl rand -base64 32 | tr -d '=\n' | tr '+/' '-_' >"$dir/token"
chmod 600 "$dir"/*.key "$dir/token"
chmod 644 "$dir"/*.pem
echo "make-certs: wrote $dir/{ca,receiver,sender}.{pem,key} and $dir/token (receiver valid for ${san//DNS:/}; test use only)"
