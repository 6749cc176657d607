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
# GoogleTest and the CUDA runtime travel in .gpu/lib, the real KV dumps
# (../shared/kvdata, or $KVCACHE_KVDATA) in .gpu/kvdata.
set -uo pipefail
cd "$(dirname "$0")/../.."

# Each entry: a Bazel target, the arguments it runs with on the GPU host and,
# optionally, "memcheck" to run it under compute-sanitizer (skipped where the
# host has none).
TARGETS=(
  "//transfer:gpu_probe|"
  "//codec/cuda:codec_gpu_test|"
  "//codec/cuda:codec_gpu_test||memcheck"
  "//kvstore:gpu_tier_test|"
  "//tests:gpu_fetch_test|--kvcached=.gpu/bin/kvcached"
  "//tests:gpu_store_test|--kvcached=.gpu/bin/kvcached"
  "//codec/cuda:codec_gpu_bench|"
  "//transfer:e2e_bench|--kvcached=.gpu/bin/kvcached --nvme_dir=.gpu/nvme"
)
# Programs the entries above start (packed, not run on their own).
HELPERS=("//kvstore:kvcached")
SANITIZER=/usr/local/cuda/bin/compute-sanitizer

# Libraries every GPU host has; everything else a binary links is carried.
HOST_LIBS='^(libc|libm|libdl|librt|libpthread|ld-linux-x86-64|libstdc\+\+|libgcc_s|libcuda|libnccl|linux-vdso)\.so'

build() {
  deploy/setup.sh || return 1
  local labels=()
  for entry in "${TARGETS[@]}"; do labels+=("${entry%%|*}"); done
  labels+=("${HELPERS[@]}")
  mapfile -t labels < <(printf '%s\n' "${labels[@]}" | sort -u)
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
  local kvdata=${KVCACHE_KVDATA:-../shared/kvdata}
  if [[ -d $kvdata ]]; then
    mkdir -p .gpu/kvdata
    cp "$kvdata"/*.json "$kvdata"/*.kv "$kvdata"/*.q.f16 .gpu/kvdata/
  fi
  echo "gpu: packed $(ls .gpu/bin | wc -l) binaries, $(du -sh .gpu/lib | cut -f1) of libraries in .gpu/"
}

run() {
  [[ -d .gpu/bin ]] || { echo "gpu: no .gpu/bin; run '$0 build' first" >&2; return 1; }
  local results=${OUT:-.gpu/results}
  mkdir -p "$results"
  export LD_LIBRARY_PATH="$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  [[ -d .gpu/kvdata ]] && export KVCACHE_KVDATA=${KVCACHE_KVDATA:-$PWD/.gpu/kvdata}
  # Tests' NVMe tiers need O_DIRECT, which a tmpfs /tmp lacks.
  export TEST_TMPDIR=$PWD/.gpu/tmp
  mkdir -p "$TEST_TMPDIR"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader |
    tee "$results/gpu.txt"
  local passed=0 failed=0
  for entry in "${TARGETS[@]}"; do
    local label=${entry%%|*} rest=${entry#*|}
    local args=${rest%%|*} wrap=""
    [[ $rest == *"|"* ]] && wrap=${rest#*|}
    local name=${label##*:} log=${label##*:}
    local cmd=(".gpu/bin/$name")
    if [[ $wrap == memcheck ]]; then
      log+=.memcheck
      if [[ ! -x $SANITIZER ]]; then
        echo "=== $name $args under memcheck: skipped, no $SANITIZER"
        continue
      fi
      cmd=("$SANITIZER" --tool memcheck --error-exitcode 1 "${cmd[@]}")
    fi
    echo "=== $name $args${wrap:+ ($wrap)}"
    # shellcheck disable=SC2086
    if "${cmd[@]}" $args 2>&1 | tee "$results/$log.log"; then
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
