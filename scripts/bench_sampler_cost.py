"""What sampling one token costs the root of one rank: this tree's sampler against another revision's
(default 63f8883, numpy's float32 softmax), on a synthetic logits row of SmolLM2's and Gemma 3's
vocabulary size, and the summary of half a row (a rank's share at N = 2). Alternating, ROUNDS rounds.

    .venv/bin/python scripts/bench_sampler_cost.py [REV] [--rounds 3] [--draws 100]"""

import argparse
import importlib.util
import subprocess
import tempfile
import time

import numpy as np

from dllama_mpi.sampler import Sampler, slice_summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rev", nargs="?", default="63f8883")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draws", type=int, default=100)
    a = ap.parse_args()
    src = subprocess.run(["git", "show", f"{a.rev}:dllama_mpi/sampler.py"], check=True, capture_output=True).stdout
    with tempfile.NamedTemporaryFile("wb", suffix=".py") as f:
        f.write(src)
        f.flush()
        spec = importlib.util.spec_from_file_location("old_sampler", f.name)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    rng = np.random.default_rng(0)
    for vocab in (49152, 262144):
        x = (rng.standard_normal(vocab) * 2.5).astype(np.float32)
        x[:5] += 14
        res = {a.rev: [], "this tree": [], "summary of half": []}
        for _ in range(a.rounds):
            for name, cls in ((a.rev, old.Sampler), ("this tree", Sampler)):
                s = cls(vocab, 0.8, 0.9, 1)
                s.sample(x)
                t = time.perf_counter()
                for _ in range(a.draws):
                    s.sample(x)
                res[name].append((time.perf_counter() - t) / a.draws * 1e6)
            half = x[:vocab // 2].copy()
            t = time.perf_counter()
            for _ in range(a.draws):
                slice_summary(half, np.float32(1.25))
            res["summary of half"].append((time.perf_counter() - t) / a.draws * 1e6)
        print(f"vocab {vocab}, us per token: " + "; ".join(f"{k} {', '.join(f'{v:.0f}' for v in vs)}"
                                                        for k, vs in res.items()))


if __name__ == "__main__":
    main()
