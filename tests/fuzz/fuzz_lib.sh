# Sourced by the run_*_fuzz.sh scripts: builds a libFuzzer target with ASan
# and UBSan straight from the sources with clang (Bazel's toolchain here is
# gcc, which has no libFuzzer) and runs it over a seed corpus.
#
# The sourcing script sets `root` (the repository) first.

# Same Abseil libraries as third_party/system/system.BUILD.
absl_libs=(
  -labsl_status -labsl_statusor -labsl_cord -labsl_cordz_info
  -labsl_cord_internal -labsl_cordz_functions -labsl_cordz_handle
  -labsl_exponential_biased -labsl_synchronization
  -labsl_graphcycles_internal -labsl_stacktrace -labsl_symbolize
  -labsl_debugging_internal -labsl_demangle_internal -labsl_malloc_internal
  -labsl_time -labsl_civil_time -labsl_time_zone -labsl_str_format_internal
  -labsl_strings -labsl_strings_internal -labsl_int128 -labsl_throw_delegate
  -labsl_strerror -labsl_bad_optional_access -labsl_bad_variant_access
  -labsl_raw_hash_set -labsl_hashtablez_sampler -labsl_hash -labsl_city
  -labsl_low_level_hash -labsl_base -labsl_spinlock_wait
  -labsl_raw_logging_internal -labsl_log_severity -lpthread
)

# build_fuzzer BINARY SOURCE...
build_fuzzer() {
  local binary="$1"
  shift
  clang++ -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined \
    -fno-sanitize-recover=undefined -I"$root" "$@" "${absl_libs[@]}" \
    -o "$binary"
}

# run_fuzzer BINARY SECONDS WORK_DIR SEED_DIR [LIBFUZZER_FLAG...]
# Grows WORK_DIR/corpus from SEED_DIR (read, never written) and leaves any
# crash artifacts in WORK_DIR.
run_fuzzer() {
  local binary="$1" seconds="$2" work="$3" seeds="$4"
  shift 4
  mkdir -p "$work/corpus"
  "$binary" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$work/" "$@" \
    "$work/corpus" "$seeds"
}
