#!/usr/bin/env bash
# Runs a Python test of the kvcache module with Debian's python3 (the one the
# module is built for and numpy is installed for), from the test's runfiles.
set -euo pipefail
export PYTHONPATH="$PWD/client/python${PYTHONPATH:+:$PYTHONPATH}"
exec /usr/bin/python3 "$@"
