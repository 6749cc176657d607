"""Writes gguf-py's dequantization of a GGUF file's tensors: the reference
that gguf_test compares GgufFile::ReadF32 with, bit for bit.

Usage: $KVCACHE_PYTHON dump_gguf_tensors.py GGUF OUT_DIR [TENSOR...]

Writes into OUT_DIR:
  digests.tsv   one line per tensor, in file order:
                name TAB type TAB element count TAB sha256
                where the digest is of the tensor's float32 values,
                little-endian, ne[0] fastest (ReadF32's layout), or "-" if
                gguf-py cannot dequantize the type;
  TENSOR.f32    for each TENSOR named: those float32 values.
"""
import hashlib
import pathlib
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def float32_values(tensor):
    values = dequantize(tensor.data, tensor.tensor_type)
    values = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    if values.size != tensor.n_elements:
        sys.exit(f"{tensor.name}: {values.size} values, expected "
                 f"{tensor.n_elements}")
    return values


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    reader = GGUFReader(sys.argv[1])
    out_dir = pathlib.Path(sys.argv[2])
    wanted = set(sys.argv[3:])
    lines = []
    for tensor in reader.tensors:
        try:
            values = float32_values(tensor)
        except NotImplementedError:
            lines.append(f"{tensor.name}\t{tensor.tensor_type.name}\t"
                         f"{tensor.n_elements}\t-\n")
            continue
        digest = hashlib.sha256(values.tobytes()).hexdigest()
        lines.append(f"{tensor.name}\t{tensor.tensor_type.name}\t"
                     f"{tensor.n_elements}\t{digest}\n")
        if tensor.name in wanted:
            values.tofile(out_dir / f"{tensor.name}.f32")
            wanted.discard(tensor.name)
    if wanted:
        sys.exit(f"no tensors named {sorted(wanted)}")
    (out_dir / "digests.tsv").write_text("".join(lines))


if __name__ == "__main__":
    main()
