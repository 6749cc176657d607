#!/usr/bin/env bash
# Builds the codec decoder fuzzer with libFuzzer + ASan + UBSan straight from
# the sources and runs it over the seed corpus.
#
# Usage: tests/fuzz/run_codec_fuzz.sh [SECONDS]   (default 60)
# Env:   FUZZ_OUT  work directory (default /tmp/kvcache-codec-fuzz): binary,
#                  grown corpus and crash artifacts. The seed corpus in the
#                  repo is read, never written; copy new crashers into it.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
seconds="${1:-60}"
out="${FUZZ_OUT:-/tmp/kvcache-codec-fuzz}"
mkdir -p "$out/corpus"

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
sources=(decode_fuzzer codec crc32c format group_coder levels quantize rans)

clang++ -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined \
  -fno-sanitize-recover=undefined -I"$root" \
  $(printf "$root/codec/%s.cc " "${sources[@]}") \
  "${absl_libs[@]}" -o "$out/decode_fuzzer"

"$out/decode_fuzzer" -max_total_time="$seconds" -max_len=65536 \
  -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
  -artifact_prefix="$out/" "$out/corpus" "$root/tests/fuzz/corpus/codec"
