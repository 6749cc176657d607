#!/usr/bin/env bash
# Runs a Python test of the kvcache package from the test's runfiles, with
# the package's source and the libkvcache.so built beside it.
set -euo pipefail
export PYTHONPATH="$PWD/client/python${PYTHONPATH:+:$PYTHONPATH}"
export KVCACHE_LIBRARY="$PWD/client/c/libkvcache.so"
exec "${PYTHON:-/usr/bin/python3}" "$@"
