#!/usr/bin/env bash
# Sets up a machine (deploy/setup.sh) and runs every test target with Bazel,
# ending with one line "N passed, N failed" counting test targets.
#
# Tests that need a GPU do not run here; tests/gpu/run.sh runs them on a GPU
# host.
set -uo pipefail
cd "$(dirname "$0")/.."

deploy/setup.sh || exit 1

log=$(mktemp)
bazel test //... --keep_going --test_summary=short "$@" 2>&1 | tee "$log"
bazel_rc=${PIPESTATUS[0]}

passed=$(grep -cE '^//[^ ]+ +(\(cached\) )?PASSED' "$log")
failed=$(grep -cE '^//[^ ]+ +.*(FAILED|TIMEOUT|NO STATUS|INCOMPLETE|FLAKY)' "$log")
rm -f "$log"
# A build that broke before any test ran must not read as green.
if [[ $bazel_rc -ne 0 && $failed -eq 0 ]]; then
  failed=1
fi
echo "${passed} passed, ${failed} failed"
[[ $failed -eq 0 && $passed -gt 0 ]]
