#!/usr/bin/env bash
# Puts etcd's v3 API protos, which the cluster's etcd client is generated
# from, into third_party/etcd/proto/ (not committed; Bazel reads them there).
#
# They come from Debian's golang-etcd-server-dev 3.4.23 (the same release as
# the etcd-server the tests run), downloaded as a .deb and unpacked into the
# cache directory; the package is not installed (it depends on hundreds of Go
# packages). The three files are checked against pinned sha256 sums. Safe to
# run again: it downloads only when the cached files are missing or differ.
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${KVCACHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvcache}
src=$cache/etcd-protos
out=third_party/etcd/proto/etcd
package=golang-etcd-server-dev
# Paths under go.etcd.io/etcd in the package, with their sha256 in 3.4.23-4.
declare -A protos=(
  [etcdserver/etcdserverpb/rpc.proto]=a470c957a2aff910febf79379aff13bbcf970b7815a3ec0bfe0d621d9278c478
  [mvcc/mvccpb/kv.proto]=76b0d596ecc8dd1b535be683777910a5b4fe0705fb57baccacfcc7d98d11821e
  [auth/authpb/auth.proto]=443e661f9e423d3376d513e76446e957ae0132c6f63fff4510fde3c7a587be05
)

sha_ok() { [[ -f $1 ]] && echo "$2  $1" | sha256sum --check --status; }

cached() {
  local p
  for p in "${!protos[@]}"; do sha_ok "$src/$p" "${protos[$p]}" || return 1; done
}

if ! cached; then
  echo "setup: fetching etcd's protos from Debian ($package) into $src"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # apt-get download writes into the current directory as the _apt user
  # when run as root; let it, so apt need not fall back to root.
  if [[ $(id -u) -eq 0 ]] && id _apt >/dev/null 2>&1; then chown _apt "$tmp"; fi
  (cd "$tmp" && apt-get download -qq "$package")
  dpkg-deb -x "$tmp"/${package}_*.deb "$tmp/x"
  for p in "${!protos[@]}"; do
    from=$tmp/x/usr/share/gocode/src/go.etcd.io/etcd/$p
    if ! sha_ok "$from" "${protos[$p]}"; then
      echo "setup: $p in $(basename "$tmp"/${package}_*.deb) does not have" \
           "sha256 ${protos[$p]}; check the new version's API and update" \
           "the sums in $0" >&2
      exit 1
    fi
    mkdir -p "$(dirname "$src/$p")"
    cp "$from" "$src/$p"
  done
fi

# The protos carry options for etcd's Go build: gogoproto's code generation
# switches and google.api.http annotations for the JSON gateway. Neither
# changes a message or a method on the wire, and their definitions
# (gogo.proto, google/api/annotations.proto) would be more packages and more
# generated C++ to build for nothing, so they are removed: the imports, the
# file-level `option (gogoproto.x) = y;` lines, and the
# `option (google.api.http) = { ... };` block inside each rpc (which may hold
# one level of nested `additional_bindings { ... }`).
for p in "${!protos[@]}"; do
  mkdir -p "$(dirname "$out/$p")"
  perl -0pe '
    s{^import "(gogoproto/gogo|google/api/annotations)\.proto";\n}{}mg;
    s{^// for grpc-gateway\n}{}mg;
    s{^option \(gogoproto\.\w+\) = \w+;\n}{}mg;
    s{\n[ \t]*option \(google\.api\.http\) = \{(?:[^{}]|\{[^{}]*\})*\};}{}g;
  ' "$src/$p" > "$out/$p.tmp"
  # A later etcd with an option this does not know would fail in protoc
  # with a less helpful message; say so here.
  if grep -n 'gogoproto\|google\.api' "$out/$p.tmp" >&2; then
    echo "setup: $p still names Go-only options after stripping them" >&2
    exit 1
  fi
  mv "$out/$p.tmp" "$out/$p"
done
