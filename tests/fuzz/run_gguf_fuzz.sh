#!/usr/bin/env bash
# Builds the GGUF reader fuzzer (client/examples/model/gguf_fuzzer.cc) with
# libFuzzer + ASan + UBSan straight from the sources and runs it over the
# seed corpus.
#
# Usage: tests/fuzz/run_gguf_fuzz.sh [SECONDS]   (default 60)
# Env:   FUZZ_OUT  work directory (default /tmp/kvcache-gguf-fuzz): binary,
#                  grown corpus and crash artifacts. The seed corpus in the
#                  repo (tests/fuzz/corpus/gguf, written by
#                  //client/examples/model:make_gguf_fuzz_corpus) is read,
#                  never written; copy new crashers into it.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
seconds="${1:-60}"
out="${FUZZ_OUT:-/tmp/kvcache-gguf-fuzz}"
source "$root/tests/fuzz/fuzz_lib.sh"
mkdir -p "$out"

sources=(gguf_fuzzer gguf ggml_types)
build_fuzzer "$out/gguf_fuzzer" \
  $(printf "$root/client/examples/model/%s.cc " "${sources[@]}")
# Seeds are about 1 KB; 16 KB leaves room to grow tables and tensors.
run_fuzzer "$out/gguf_fuzzer" "$seconds" "$out" \
  "$root/tests/fuzz/corpus/gguf" -max_len=16384
