#!/usr/bin/env bash
# Runs the soak for SECONDS per phase (default 600: ten minutes for the
# single node, ten for the cluster) and prints its report.
#
#   tests/soak/run_soak.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-600}"
bazel test //tests/soak:soak_test --test_output=all --nocache_test_results \
  --test_env=SOAK_SECONDS="$seconds" --test_timeout=$((seconds * 3 + 300))
