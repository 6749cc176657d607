#!/usr/bin/env bash
# Sets up this machine, builds kvcache, starts a single-node kvcached on
# loopback with the default configuration, and runs the demo on the real KV
# caches in ../shared/kvdata (or $KVCACHE_KVDATA). Stops the daemon at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/setup.sh
kvdata=${KVCACHE_KVDATA:-../shared/kvdata}
[[ -d $kvdata ]] || { echo "demo: no KV dumps at $kvdata (set KVCACHE_KVDATA)" >&2; exit 1; }

echo "demo: building (the first build takes a few minutes)"
bazel build -c opt //kvstore:kvcached //client:kvcachectl //client/examples:kvcache_demo

workdir=$(mktemp -d)
trap 'kill "$daemon" 2>/dev/null || true; rm -rf "$workdir"' EXIT
bazel-bin/kvstore/kvcached --listen=127.0.0.1:0 --port_file="$workdir/port" \
  2> >(sed 's/^/  [daemon] /' >&2) &
daemon=$!
for _ in $(seq 100); do [[ -s $workdir/port ]] && break; sleep 0.1; done
[[ -s $workdir/port ]] || { echo "demo: kvcached did not start" >&2; exit 1; }
addr=127.0.0.1:$(cat "$workdir/port")

echo
bazel-bin/client/examples/kvcache_demo --addr="$addr" --kvdata="$kvdata"
echo
echo "$ kvcachectl --addr=$addr status"
bazel-bin/client/kvcachectl --addr="$addr" status

kill -TERM "$daemon"
wait "$daemon"
