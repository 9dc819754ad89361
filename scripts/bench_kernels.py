"""Kernel timings: matvec GB/s (weight bytes read) and batched matmul tokens/s-equivalent.

Usage: python scripts/bench_kernels.py [--rows 2048] [--cols 8192] [--batch 32] [--isa NAME]
                                       [--type q40,q40r,q80,q80r,f16,bf16,q41r,q50r,q4kr,q6kr,...]
(default q40; the GGUF types q41r / q50r / q51r / q2kr / q3kr / q4kr / q5kr / q6kr / iq4nlr / iq4xsr are
Q4_1 / Q5_0 / Q5_1 / Q2_K / Q3_K / Q4_K / Q5_K / Q6_K / IQ4_NL / IQ4_XS blocks of random codes and
scales, repacked as the engine does)
plus the read-bandwidth probe (dl_read_bytes) on the same bytes, the ceiling of a matvec.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dllama_mpi import kernels as K
from dllama_mpi.kernels import ffi, lib, ptr


# the GGUF block types on their repacked (rx) layouts, as the engine runs them
RX = {"q41r": "q4_1", "q50r": "q5_0", "q51r": "q5_1", "q2kr": "q2_k", "q3kr": "q3_k", "q4kr": "q4_k",
      "q5kr": "q5_k", "q6kr": "q6_k", "iq4nlr": "iq4_nl", "iq4xsr": "iq4_xs"}


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
    ap.add_argument("--type", default="q40", help="comma-separated: q40, q40r (repacked), q80, q80r, f16, bf16, "
                                                  "q41r, q50r, q51r, q2kr, q3kr, q4kr, q5kr, q6kr, iq4nlr, iq4xsr")
    a = ap.parse_args()
    isas = [a.isa] if a.isa else [K.isa_name(i) for i in K.supported_isas()]
    r = np.random.default_rng(0)
    rows, cols = a.rows, a.cols
    vals = r.standard_normal(rows * cols).astype(np.float32)
    x1f = r.standard_normal(cols).astype(np.float32)
    xbf = r.standard_normal(a.batch * cols).astype(np.float32)
    x1, xb = K.quantize_q80(x1f), K.quantize_q80(xbf)
    out = np.empty((a.batch, rows), dtype=np.float32)
    x1p, xbp, op = ptr(x1, "dl_block_q80"), ptr(xb, "dl_block_q80"), ptr(out)
    x1fp, xbfp = ptr(x1f), ptr(xbf)
    for wtype in a.type.split(","):
        if wtype in ("q40", "q40r"):
            base = K.quantize_q40(vals)
        elif wtype in ("q80", "q80r"):
            base = K.quantize_q80(vals)
        elif wtype == "f16":
            base = vals.astype(np.float16).view(np.uint8)
        elif wtype == "bf16":
            base = (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        elif wtype in RX:
            from dllama_mpi.formats import FLOAT_BY_NAME

            base = K.random_blocks(r, FLOAT_BY_NAME[RX[wtype]], rows, cols).reshape(-1)
        else:
            raise SystemExit(f"unknown --type {wtype}")
        wbytes = base.size
        if wtype == "q40r":
            rb = np.empty(lib.dl_q40r_bytes(rows, cols) + 64, np.uint8)
            rb = rb[(-rb.ctypes.data) % 64:][:lib.dl_q40r_bytes(rows, cols)]
            lib.dl_repack_q40(ptr(rb, "void"), ptr(base, "dl_block_q40"), rows, cols)
            base = rb
        if wtype in RX:
            name = wtype[:-1]
            n = getattr(lib, f"dl_{name}r_bytes")(rows, cols)
            rb = np.empty(n + 64, np.uint8)
            rb = rb[(-rb.ctypes.data) % 64:][:n]
            getattr(lib, f"dl_repack_{name}")(ptr(rb, "void"), ptr(base, "void"), rows, cols)
            base = rb
        if wtype == "q80r":
            rb = np.empty(lib.dl_q80r_bytes(rows, cols) + 64, np.uint8)
            rb = rb[(-rb.ctypes.data) % 64:][:lib.dl_q80r_bytes(rows, cols)]
            lib.dl_repack_q80(ptr(rb, "void"), ptr(base, "dl_block_q80"), rows, cols)
            base = rb
        # several copies of the matrix so it is read from memory, not from the cache
        ncopy = min(8, max(1, int(256e6 // wbytes)))
        w = [base.copy() for _ in range(ncopy)]
        ctype = {"q40": "dl_block_q40", "q40r": "void", "q80": "dl_block_q80", "q80r": "void",
                 "f16": "uint16_t", "bf16": "uint16_t"}.get(wtype, "void")
        wp = [ptr(m, ctype) for m in w]
        fn = {"q40": lambda o, m, b: lib.dl_matmul_q40_q80(o, m, x1p if b == 1 else xbp, rows, cols, b),
              "q40r": lambda o, m, b: lib.dl_matmul_q40r_q80(o, m, x1p if b == 1 else xbp, rows, cols, b),
              "q80": lambda o, m, b: lib.dl_matmul_q80_q80(o, m, x1p if b == 1 else xbp, rows, cols, b),
              "q80r": lambda o, m, b: lib.dl_matmul_q80r_q80(o, m, x1p if b == 1 else xbp, rows, cols, b),
              "f16": lambda o, m, b: lib.dl_matmul_f16_f32(o, m, x1fp if b == 1 else xbfp, rows, cols, b),
              "bf16": lambda o, m, b: lib.dl_matmul_bf16_f32(o, m, x1fp if b == 1 else xbfp, rows, cols, b)}.get(wtype)
        if fn is None:
            rx = getattr(lib, f"dl_matmul_{wtype}_q80")
            fn = lambda o, m, b: rx(o, m, x1p if b == 1 else xbp, rows, cols, b)  # noqa: E731
        print(f"{wtype} matrix {rows}x{cols} = {wbytes / 1e6:.1f} MB ({ncopy} copies rotated)")
        for isa in isas:
            K.set_isa(isa)
            for nt in [int(t) for t in a.threads.split(",")]:
                K.set_threads(nt)
                i = [0]

                def mv():
                    fn(op, wp[i[0] % ncopy], 1)
                    i[0] += 1

                def mb():
                    fn(op, wp[i[0] % ncopy], a.batch)
                    i[0] += 1

                def rd():
                    lib.dl_read_bytes(ffi.cast("void *", w[i[0] % ncopy].ctypes.data), wbytes)
                    i[0] += 1

                t1, tb, tr = bench(mv), bench(mb), bench(rd)
                print(f"{isa:7s} threads={nt}: matvec {t1 * 1e3:7.3f} ms = {wbytes / t1 / 1e9:6.2f} GB/s "
                      f"(read probe {wbytes / tr / 1e9:6.2f} GB/s) | batch {a.batch}: {tb * 1e3:7.3f} ms = "
                      f"{a.batch / tb:8.1f} rows/s ({t1 * a.batch / tb:5.1f}x the matvec rate)")
    K.set_threads(1)


if __name__ == "__main__":
    main()
