#!/usr/bin/env bash
# Builds the codec decoder fuzzer with libFuzzer + ASan + UBSan straight from
# the sources and runs it over the seed corpus.
#
# Usage: tests/fuzz/run_codec_fuzz.sh [SECONDS]   (default 60)
# Env:   FUZZ_OUT  work directory (default /tmp/kvcache-codec-fuzz): binary,
#                  grown corpus and crash artifacts. The seed corpus in the
#                  repo is read, never written; copy new crashers into it.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
seconds="${1:-60}"
out="${FUZZ_OUT:-/tmp/kvcache-codec-fuzz}"
source "$root/tests/fuzz/fuzz_lib.sh"
mkdir -p "$out"

sources=(decode_fuzzer codec crc32c format group_coder levels quantize rans)
build_fuzzer "$out/decode_fuzzer" $(printf "$root/codec/%s.cc " "${sources[@]}")
run_fuzzer "$out/decode_fuzzer" "$seconds" "$out" \
  "$root/tests/fuzz/corpus/codec" -max_len=65536
