#!/usr/bin/env python3
"""Reference tokenizer for a GGUF model with a byte-level BPE ("gpt2") vocab.

Builds a `tokenizers.Tokenizer` from nothing but the GGUF's metadata
(tokenizer.ggml.tokens, .merges and .token_type), set up the way SmolLM2's
own tokenizer is, so the C++ tokenizer can be checked against it.

Usage:
  tokenize_reference.py MODEL.gguf --out=IDS.json [--decode] FILE...
      Writes {"FILE as given": [ids...], ...}. With --decode, also checks
      that decoding the ids gives back each file's text exactly; exits 1
      naming the first file that does not round-trip.
  tokenize_reference.py MODEL.gguf --ids=1,2,3
      Prints the text of the given ids (special tokens included).
"""
import argparse
import json
import sys

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL


def field(reader, key):
    return reader.fields[key].contents()


def build_tokenizer(reader):
    """Returns the Tokenizer described by an open gguf.GGUFReader."""
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        sys.exit(f"tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    # Byte-level tokens never hold a space (it is spelled "Ġ"), so each merge
    # is exactly two tokens separated by one space.
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]
    assert all(len(m) == 2 for m in merges)

    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens in the vocab"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               fuse_unk=False, byte_fallback=False))
    # SmolLM2 ("smollm" pre-tokenizer): every digit on its own, then GPT-2's
    # byte-level split.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # Control tokens are already in the vocab; adding them as special tokens
    # makes "<|im_start|>" in text map to its one id instead of being split.
    specials = [t for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    for t in specials:
        assert tok.token_to_id(t) == vocab[t]
    return tok


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("files", nargs="*")
    ap.add_argument("--out")
    ap.add_argument("--decode", action="store_true", help="check decode(encode(text)) == text")
    ap.add_argument("--ids", help="comma separated ids to decode and print")
    args = ap.parse_intermixed_args()

    tok = build_tokenizer(gguf.GGUFReader(args.model))
    if args.ids is not None:
        print(decode(tok, [int(i) for i in args.ids.split(",") if i.strip()]))
        return
    if not args.out or not args.files:
        ap.error("--out and at least one FILE are needed")

    result = {}
    for path in args.files:
        # newline="" keeps "\r\n" as is: the text is tokenized byte for byte.
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        ids = encode(tok, text)
        if args.decode and decode(tok, ids) != text:
            print(f"{path}: decode(encode(text)) != text", file=sys.stderr)
            sys.exit(1)
        result[path] = ids
    with open(args.out, "w") as f:
        json.dump(result, f)
        f.write("\n")


if __name__ == "__main__":
    main()
