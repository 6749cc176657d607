#!/usr/bin/env bash
# Parses every deployment file and checks the fields kvcached relies on
# (deploy/check_deploy_files.py says what). Needs python3-yaml.
set -euo pipefail
exec python3 deploy/check_deploy_files.py
