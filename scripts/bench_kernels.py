"""Kernel timings: q40 x q80 matvec GB/s (weight bytes read) and batched matmul tokens/s-equivalent.

Usage: python scripts/bench_kernels.py [--rows 2048] [--cols 8192] [--batch 32] [--isa NAME]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dllama_mpi import kernels as K
from dllama_mpi.kernels import lib, ptr


def bench(fn, trials=7, min_time=0.1):
    """Best (minimum) mean time per call over several short trials: robust to other load."""
    fn()
    best = float("inf")
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        best = min(best, dt / n)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--isa", default=None)
    ap.add_argument("--threads", default="1,2")
    a = ap.parse_args()
    isas = [a.isa] if a.isa else [K.isa_name(i) for i in K.supported_isas()]
    r = np.random.default_rng(0)
    rows, cols = a.rows, a.cols
    # several copies of the matrix so it is read from memory, not from the cache
    ncopy = max(1, int(256e6 // (rows * cols // 32 * 18)))
    ncopy = min(ncopy, 8)
    w = [K.quantize_q40(r.standard_normal(rows * cols).astype(np.float32)) for _ in range(1)]
    w = [w[0].copy() for _ in range(ncopy)]
    wbytes = w[0].size
    x1 = K.quantize_q80(r.standard_normal(cols).astype(np.float32))
    xb = K.quantize_q80(r.standard_normal(a.batch * cols).astype(np.float32))
    out = np.empty((a.batch, rows), dtype=np.float32)
    wp = [ptr(m, "dl_block_q40") for m in w]
    x1p, xbp, op = ptr(x1, "dl_block_q80"), ptr(xb, "dl_block_q80"), ptr(out)
    print(f"q40 matrix {rows}x{cols} = {wbytes / 1e6:.1f} MB ({ncopy} copies rotated)")
    for isa in isas:
        K.set_isa(isa)
        for nt in [int(t) for t in a.threads.split(",")]:
            K.set_threads(nt)
            i = [0]

            def mv():
                lib.dl_matmul_q40_q80(op, wp[i[0] % ncopy], x1p, rows, cols, 1)
                i[0] += 1

            def mb():
                lib.dl_matmul_q40_q80(op, wp[i[0] % ncopy], xbp, rows, cols, a.batch)
                i[0] += 1

            t1 = bench(mv)
            tb = bench(mb)
            print(f"{isa:7s} threads={nt}: matvec {t1 * 1e3:7.3f} ms = {wbytes / t1 / 1e9:6.2f} GB/s | "
                  f"batch {a.batch}: {tb * 1e3:7.3f} ms = {a.batch / tb:8.1f} rows/s "
                  f"({t1 * a.batch / tb:5.1f}x the matvec rate)")
    K.set_threads(1)


if __name__ == "__main__":
    main()
