"""The attention kernel alone: dl_attention (each KV head's rows read once for a group of queries)
against dl_attention_rows (one task per row and query head, each reading its rows), the same bits,
alternating A / B in every round, on a model's attention shape over a cache of random rows.

    .venv/bin/python scripts/bench_attention.py [--shape smollm2|gemma3] [--depth 100,400,2000]
                                                [--rows 1,2,4,8] [--threads 2] [--repeat 20] [--rounds 2]

Shapes: smollm2 (30 layers, 9 query heads over 3 KV heads of 64), gemma3 (18 layers, 4 query heads
over 1 KV head of 256; 15 of them a 512-token sliding window). Each layer has its own cache (as in a
forward pass: one layer's rows are not in cache when the next starts). Prints, per depth and rows,
the median ms of a pass's attention (every layer) for each kernel per round, and their ratio."""

import argparse
import statistics
import time

import numpy as np

from dllama_mpi import kernels
from dllama_mpi.kernels import ffi, lib

SHAPES = {   # n_q_heads, n_kv_heads, head_dim, layers, sliding window of the local layers, local layers
    "smollm2": (9, 3, 64, 30, 0, 0),
    "gemma3": (4, 1, 256, 18, 512, 15),
}
PAGE = 16


def _p(a, t="float *"):
    return ffi.cast(t, a.ctypes.data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--depth", default="100,400,2000")
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    kernels.set_threads(a.threads)
    nq, nkv, hd, layers, window, local = SHAPES[a.shape]
    r = np.random.default_rng(0)
    kv_of_q = np.array([h * nkv // nq for h in range(nq)], np.int32)
    print(f"{a.shape}: {layers} layers, {nq} query heads over {nkv} KV heads of {hd}, {a.threads} threads, "
          f"isa {kernels.get_isa()}")
    for depth in (int(x) for x in a.depth.split(",")):
        for rows in (int(x) for x in a.rows.split(",")):
            n_pages = (depth + rows) // PAGE + 2
            caches = [(r.random((n_pages * PAGE, nkv * hd), dtype=np.float32),
                       r.random((n_pages * PAGE, nkv * hd), dtype=np.float32)) for _ in range(layers)]
            q = r.random((rows, nq * hd), dtype=np.float32)
            out = np.empty_like(q)
            tables = np.arange(n_pages, dtype=np.int32).reshape(1, -1)
            pos = np.arange(depth, depth + rows, dtype=np.int32)
            slot = np.zeros(rows, np.int32)
            kv = ffi.new("dl_kv_pages *", {"tables": _p(tables, "int32_t *"), "table_stride": n_pages,
                                           "page_size": PAGE, "ring_pages": 0})
            args = (_p(q), _p(kv_of_q, "int32_t *"), nq, nkv, hd, _p(pos, "int32_t *"), _p(slot, "int32_t *"), rows, kv)
            for rnd in range(a.rounds):
                ms = {}
                for name, fn in (("rows", lib.dl_attention_rows), ("grouped", lib.dl_attention)):
                    ts = []
                    for _ in range(a.repeat):
                        t = time.perf_counter()
                        for li, (k, v) in enumerate(caches):
                            fn(_p(out), args[0], _p(k), _p(v), *args[1:], window if li < local else 0, float(np.sqrt(hd)))
                        ts.append(time.perf_counter() - t)
                    ms[name] = 1e3 * statistics.median(ts)
                print(f"depth {depth} rows {rows} round {rnd + 1}: per row-head {ms['rows']:.3f} ms, grouped "
                      f"{ms['grouped']:.3f} ms, x{ms['rows'] / ms['grouped']:.2f}", flush=True)


if __name__ == "__main__":
    main()
