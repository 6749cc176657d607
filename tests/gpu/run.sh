#!/usr/bin/env bash
# Builds kvcache's GPU tests and benchmarks here, packs them with the shared
# libraries a bare GPU host lacks, and runs them on a GPU host.
#
#   tests/gpu/run.sh build   # on a build machine (Debian 12 + CUDA toolkit):
#                            # builds into .gpu/ (bin/ and lib/)
#   tests/gpu/run.sh pack    # after build: .gpu/ as one file, .gpu.tar.gz
#                            # (about 40 MB instead of 90), for hosts the
#                            # tree travels to with a size limit
#   tests/gpu/run.sh run     # on the GPU host, in a copy of this tree that
#                            # has .gpu/ or .gpu.tar.gz: runs everything,
#                            # logs to $OUT or .gpu/results/, ends with
#                            # "N passed, N failed"
#   tests/gpu/run.sh         # both, on a GPU host that can also build
#   tests/gpu/run.sh run gpu_nccl_test e2e_bench   # only the entries named
#
# The GPU host needs only the NVIDIA driver and glibc >= 2.36; gRPC, Abseil,
# GoogleTest and the CUDA runtime travel in .gpu/lib, the real KV dumps
# (../shared/kvdata, or $KVCACHE_KVDATA) in .gpu/kvdata, and the kvcache
# Python package as its wheel in .gpu/wheel, installed on the GPU host into
# .gpu/site for that host's python3 (which brings NumPy, PyTorch and
# transformers for the Python tests).
set -uo pipefail
cd "$(dirname "$0")/../.."

# Each entry: a Bazel target, the arguments it runs with on the GPU host and,
# optionally, "memcheck" to run it under compute-sanitizer (skipped where the
# host has none) or "two_gpus" for a test that needs two GPUs (skipped, and
# reported so, on a host with one).
TARGETS=(
  "//transfer:gpu_probe|"
  "//codec/cuda:codec_gpu_test|"
  "//codec/cuda:codec_gpu_test||memcheck"
  "//kvstore:gpu_tier_test|"
  "//tests:gpu_fetch_test|--kvcached=.gpu/bin/kvcached"
  "//tests:gpu_store_test|--kvcached=.gpu/bin/kvcached"
  "//tests:gpu_nccl_test|--kvcached=.gpu/bin/kvcached|two_gpus"
  "//codec/cuda:codec_gpu_bench|"
  "//transfer:e2e_bench|--kvcached=.gpu/bin/kvcached --nvme_dir=.gpu/nvme"
)
# Python tests of the kvcache package, run with the GPU host's python3.
PYTHON_TESTS=("client/python/kvcache_gpu_test.py"
              "client/python/kvcache_hf_test.py")
PYTHON_FILES=("client/python/kvcache_testing.py" "${PYTHON_TESTS[@]}")
# Programs the entries above start (packed, not run on their own).
HELPERS=("//kvstore:kvcached")
SANITIZER=/usr/local/cuda/bin/compute-sanitizer

# Libraries every GPU host has; everything else a binary links is carried.
# NCCL (over 200 MB) is not linked but loaded when a link opens: run() finds
# the host's own.
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
  mkdir -p .gpu/python
  cp "${PYTHON_FILES[@]}" .gpu/python/
  build_wheel .gpu/wheel || return 1
  local kvdata=${KVCACHE_KVDATA:-../shared/kvdata}
  if [[ -d $kvdata ]]; then
    mkdir -p .gpu/kvdata
    cp "$kvdata"/*.json "$kvdata"/*.kv "$kvdata"/*.q.f16 .gpu/kvdata/
  fi
  echo "gpu: packed $(ls .gpu/bin | wc -l) binaries, $(du -sh .gpu/lib | cut -f1) of libraries and $(du -sh .gpu/wheel | cut -f1) of wheel in .gpu/"
}

# Builds the kvcache wheel (its PEP 517 backend, through pip in a scratch
# virtual environment) from an optimised libkvcache.so into $1.
build_wheel() {
  bazel build -c opt //client/c:libkvcache.so || return 1
  local venv
  venv=$(mktemp -d)
  python3 -m venv "$venv" &&
    KVCACHE_LIBRARY=$PWD/bazel-bin/client/c/libkvcache.so "$venv/bin/pip" wheel \
      --quiet --disable-pip-version-check --no-build-isolation --no-deps \
      --no-index -w "$1" client/python
  local rc=$?
  rm -rf "$venv"
  return $rc
}

# Installs the packed wheel into .gpu/site for the host's python3.
setup_python() {
  PYTHON=python3
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index \
    --no-deps --upgrade --target .gpu/site .gpu/wheel/kvcache-*.whl || return 1
  export PYTHONPATH=$PWD/.gpu/site:$PWD/.gpu/python
  export KVCACHED=$PWD/.gpu/bin/kvcached
}

# .gpu/ as one compressed file beside it.
pack() {
  [[ -d .gpu/bin ]] || { echo "gpu: no .gpu/bin; run '$0 build' first" >&2; return 1; }
  tar czf .gpu.tar.gz .gpu/bin .gpu/lib .gpu/python .gpu/wheel \
    $( [[ -d .gpu/kvdata ]] && echo .gpu/kvdata) || return 1
  echo "gpu: packed .gpu/ into .gpu.tar.gz ($(du -h .gpu.tar.gz | cut -f1))"
}

run() {
  if [[ ! -d .gpu/bin && -f .gpu.tar.gz ]]; then
    tar xzf .gpu.tar.gz || return 1
  fi
  [[ -d .gpu/bin ]] || { echo "gpu: no .gpu/bin; run '$0 build' first" >&2; return 1; }
  local results=${OUT:-.gpu/results}
  mkdir -p "$results"
  export LD_LIBRARY_PATH="$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  [[ -d .gpu/kvdata ]] && export KVCACHE_KVDATA=${KVCACHE_KVDATA:-$PWD/.gpu/kvdata}
  # Tests' NVMe tiers need O_DIRECT, which a tmpfs /tmp lacks.
  export TEST_TMPDIR=$PWD/.gpu/tmp
  mkdir -p "$TEST_TMPDIR"
  # NVLink multicast stays off: on a shared host it can take the GPUs down.
  export NCCL_NVLS_ENABLE=0
  if [[ -z ${KVCACHE_NCCL_LIBRARY:-} ]] && ! ldconfig -p | grep -q 'libnccl\.so\.2 '; then
    local nccl
    nccl=$(find /usr/local/cuda/lib64 /usr/lib /opt -name libnccl.so.2 2>/dev/null | head -1)
    [[ -n $nccl ]] && export KVCACHE_NCCL_LIBRARY=$nccl
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader |
    tee "$results/gpu.txt"
  local gpus
  gpus=$(nvidia-smi -L | grep -c '^GPU')
  local passed=0 failed=0 skipped=0
  # Runs one entry: its name, its log's name, the command.
  run_one() {
    local name=$1 log=$2
    shift 2
    echo "=== $name"
    if "$@" 2>&1 | tee "$results/$log.log"; then
      passed=$((passed + 1))
    else
      failed=$((failed + 1))
      echo "gpu: $name FAILED"
    fi
  }
  for entry in "${TARGETS[@]}"; do
    local label=${entry%%|*} rest=${entry#*|}
    local args=${rest%%|*} wrap=""
    [[ $rest == *"|"* ]] && wrap=${rest#*|}
    local name=${label##*:} log=${label##*:}
    if [[ $# -gt 0 && " $* " != *" $name "* ]]; then continue; fi
    local cmd=(".gpu/bin/$name")
    if [[ $wrap == two_gpus && $gpus -lt 2 ]]; then
      echo "=== $name: skipped, needs two GPUs (this host has $gpus)"
      skipped=$((skipped + 1))
      continue
    fi
    if [[ $wrap == memcheck ]]; then
      log+=.memcheck
      if [[ ! -x $SANITIZER ]]; then
        echo "=== $name $args under memcheck: skipped, no $SANITIZER"
        skipped=$((skipped + 1))
        continue
      fi
      cmd=("$SANITIZER" --tool memcheck --error-exitcode 1 "${cmd[@]}")
    fi
    # shellcheck disable=SC2086
    run_one "$name $args${wrap:+ ($wrap)}" "$log" "${cmd[@]}" $args
  done
  for test in "${PYTHON_TESTS[@]}"; do
    local name
    name=$(basename "$test" .py)
    if [[ $# -gt 0 && " $* " != *" $name "* ]]; then continue; fi
    [[ -n ${PYTHON:-} ]] || setup_python || return 1
    run_one "$name ($("$PYTHON" --version))" "$name" "$PYTHON" ".gpu/python/$name.py"
  done
  echo "${passed} passed, ${failed} failed, ${skipped} skipped"
  [[ $failed -eq 0 ]]
}

case "${1:-all}" in
  build) build ;;
  pack) pack ;;
  run) shift; run "$@" ;;
  all) build && run ;;
  *) echo "usage: $0 [build | pack | run [name...]]" >&2; exit 2 ;;
esac
