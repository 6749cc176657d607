#!/usr/bin/python3
"""Writes reference logits for the chat model's parity test.

Usage: make_reference_logits.py KVDATA_DIR DUMP_NAME OUT_DIR

Runs kvdump.py's own forward pass (imported, not re-implemented, so the
reference is exactly the code that produced the dumps) over a dump's token
ids, teacher-forced: the sampler is replaced by one that replays the
manifest's tokens, and the classifier is wrapped to record each position's
logits. A first run checks that the replay reproduces the dump's .kv bytes
and mean_token_nll. A second run keeps the KV cache in fp16, as the C++
worker does (kvdump.py keeps it in fp32: rounding K and V to fp16 moves later
layers' values by up to ~0.03, which would swamp a logits comparison), and
its logits are written, into OUT_DIR:
  DUMP_NAME.logits.f32   little-endian float32 [position][vocab]
  DUMP_NAME.logits.json  the positions, vocab size, input tokens and the
                         mean NLL over all positions
"""
import json
import pathlib
import sys
import types

import numpy as np

# Spread over the whole context so errors that grow with position show up.
POSITIONS = [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 510, 511]


class LogitsRecorder:
    """Stands in for the classifier matrix; records every product."""

    def __init__(self, weight):
        self.weight = weight
        self.rows = []

    def __matmul__(self, x):
        logits = self.weight @ x
        self.rows.append(logits)
        return logits


class Fp16Cache(np.ndarray):
    """A float32 array that rounds what is stored in it through fp16."""

    def __setitem__(self, index, value):
        super().__setitem__(index, np.asarray(value, np.float32).astype(np.float16))


class ReplaySampler:
    """Stands in for numpy's Generator: 'samples' the recorded tokens."""

    def __init__(self, token_ids):
        self.token_ids = iter(token_ids)

    def choice(self, n, p):
        return next(self.token_ids)


def main():
    kvdata, name, out_dir = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
    sys.path.insert(0, str(kvdata))
    import kvdump

    manifest = json.loads((kvdata / f"{name}.json").read_text())
    gen = manifest["generation"]
    ids = gen["token_ids"]
    numpy = kvdump.np

    def run(fp16_cache):
        model = kvdump.load(str(kvdata / "stories260K.bin"))
        recorder = LogitsRecorder(model["wcls"])
        model["wcls"] = recorder
        # kvdump sees a numpy whose sampler replays the tokens and, for an
        # fp16 cache, whose 3-D zeros (its K, V and Q stores) round on write;
        # Q is only stored for the dump, never read back.
        def zeros(shape, dtype=float):
            array = numpy.zeros(shape, dtype)
            return array.view(Fp16Cache) if fp16_cache and np.ndim(shape) == 1 and len(shape) == 3 else array
        random = types.SimpleNamespace(default_rng=lambda seed: ReplaySampler(ids))
        kvdump.np = types.SimpleNamespace(**{**vars(numpy), "zeros": zeros, "random": random})
        try:
            K, V, _, toks, nll = kvdump.run(model, len(ids), gen["seed"], gen["temperature"])
        finally:
            kvdump.np = numpy
        assert toks == ids
        L, KVH, hd = model["L"], model["KVH"], model["hd"]
        kv = np.stack([K, V], axis=1).reshape(L, 2, len(ids), KVH, hd).astype("<f2")
        return model, recorder, kv, nll

    model, _, kv, nll = run(fp16_cache=False)
    assert abs(nll - gen["mean_token_nll"]) < 1e-4, nll
    assert kv.tobytes() == (kvdata / manifest["kv_file"]).read_bytes()
    model, recorder, _, nll = run(fp16_cache=True)

    np.stack([recorder.rows[p] for p in POSITIONS]).astype("<f4").tofile(
        out_dir / f"{name}.logits.f32")
    meta = {
        "source": f"kvdump.py forward pass with an fp16 KV cache, teacher-forced on {name}.json",
        "layout": "little-endian float32 [position][vocab]",
        "vocab": int(model["vocab"]),
        "positions": POSITIONS,
        "mean_token_nll": nll,
        "input_tokens": "BOS (1) then generation.token_ids[:-1]",
    }
    (out_dir / f"{name}.logits.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(name, "mean nll with an fp16 cache", round(nll, 4), "positions", len(POSITIONS))


if __name__ == "__main__":
    main()
