#!/usr/bin/env bash
# The C++ tokenizer against the `tokenizers` package fed the same GGUF
# vocabulary and merges (reference/tokenize_reference.py): the same ids for
# real documents (Python's documentation, evaluation and calibration files)
# and for edge cases, and both decode back to the text.
set -euo pipefail

model=${KVCACHE_MODEL:?KVCACHE_MODEL is not set: run deploy/setup.sh}
python=${KVCACHE_PYTHON:?KVCACHE_PYTHON is not set: run deploy/setup.sh}
docs=/usr/share/doc/python3.11/html/_sources
[[ -d $docs ]] || { echo "no $docs: run deploy/setup.sh (python3.11-doc)" >&2; exit 1; }
here=client/examples/model
out=${TEST_TMPDIR:-$(mktemp -d)}

files=("$here/testdata/tokenizer_edge_cases.txt"
       "$docs/tutorial/introduction.rst.txt" "$docs/library/json.rst.txt"
       "$docs/library/re.rst.txt" "$docs/howto/regex.rst.txt"
       "$docs/faq/programming.rst.txt" "$docs/howto/unicode.rst.txt"
       "$docs/library/stdtypes.rst.txt")

"$here/tokenize" --model="$model" --out="$out/ours.json" "${files[@]}"
"$python" "$here/reference/tokenize_reference.py" "$model" --decode \
  --out="$out/reference.json" "${files[@]}"

"$python" - "$out/ours.json" "$out/reference.json" <<'PY'
import json, sys
ours, ref = (json.load(open(p)) for p in sys.argv[1:3])
bad = 0
for path, want in ref.items():
    got = ours.get(path)
    if got == want:
        print(f"same {len(want)} ids: {path}")
        continue
    bad += 1
    i = next((k for k, (a, b) in enumerate(zip(got or [], want)) if a != b),
             min(len(got or []), len(want)))
    print(f"DIFFERENT: {path}: {len(got or [])} vs {len(want)} ids, first "
          f"difference at {i}: {(got or [])[i:i+5]} vs {want[i:i+5]}")
sys.exit(1 if bad or len(ours) != len(ref) else 0)
PY
