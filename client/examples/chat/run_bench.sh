#!/bin/bash
# Runs chat_restore_bench against a kvcached of its own on a free loopback
# port, then stops the daemon. Extra arguments go to the bench.
#   client/examples/chat/run_bench.sh [--conversations=8] [--reps=7] ...
set -euo pipefail
cd "$(dirname "$0")/../../.."
bazel build //kvstore:kvcached //client/examples/chat:chat_restore_bench
kvdata="$(cd ../shared/kvdata && pwd)"
work="$(mktemp -d)"
bazel-bin/kvstore/kvcached --listen=127.0.0.1:0 --port_file="$work/port" \
  2>"$work/kvcached.log" &
daemon=$!
trap 'kill "$daemon" 2>/dev/null; wait "$daemon" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do
  [[ -s "$work/port" ]] && break
  sleep 0.1
done
[[ -s "$work/port" ]] || { cat "$work/kvcached.log" >&2; exit 1; }
manifests="$(ls "$kvdata"/*.json | paste -sd, -)"
bazel-bin/client/examples/chat/chat_restore_bench \
  --addr="127.0.0.1:$(cat "$work/port")" \
  --checkpoint="$kvdata/stories260K.bin" --manifests="$manifests" "$@"
