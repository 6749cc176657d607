#!/usr/bin/env bash
# Builds every fuzz target and runs each in turn over its seed corpus, for
# long unattended runs (e.g. overnight: run_all_fuzz.sh 3600). Crash
# artifacts stay in each target's work directory; copy them into
# tests/fuzz/corpus/<target>/ as regression seeds once fixed.
#
# Usage: tests/fuzz/run_all_fuzz.sh [SECONDS_PER_TARGET] [LIBFUZZER_FLAG...]
#        (default 600)
# Env:   FUZZ_OUT  work directory (default /tmp/kvcache-fuzz): one folder per
#                  target with its binary, grown corpus and crash artifacts;
#                  grown corpora are kept between runs.
# Exits non-zero if any target crashed, after running all of them.
set -uo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
seconds="${1:-600}"
shift $(($# >= 1 ? 1 : 0))
out="${FUZZ_OUT:-/tmp/kvcache-fuzz}"
source "$root/tests/fuzz/fuzz_lib.sh"

cd "$root"
bazel build //tests/fuzz:all_targets || exit 1
bin="$(bazel info bazel-bin)"
roots=("$root" "$bin")
fuzz_obj="$out/obj"
rm -rf "$fuzz_obj"

failed=()
for target in "${fuzz_targets[@]}"; do
  manifest="$bin/tests/fuzz/$target.manifest"
  mkdir -p "$out/$target"
  if ! build_fuzzer "$manifest" "$out/$target/$target"; then
    failed+=("$target (build)")
    continue
  fi
  echo "fuzz: $target for ${seconds}s"
  run_fuzzer "$out/$target/$target" "$seconds" "$out/$target" \
    "$root/tests/fuzz/corpus/$target" -max_len="$(max_len_of "$manifest")" \
    "$@" >"$out/$target/log" 2>&1 || failed+=("$target")
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec)' \
    "$out/$target/log" | sed "s/^/fuzz: $target /"
done

if ((${#failed[@]})); then
  echo "fuzz: FAILED: ${failed[*]}; see $out/<target>/log and crash-* there"
  exit 1
fi
echo "fuzz: all ${#fuzz_targets[@]} targets ran clean"
