#!/usr/bin/env python3
"""Reference forward pass of a llama-architecture GGUF model, in numpy.

Independent of the C++ worker: the file is read with the gguf package's own
reader and dequantizer, and the math is written out below. It follows the
worker's semantics exactly, so its logits are what the worker's must match:
fp32 throughout, llama.cpp's "normal" RoPE (adjacent pairs), and a KV cache
that holds fp16 (K after RoPE and V are rounded to fp16 before attention,
the current tokens' too).

Usage:
  llama_reference.py MODEL.gguf --tokens=1,2,3 --positions=0,2 --out=PREFIX
      One pass over all tokens; writes
        PREFIX.f32   little-endian float32 [len(positions)][vocab]
        PREFIX.json  {"positions", "vocab", "tokens", "mean_token_nll"}
      where mean_token_nll is the mean over p < n-1 of
      -log softmax(logits[p])[tokens[p+1]].
  llama_reference.py MODEL.gguf --tokens_file=F --generate=N
      Greedy-generates N tokens after the given ones (never stopping early)
      and prints their ids, comma separated, on one line.
--tokens_file reads ids separated by whitespace and/or commas.
"""
import argparse
import json
import re
import sys

import gguf
import numpy as np

F32 = np.float32


class Model:
    def __init__(self, path):
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items()
                if not k.startswith("tokenizer.")}
        arch = meta["general.architecture"]
        if arch != "llama":
            sys.exit(f"architecture {arch!r}; only llama is supported")
        self.layers = int(meta["llama.block_count"])
        self.dim = int(meta["llama.embedding_length"])
        self.ffn = int(meta["llama.feed_forward_length"])
        self.heads = int(meta["llama.attention.head_count"])
        self.kv_heads = int(meta["llama.attention.head_count_kv"])
        self.eps = F32(meta["llama.attention.layer_norm_rms_epsilon"])
        self.context = int(meta["llama.context_length"])
        self.head_dim = self.dim // self.heads
        self.rope_dim = int(meta.get("llama.rope.dimension_count", self.head_dim))
        base = float(meta.get("llama.rope.freq_base", 10000.0))
        assert self.heads % self.kv_heads == 0 and self.rope_dim % 2 == 0
        # theta_j = base^(-2j/rope_dim) for pair j; dims past rope_dim are not rotated.
        self.inv_freq = base ** (-np.arange(0, self.rope_dim, 2, dtype=np.float64) / self.rope_dim)

        # Each tensor is dequantized once. GGUF lists dims fastest first
        # (ne[0] = a weight's input dim); gguf's reader already gives numpy
        # order, so a matrix comes out as [out][in] and y = x @ W.T.
        self.w = {}
        for t in reader.tensors:
            array = gguf.quants.dequantize(t.data, t.tensor_type).astype(F32, copy=False)
            expected = tuple(int(n) for n in reversed(t.shape))
            assert array.shape == expected, (t.name, array.shape, expected)
            self.w[t.name] = array
        self.embedding = self.w["token_embd.weight"]
        # Tied classifier when the file has no output.weight (SmolLM2 has none).
        self.classifier = self.w.get("output.weight", self.embedding)
        self.vocab = self.classifier.shape[0]
        assert self.embedding.shape == (self.vocab, self.dim)

    def new_cache(self):
        """Per layer [K, V], each [tokens][kv_heads][head_dim] fp32 holding fp16 values."""
        empty = np.zeros((0, self.kv_heads, self.head_dim), F32)
        return [[empty, empty] for _ in range(self.layers)]

    def rms_norm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def rope(self, x, positions):
        """x: [tokens][heads][head_dim]; rotates pairs (x[2j], x[2j+1]) of each head."""
        # Angles in float64 then rounded: the worker's fp32 angles differ
        # by < 1e-4 rad at these positions, far below the fp16 cache error.
        angle = positions[:, None].astype(np.float64) * self.inv_freq[None, :]
        cos, sin = np.cos(angle).astype(F32)[:, None, :], np.sin(angle).astype(F32)[:, None, :]
        out = x.copy()
        even, odd = x[..., 0:self.rope_dim:2], x[..., 1:self.rope_dim:2]
        out[..., 0:self.rope_dim:2] = even * cos - odd * sin
        out[..., 1:self.rope_dim:2] = even * sin + odd * cos
        return out

    def forward(self, tokens, cache):
        """Runs tokens after what cache holds (which grows); returns [tokens][vocab] logits."""
        n, start = len(tokens), len(cache[0][0])
        positions = np.arange(start, start + n)
        group = self.heads // self.kv_heads
        hd = self.head_dim
        # Causal mask over all cached keys: query i (position start+i) sees keys <= start+i.
        masked = np.arange(start + n)[None, :] > positions[:, None]
        x = self.embedding[np.asarray(tokens)]
        for layer in range(self.layers):
            w = lambda name: self.w[f"blk.{layer}.{name}.weight"]
            h = self.rms_norm(x, w("attn_norm"))
            q = self.rope((h @ w("attn_q").T).reshape(n, self.heads, hd), positions)
            k = self.rope((h @ w("attn_k").T).reshape(n, self.kv_heads, hd), positions)
            v = (h @ w("attn_v").T).reshape(n, self.kv_heads, hd)
            k = k.astype(np.float16).astype(F32)  # the cache holds fp16
            v = v.astype(np.float16).astype(F32)
            cache[layer][0] = keys = np.concatenate([cache[layer][0], k])
            cache[layer][1] = values = np.concatenate([cache[layer][1], v])

            # Query head h reads KV head h // group: view the heads as
            # [kv_head][group] so each KV head serves its group at once.
            qg = q.reshape(n, self.kv_heads, group, hd).transpose(1, 2, 0, 3)    # [kv][g][n][hd]
            scores = qg @ keys.transpose(1, 2, 0)[:, None] / F32(np.sqrt(hd))    # [kv][g][n][S]
            scores[..., masked] = -np.inf
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            attn = scores @ values.transpose(1, 0, 2)[:, None]                  # [kv][g][n][hd]
            x = x + attn.transpose(2, 0, 1, 3).reshape(n, self.dim) @ w("attn_output").T

            h = self.rms_norm(x, w("ffn_norm"))
            gate, up = h @ w("ffn_gate").T, h @ w("ffn_up").T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w("ffn_down").T  # SwiGLU: silu(gate) * up
        return self.rms_norm(x, self.w["output_norm.weight"]) @ self.classifier.T


def mean_token_nll(logits, tokens):
    """Mean over p < n-1 of -log softmax(logits[p])[tokens[p+1]], in float64."""
    if len(tokens) < 2:
        return None
    z = logits[:-1].astype(np.float64)
    top = z.max(axis=1)
    log_sum = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return float(np.mean(log_sum - z[np.arange(len(z)), tokens[1:]]))


def parse_ids(text):
    return [int(t) for t in re.split(r"[\s,]+", text.strip()) if t]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokens", help="comma separated token ids")
    ap.add_argument("--tokens_file", help="file of token ids, whitespace and/or comma separated")
    ap.add_argument("--positions", help="comma separated positions whose logits to write")
    ap.add_argument("--out", help="output prefix: PREFIX.f32 and PREFIX.json")
    ap.add_argument("--generate", type=int, help="greedy-generate this many tokens and print them")
    args = ap.parse_args()

    if (args.tokens is None) == (args.tokens_file is None):
        ap.error("give exactly one of --tokens and --tokens_file")
    if args.tokens is not None:
        tokens = parse_ids(args.tokens)
    else:
        with open(args.tokens_file) as f:
            tokens = parse_ids(f.read())
    if not tokens:
        ap.error("no tokens")
    if args.generate is None and (args.positions is None or args.out is None):
        ap.error("--positions and --out are needed (or --generate)")

    model = Model(args.model)
    if not all(0 <= t < model.vocab for t in tokens):
        ap.error(f"token ids must be in [0, {model.vocab})")
    if len(tokens) + (args.generate or 0) > model.context:
        ap.error(f"more than the context length ({model.context}) tokens")

    if args.generate is not None:
        cache = model.new_cache()
        logits = model.forward(tokens, cache)
        generated = []
        for _ in range(args.generate):
            generated.append(int(np.argmax(logits[-1])))
            logits = model.forward([generated[-1]], cache)
        print(",".join(map(str, generated)))
        return

    positions = parse_ids(args.positions)
    if not all(0 <= p < len(tokens) for p in positions):
        ap.error(f"positions must be in [0, {len(tokens)})")
    logits = model.forward(tokens, model.new_cache())
    logits[positions].astype("<f4").tofile(args.out + ".f32")
    meta = {
        "positions": positions,
        "vocab": model.vocab,
        "tokens": tokens,
        "mean_token_nll": mean_token_nll(logits, tokens),
    }
    with open(args.out + ".json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
