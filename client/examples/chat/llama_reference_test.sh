#!/usr/bin/env bash
# The worker's forward pass of SmolLM2 against an independent numpy one
# (client/examples/model/reference/llama_reference.py, which reads the GGUF
# with the `gguf` package's own reader and dequantizer): the logits at chosen
# positions of a ChatML exchange and of 300 tokens of real documentation
# agree within 0.05 (logits reach about 40; an fp16 KV cache moves them by up
# to ~0.03 between two correct implementations) with the same top token, and
# so does the mean negative log-likelihood of the text.
set -euo pipefail

model=${KVCACHE_MODEL:?KVCACHE_MODEL is not set: run deploy/setup.sh}
python=${KVCACHE_PYTHON:?KVCACHE_PYTHON is not set: run deploy/setup.sh}
doc=/usr/share/doc/python3.11/html/_sources/tutorial/introduction.rst.txt
[[ -f $doc ]] || { echo "no $doc: run deploy/setup.sh (python3.11-doc)" >&2; exit 1; }
ref=client/examples/model/reference
out=${TEST_TMPDIR:-$(mktemp -d)}

# "What is the capital of France?" in ChatML and the model's greedy reply.
chat=1,9690,198,2683,359,253,5356,5646,11173,3365,3511,308,34519,28,7018,411,407,19712,8182,2,198,1,4093,198,1780,314,260,3575,282,4649,47,2,198,1,520,9531,198,504,3575,282,4649,314,7042,30,2,198,2,1,9690,198,2,198,1,4093,198,57,5248,3946,288,7198,253,725,1406,281,260,2342,30
client/examples/model/tokenize --model="$model" --out="$out/doc.json" "$doc"
text=$("$python" -c 'import json,sys; print(",".join(map(str, next(iter(json.load(open(sys.argv[1])).values()))[:300])))' "$out/doc.json")

compare() {  # NAME TOKENS POSITIONS
  client/examples/chat/llama_logits --model="$model" --tokens="$2" \
    --positions="$3" --out="$out/$1.ours"
  "$python" "$ref/llama_reference.py" "$model" --tokens="$2" \
    --positions="$3" --out="$out/$1.ref"
  "$python" "$ref/compare_logits.py" "$out/$1.ours.f32" "$out/$1.ref.f32" \
    --vocab=49152 --abs_tol=0.05 --top1
  "$python" - "$out/$1.ours.json" "$out/$1.ref.json" <<'PY'
import json, sys
ours, ref = (json.load(open(p))["mean_token_nll"] for p in sys.argv[1:3])
print(f"mean NLL {ours:.5f} vs reference {ref:.5f}")
sys.exit(0 if abs(ours - ref) < 2e-3 else 1)
PY
}
compare chat "$chat" 0,1,5,12,20,36,37,44,50,60,66
compare text "$text" 0,1,2,7,31,64,100,150,200,255,256,299
