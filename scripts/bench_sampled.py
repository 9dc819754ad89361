"""Sampled decoding over N ranks: the rows drawn from per-rank summaries (the default) against the same
rows gathered whole on the root (what every sampled row did before), alternating, one stream at a time.

    mpiexec -n 2 .venv/bin/python scripts/bench_sampled.py [MODEL] --prompts FILE.jsonl [--steps 64]
        [--rounds 3] [--spec none|ngram] [--temperature 0.8] [--topp 0.9] [--nthreads 1] [--as-nodes 0]

Prints per round and way the decode tok/s (generated tokens after the first over their time, over
every prompt), the sampled rows summarised / gathered, and whether both ways drew the same tokens
(they must: the same seeds, the same rule)."""

import argparse
import json
import statistics

from mpi4py import MPI

from dllama_mpi.chat import render_prompt, template_for
from dllama_mpi.comm import Comm
from dllama_mpi.sampler import Sampler
from dllama_mpi.scheduler import Request, Scheduler, WholeRowRequest, run_to_completion
from dllama_mpi.speculative import SpecConfig
from dllama_mpi.startup import resolve_model, start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--spec", default="none")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--topp", type=float, default=0.9)
    ap.add_argument("--nthreads", type=int, default=1)
    a = ap.parse_args()
    comm = Comm(MPI.COMM_WORLD)
    model, tok_path = resolve_model(a.model, None) if comm.is_root else (None, None)
    engine, tok = start(comm, model, tok_path, a.nthreads, "q80", 2048, "ring", "scatter", 8)
    if not comm.is_root:
        engine.serve()
        return
    try:
        template = template_for(tok, None)
        prompts = []
        for line in open(a.prompts):
            text = render_prompt(template, json.loads(line)["messages"], a.prompts)
            prompts.append(tok.encode(text, add_bos=False))
        sched = Scheduler(engine, tok, spec=SpecConfig(a.spec))
        results = {"summaries": [], "whole": []}
        for rnd in range(a.rounds + 1):      # round 0 warms up
            order = ["summaries", "whole"] if rnd % 2 else ["whole", "summaries"]
            tokens = {}
            for way in order:
                cls = Request if way == "summaries" else WholeRowRequest
                s0, g0 = engine.sampled_rows_summarised, engine.sampled_rows_whole
                n_tok, seconds, out = 0, 0.0, []
                for i, ids in enumerate(prompts):
                    sched.drop_cached()
                    r = cls(ids, a.steps, Sampler(engine.h.vocab_size, a.temperature, a.topp, 100 + i),
                            ignore_eos=True)
                    run_to_completion(sched, [r])
                    n_tok += r.stats.generated_tokens - 1
                    seconds += r.stats.generate_seconds
                    out.append(r.generated)
                tokens[way] = out
                if rnd:
                    results[way].append(n_tok / seconds)
                print(f"round {rnd} {way:9s}: {n_tok / seconds:7.1f} tok/s, sampled rows summarised "
                      f"{engine.sampled_rows_summarised - s0}, gathered {engine.sampled_rows_whole - g0}",
                      flush=True)
            print(f"round {rnd}: same tokens both ways: {tokens['summaries'] == tokens['whole']}", flush=True)
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"median tok/s: summaries {med['summaries']:.1f}, whole {med['whole']:.1f}, "
              f"ratio {med['summaries'] / med['whole']:.3f}")
    finally:
        engine.stop_workers()


if __name__ == "__main__":
    main()
