"""What a pass of b rows costs, one rank: the rows of one sequence after a prompt (a speculative
verify pass, or b streams' decode rows), b = 1..N, timed in-process with the C calls split out
(benchmark's timing proxy). Prints per b the median wall ms of a pass, its C ms, and the C ms of
the layer matmuls (every matrix kernel but the classifier's: a model whose layers share its type counts none).

    .venv/bin/python scripts/bench_rows.py [MODEL] [--rows 1,2,3,4,5] [--depth 136] [--repeat 30]
                                           [--threads 2] [--rounds 2] [--prefetch 0,2048]

Rounds go over every b again, so a loaded host's drift shows as spread. --prefetch: the weights'
prefetch distances (dl_weights_prefetch, bytes) to compare, each round in another order, with every
pass's logits rows (verify rows); a median table per distance at the end. With AB_TREE=DIR the
dllama_mpi package of DIR is used (scripts/bench_ab.sh's export of another revision)."""

import argparse
import importlib
import os
import statistics
import sys
import time

if os.environ.get("AB_TREE"):
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
    sys.path.insert(0, os.environ["AB_TREE"])

from dllama_mpi import kernels  # noqa: E402
from dllama_mpi.benchmark import _TimedLib  # noqa: E402
from dllama_mpi.comm import solo  # noqa: E402
from dllama_mpi.startup import build_engine, resolve_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--rows", default="1,2,3,4,5")
    ap.add_argument("--depth", type=int, default=136)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefetch", default=None, help="distances in bytes, comma-separated (default: the kernels' own)")
    a = ap.parse_args()
    model, _ = resolve_model(a.model, None)
    kernels.set_threads(a.threads)
    e = build_engine(solo(), model, quiet=True, max_batch=32)
    prompt = [(7 * i + 3) % 4000 + 10 for i in range(a.depth)]
    e.forward(prompt, 0)
    timed = _TimedLib(kernels.lib)
    for name in ("engine", "sync", "weights"):
        importlib.import_module(f"dllama_mpi.{name}").lib = timed
    wcls_kernel = e.w.wcls.spec.kernel
    dists = [int(x) for x in a.prefetch.split(",")] if a.prefetch else [None]
    rows = [int(x) for x in a.rows.split(",")]
    table = {}
    for rnd in range(a.rounds):
        for pf in dists if rnd % 2 == 0 else dists[::-1]:
            if pf is not None:
                kernels.lib.dl_weights_prefetch(pf)
            for b in rows:
                table.setdefault((pf, b), []).append(run(e, timed, prompt, b, a, wcls_kernel, rnd, pf))
    if a.prefetch:
        kernels.lib.dl_weights_prefetch(-2)
        for pf in dists:
            print(f"prefetch {pf}: " + " | ".join(
                f"{b} rows {statistics.median(table[(pf, b)]):.2f} ms ({', '.join(f'{x:.2f}' for x in table[(pf, b)])})"
                for b in rows))


def run(e, timed, prompt, b, a, wcls_kernel, rnd, pf) -> float:
    """One round's passes of b rows: prints their medians, returns the wall ms."""
    walls, cs, layers = [], [], []
    for _ in range(a.repeat):
        for k in timed.by_name:
            timed.by_name[k] = 0.0
        timed.seconds = 0.0
        t = time.perf_counter()
        e.forward(prompt[:b], a.depth, all_logits=True)   # every row's logits, as verify rows
        walls.append(time.perf_counter() - t)
        cs.append(timed.seconds)
        layers.append(sum(v for k, v in timed.by_name.items() if k.startswith("dl_matmul") and k != wcls_kernel))
    med = lambda v: 1e3 * statistics.median(v)  # noqa: E731
    label = "" if pf is None else f" prefetch {pf}"
    print(f"round {rnd + 1}{label} rows {b}: pass {med(walls):.2f} ms, C {med(cs):.2f} ms, layer matmuls "
          f"{med(layers):.2f} ms", flush=True)
    return med(walls)


if __name__ == "__main__":
    main()
