#!/usr/bin/env bash
# libkvcache.so must export exactly the functions kvcache.h declares: no
# C++ symbol of the libraries linked into it, and none of the ABI missing.
set -euo pipefail
library=$1
header=$2

exported=$(nm -D --defined-only "$library" | awk '$2 ~ /^[TDBRVW]$/ {print $3}' |
  sed 's/@.*//' | sort -u)
declared=$(grep -oE '\bkvcache_[a-z0-9_]+\(' "$header" | tr -d '(' | sort -u)

status=0
if extra=$(comm -23 <(echo "$exported") <(echo "$declared")) && [[ -n $extra ]]; then
  echo "exported but not in kvcache.h:"
  echo "$extra" | head -20
  echo "($(echo "$extra" | wc -l) in all)"
  status=1
fi
if missing=$(comm -13 <(echo "$exported") <(echo "$declared")) && [[ -n $missing ]]; then
  echo "declared in kvcache.h but not exported:"
  echo "$missing"
  status=1
fi
[[ $status -eq 0 ]] && echo "libkvcache.so exports the $(echo "$declared" | wc -l) functions of kvcache.h and nothing else"
exit $status
