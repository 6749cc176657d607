#!/usr/bin/env python3
"""Compares two logits files row by row (e.g. the C++ worker's against llama_reference.py's).

Usage: compare_logits.py A.f32 B.f32 --vocab=N [--abs_tol=X] [--top1]

Both files are little-endian float32 [rows][vocab]. Prints, per row, the max
absolute difference, the largest |logit| (of A) and whether the argmaxes
agree. Exits 1 if any row's max difference exceeds --abs_tol (when given),
or, with --top1, if any argmax differs.
"""
import argparse
import sys

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--abs_tol", type=float)
    ap.add_argument("--top1", action="store_true", help="fail if any row's argmax differs")
    args = ap.parse_args()

    a, b = (np.fromfile(path, "<f4") for path in (args.a, args.b))
    if a.size != b.size or a.size % args.vocab:
        sys.exit(f"sizes differ or are not whole rows of {args.vocab}: {a.size}, {b.size} floats")
    a, b = a.reshape(-1, args.vocab), b.reshape(-1, args.vocab)

    ok = True
    for row, (x, y) in enumerate(zip(a, b)):
        diff = float(np.max(np.abs(x - y)))  # NaN anywhere makes this NaN, which fails below
        same_top = int(np.argmax(x)) == int(np.argmax(y))
        bad = (args.abs_tol is not None and not diff <= args.abs_tol) or (args.top1 and not same_top)
        ok &= not bad
        print(f"row {row}: max_abs_diff={diff:.6g} max_abs_logit={float(np.max(np.abs(x))):.6g} "
              f"argmax {int(np.argmax(x))} vs {int(np.argmax(y))} {'agree' if same_top else 'DIFFER'}"
              f"{'  FAIL' if bad else ''}")
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
