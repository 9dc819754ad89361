"""Plain q40 vs repacked q40r kernels side by side: matvec GB/s (weight bytes) and batched rows/s.

Usage: python scripts/bench_repack.py [--rows 2048] [--cols 8192] [--batch 32] [--threads 1,2]
       [--isa avx2] [--split 0,1,2,4] [--prefetch -2,0,512,1024]   (matvec tuning sweeps: every
       combination is measured; split 0 / prefetch -2 = the ISA's default)
Each figure is the median of --trials short trials; both layouts run alternately in the same
window, rotating over several copies of the matrix (~256 MB) so weights come from memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dllama_mpi import kernels as K  # noqa: E402
from dllama_mpi.kernels import ffi, lib, ptr  # noqa: E402


def aligned(n: int) -> np.ndarray:
    buf = np.empty(n + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + n]


def repack(w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out = aligned(lib.dl_q40r_bytes(rows, cols))
    lib.dl_repack_q40(ffi.cast("void *", out.ctypes.data), ptr(w, "dl_block_q40"), rows, cols)
    return out


def timeit(fn, min_time=0.05):
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return dt / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--trials", type=int, default=9)
    ap.add_argument("--copies", type=int, default=0, help="matrix copies rotated (default: ~256 MB worth)")
    ap.add_argument("--isa", default=None, help="kernel path (default: the best this CPU has)")
    ap.add_argument("--split", default="0", help="matvec streams per thread, comma list (0 = ISA default)")
    ap.add_argument("--prefetch", default="-2", help="prefetch bytes, comma list (-2 = ISA default)")
    a = ap.parse_args()
    if a.isa:
        K.set_isa(a.isa)
    r = np.random.default_rng(0)
    rows, cols = a.rows, a.cols
    w0 = K.quantize_q40(r.standard_normal(rows * cols).astype(np.float32))
    wbytes = w0.size
    ncopy = a.copies or min(16, max(2, int(256e6 // wbytes)))
    plain = [aligned(wbytes) for _ in range(ncopy)]
    for p in plain:
        p[:] = w0
    packed = [repack(w0, rows, cols) for _ in range(ncopy)]
    x1 = K.quantize_q80(r.standard_normal(cols).astype(np.float32))
    xb = K.quantize_q80(r.standard_normal(a.batch * cols).astype(np.float32))
    out = aligned(4 * a.batch * rows).view(np.float32)
    op, x1p, xbp = ptr(out), ptr(x1, "dl_block_q80"), ptr(xb, "dl_block_q80")
    pp = [ptr(p, "dl_block_q40") for p in plain]
    rp = [ffi.cast("void *", p.ctypes.data) for p in packed]
    print(f"isa {K.isa_name()}, q40 {rows}x{cols} = {wbytes / 1e6:.1f} MB x {ncopy} copies; medians of {a.trials}")
    for nt in [int(t) for t in a.threads.split(",")]:
        K.set_threads(nt)
        i = [0]

        def run(kind, batch):
            x = x1p if batch == 1 else xbp
            if kind == "plain":
                def f():
                    lib.dl_matmul_q40_q80(op, pp[i[0] % ncopy], x, rows, cols, batch)
                    i[0] += 1
            else:
                def f():
                    lib.dl_matmul_q40r_q80(op, rp[i[0] % ncopy], x, rows, cols, batch)
                    i[0] += 1
            return f

        combos = [(int(sp), int(pf)) for sp in a.split.split(",") for pf in a.prefetch.split(",")]
        for sp, pf in combos:
            lib.dl_q40r_split(sp)
            lib.dl_weights_prefetch(pf)
            res = {k: [] for k in ("plain1", "q40r1", "plainB", "q40rB")}
            for _ in range(a.trials):
                res["plain1"].append(timeit(run("plain", 1)))
                res["q40r1"].append(timeit(run("q40r", 1)))
                res["plainB"].append(timeit(run("plain", a.batch)))
                res["q40rB"].append(timeit(run("q40r", a.batch)))
            m = {k: statistics.median(v) for k, v in res.items()}
            tune = f" split {lib.dl_q40r_split(-1)} prefetch {lib.dl_weights_prefetch(-1)}" if len(combos) > 1 else ""
            print(f"threads={nt}{tune}: matvec plain {wbytes / m['plain1'] / 1e9:6.2f} GB/s  q40r {wbytes / m['q40r1'] / 1e9:6.2f} GB/s"
                  f" | batch {a.batch}: plain {a.batch / m['plainB']:8.0f} rows/s  q40r {a.batch / m['q40rB']:8.0f} rows/s"
                  f" ({m['q40r1'] * a.batch / m['q40rB']:.1f}x its matvec)")
        lib.dl_q40r_split(0)
        lib.dl_weights_prefetch(-2)
    K.set_threads(1)


if __name__ == "__main__":
    main()
