#!/usr/bin/env bash
# Builds kvcache's GPU tests and benchmarks here, packs them with the shared
# libraries a bare GPU host lacks, and runs them on a GPU host.
#
#   tests/gpu/run.sh build   # on a build machine (Debian 12 + CUDA toolkit):
#                            # builds into .gpu/ (bin/ and lib/)
#   tests/gpu/run.sh run     # on the GPU host, in a copy of this tree that
#                            # has .gpu/: runs everything, logs to $OUT or
#                            # .gpu/results/, ends with "N passed, N failed"
#   tests/gpu/run.sh         # both, on a GPU host that can also build
#
# The GPU host needs only the NVIDIA driver and glibc >= 2.36; gRPC, Abseil,
# GoogleTest and the CUDA runtime travel in .gpu/lib.
set -uo pipefail
cd "$(dirname "$0")/../.."

# Each entry: a Bazel target and the arguments it runs with on the GPU host.
TARGETS=(
  "//transfer:gpu_probe|"
)

# Libraries every GPU host has; everything else a binary links is carried.
HOST_LIBS='^(libc|libm|libdl|librt|libpthread|ld-linux-x86-64|libstdc\+\+|libgcc_s|libcuda|libnccl|linux-vdso)\.so'

build() {
  deploy/setup.sh || return 1
  local labels=()
  for entry in "${TARGETS[@]}"; do labels+=("${entry%%|*}"); done
  bazel build -c opt "${labels[@]}" || return 1
  rm -rf .gpu && mkdir -p .gpu/bin .gpu/lib
  for label in "${labels[@]}"; do
    local path="bazel-bin/${label#//}"
    path="${path/://}"
    cp -L "$path" .gpu/bin/
    ldd "$path" | awk '$3 ~ /^\// {print $1, $3}' | while read -r name file; do
      [[ $name =~ $HOST_LIBS ]] || cp -Ln "$file" .gpu/lib/ 2>/dev/null || true
    done
  done
  echo "gpu: packed $(ls .gpu/bin | wc -l) binaries, $(du -sh .gpu/lib | cut -f1) of libraries in .gpu/"
}

run() {
  [[ -d .gpu/bin ]] || { echo "gpu: no .gpu/bin; run '$0 build' first" >&2; return 1; }
  local results=${OUT:-.gpu/results}
  mkdir -p "$results"
  export LD_LIBRARY_PATH="$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader |
    tee "$results/gpu.txt"
  local passed=0 failed=0
  for entry in "${TARGETS[@]}"; do
    local label=${entry%%|*} args=${entry#*|}
    local name=${label##*:}
    echo "=== $name $args"
    # shellcheck disable=SC2086
    if ".gpu/bin/$name" $args 2>&1 | tee "$results/$name.log"; then
      passed=$((passed + 1))
    else
      failed=$((failed + 1))
      echo "gpu: $name FAILED"
    fi
  done
  echo "${passed} passed, ${failed} failed"
  [[ $failed -eq 0 ]]
}

case "${1:-all}" in
  build) build ;;
  run) run ;;
  all) build && run ;;
  *) echo "usage: $0 [build|run]" >&2; exit 2 ;;
esac
