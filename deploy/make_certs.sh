#!/usr/bin/env bash
# Makes a certificate authority and the certificates a kvcache cluster needs
# for TLS and mutual TLS, with Debian's openssl:
#
#   deploy/make_certs.sh DIR [--node NAME [--san DNS_OR_IP]...]...
#                            [--client NAME]... [--expired NAME] [--days N]
#
# DIR/ca.crt, DIR/ca.key    the CA (made once; reused when DIR already has
#                           one, so certificates can be added later)
# DIR/NAME.crt, NAME.key    for each --node: a certificate for serving and for
#                           dialling peers (server and client use), CN=NAME,
#                           with subject alternative names NAME, localhost,
#                           127.0.0.1 and each --san after it (an IPv4 address
#                           or a DNS name)
#                           for each --client: a client certificate, CN=NAME
#                           (the identity a node sees, e.g. a tenant or
#                           "admin")
#                           for --expired: a node certificate that expired
#                           in 2021, for tests
#
# Keys are EC P-256, readable by their owner only. Certificates last --days
# (default 365). In Kubernetes, put them into Secrets, e.g.
#   kubectl create secret generic kvcache-node-tls --from-file=ca.crt \
#     --from-file=tls.crt=DIR/node.crt --from-file=tls.key=DIR/node.key
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -ge 1 && $1 != -* ]] || usage
dir=$1
shift
days=365
# Each entry: kind|name|extra SANs (comma-separated).
requests=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --node | --client | --expired)
      [[ $# -ge 2 && $2 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
        { echo "make_certs.sh: $1 needs a name of letters, digits, . _ -" >&2; exit 2; }
      requests+=("${1#--}|$2|")
      shift 2
      ;;
    --san)
      [[ $# -ge 2 && ${#requests[@]} -gt 0 && ${requests[-1]} == node\|* ]] ||
        { echo "make_certs.sh: --san must follow --node NAME" >&2; exit 2; }
      requests[-1]+="$2,"
      shift 2
      ;;
    --days)
      [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] ||
        { echo "make_certs.sh: --days needs a positive number" >&2; exit 2; }
      days=$2
      shift 2
      ;;
    *) usage ;;
  esac
done

mkdir -p "$dir"
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

new_key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1"; }

if [[ ! -f $dir/ca.crt || ! -f $dir/ca.key ]]; then
  new_key "$dir/ca.key"
  openssl req -x509 -new -key "$dir/ca.key" -sha256 -days $((days * 10)) \
    -subj "/O=kvcache/CN=kvcache CA $(basename "$dir")" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$dir/ca.crt" 2>/dev/null
  chmod 644 "$dir/ca.crt"
  echo "make_certs.sh: CA $dir/ca.crt"
fi

# Subject alternative names for a node: its name, localhost, 127.0.0.1 and
# the extra ones, each written as IP: or DNS: as it looks.
node_sans() {
  local name=$1 extra=$2 san out="DNS:$name,DNS:localhost,IP:127.0.0.1"
  IFS=, read -ra extras <<<"$extra"
  for san in "${extras[@]}"; do
    if [[ $san =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
      out+=",IP:$san"
    else
      out+=",DNS:$san"
    fi
  done
  echo "$out"
}

for request in "${requests[@]}"; do
  IFS='|' read -r kind name extra <<<"$request"
  key=$dir/$name.key
  crt=$dir/$name.crt
  ext=$work/$name.ext
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [[ $kind == client ]]; then
      echo "extendedKeyUsage=clientAuth"
    else
      # Nodes serve clients and dial their peers with the same certificate.
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$(node_sans "$name" "$extra")"
    fi
  } >"$ext"
  new_key "$key"
  openssl req -new -key "$key" -subj "/O=kvcache/CN=$name" -out "$work/$name.csr"
  if [[ $kind == expired ]]; then
    # `openssl x509` cannot date a certificate in the past; `openssl ca` can.
    mkdir -p "$work/ca"
    : >"$work/ca/index.txt"
    cat >"$work/ca.cnf" <<EOF
[ca]
default_ca = expired
[expired]
database = $work/ca/index.txt
new_certs_dir = $work/ca
serial = $work/ca/serial
default_md = sha256
policy = any
[any]
commonName = supplied
organizationName = optional
EOF
    openssl rand -hex 16 >"$work/ca/serial"
    openssl ca -batch -config "$work/ca.cnf" -cert "$dir/ca.crt" \
      -keyfile "$dir/ca.key" -in "$work/$name.csr" -out "$crt" \
      -startdate 20200101000000Z -enddate 20210101000000Z \
      -extfile "$ext" -notext 2>/dev/null
  else
    openssl x509 -req -in "$work/$name.csr" -CA "$dir/ca.crt" \
      -CAkey "$dir/ca.key" -CAcreateserial -sha256 -days "$days" \
      -extfile "$ext" -out "$crt" 2>/dev/null
  fi
  chmod 644 "$crt"
  echo "make_certs.sh: $kind $crt"
done
rm -f "$dir/ca.srl"
