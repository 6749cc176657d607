#!/usr/bin/env bash
# Builds one fuzz target with libFuzzer + ASan + UBSan and runs it over its
# seed corpus; see fuzz_lib.sh for how, and tests/fuzz/BUILD.bazel for the
# targets.
#
# Usage: tests/fuzz/run_fuzz.sh TARGET [SECONDS] [LIBFUZZER_FLAG...]
#        (default 60 s; e.g. run_fuzz.sh daemon_config 3600 -jobs=4)
# Env:   FUZZ_OUT  work directory (default /tmp/kvcache-fuzz/TARGET): binary,
#                  grown corpus and crash artifacts. The seed corpus in the
#                  repo is read, never written; copy new crashers into it.
# Exits non-zero if the target crashed.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
target="${1:?usage: run_fuzz.sh TARGET [SECONDS] [LIBFUZZER_FLAG...]}"
seconds="${2:-60}"
shift $(($# >= 2 ? 2 : 1))
out="${FUZZ_OUT:-/tmp/kvcache-fuzz/$target}"
source "$root/tests/fuzz/fuzz_lib.sh"

cd "$root"
bazel build "//tests/fuzz:$target"
bin="$(bazel info bazel-bin)"
roots=("$root" "$bin")
fuzz_obj="$out/obj"
rm -rf "$fuzz_obj"
mkdir -p "$out"
manifest="$bin/tests/fuzz/$target.manifest"
build_fuzzer "$manifest" "$out/$target"
run_fuzzer "$out/$target" "$seconds" "$out" \
  "$root/tests/fuzz/corpus/$target" -max_len="$(max_len_of "$manifest")" "$@"
