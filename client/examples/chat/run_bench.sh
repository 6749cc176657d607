#!/bin/bash
# Runs chat_restore_bench with SmolLM2-135M-Instruct against a kvcached of its
# own on a free loopback port, then stops the daemon. Extra arguments go to
# the bench.
#   client/examples/chat/run_bench.sh [--documents=24] [--chats=12] [--reps=3] ...
set -euo pipefail
cd "$(dirname "$0")/../../.."
deploy/fetch_model.sh >/dev/null
model=${KVCACHE_MODEL:-${KVCACHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvcache}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
bazel build //kvstore:kvcached //client/examples/chat:chat_restore_bench
work="$(mktemp -d)"
# Every level's sessions of the quality run are pinned at once: give the
# daemon room for them.
bazel-bin/kvstore/kvcached --listen=127.0.0.1:0 --port_file="$work/port" \
  --set='cpu_tier { capacity_bytes: 4294967296 }' 2>"$work/kvcached.log" &
daemon=$!
trap 'kill "$daemon" 2>/dev/null; wait "$daemon" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do
  [[ -s "$work/port" ]] && break
  sleep 0.1
done
[[ -s "$work/port" ]] || { cat "$work/kvcached.log" >&2; exit 1; }
bazel-bin/client/examples/chat/chat_restore_bench \
  --addr="127.0.0.1:$(cat "$work/port")" --model="$model" "$@"
