#!/usr/bin/env bash
# CI's fuzzing: builds every fuzz target with clang from the sources Bazel
# hands this test, replays its seed corpus (which holds every crash found so
# far, as regression inputs) and fuzzes it briefly. Fails on any crash,
# sanitizer report, leak or slow input. Long runs: run_all_fuzz.sh.
#
# Env: FUZZ_SMOKE_SECONDS  fuzzing time per target (default 10).
set -uo pipefail

runfiles="${TEST_SRCDIR:?run by bazel test}/${TEST_WORKSPACE:-kvcache}"
seconds="${FUZZ_SMOKE_SECONDS:-10}"
work="${TEST_TMPDIR:-$(mktemp -d)}/fuzz"
artifacts="${TEST_UNDECLARED_OUTPUTS_DIR:-$work}"
source "$runfiles/tests/fuzz/fuzz_lib.sh"
roots=("$runfiles")
fuzz_obj="$work/obj"

failed=()
for target in "${smoke_targets[@]}"; do
  manifest="$runfiles/tests/fuzz/$target.manifest"
  mkdir -p "$work/$target"
  start=$SECONDS
  if ! build_fuzzer "$manifest" "$work/$target/$target"; then
    failed+=("$target (build)")
    continue
  fi
  built=$((SECONDS - start))
  if ! run_fuzzer "$work/$target/$target" "$seconds" "$work/$target" \
    "$runfiles/tests/fuzz/corpus/$target" \
    -max_len="$(max_len_of "$manifest")" >"$work/$target/log" 2>&1; then
    failed+=("$target")
    tail -n 60 "$work/$target/log"
    cp "$work/$target"/crash-* "$work/$target"/leak-* "$work/$target"/timeout-* \
      "$work/$target"/oom-* "$artifacts/" 2>/dev/null
  fi
  echo "$target: built in ${built}s, $(awk \
    '/^stat::number_of_executed_units/ { runs = $NF }
     /^stat::average_exec_per_sec/ { rate = $NF }
     END { print runs " runs, " rate " per second" }' "$work/$target/log")"
done

if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]} (crash inputs are in the test's outputs)"
  exit 1
fi
