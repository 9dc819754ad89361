"""Shared helpers for the golden-output tests (single rank and under mpiexec)."""

import json

import numpy as np

from dllama_mpi.comm import Comm
from dllama_mpi.startup import build_engine

from conftest import TINY


def golden(case: str) -> tuple[dict, np.ndarray]:
    meta = json.loads((TINY / "golden" / f"{case}.json").read_text())
    logits = np.load(TINY / "golden" / meta["logits_file"].split("/")[-1])
    return meta, logits


def model_path(name: str) -> str:
    return str(TINY / "m" / f"dllama_model_{name}.m")


def teacher_forced_logits(comm: Comm, name: str, case: str, **kw):
    """Logits at every position for the golden's prompt + generated tokens (root: array; workers: None)."""
    meta, _ = golden(case)
    engine = build_engine(comm, model_path(name) if comm.is_root or kw.get("load") == "local" else None, **kw)
    if not comm.is_root:
        engine.serve()
        return None, engine
    try:
        ids = meta["prompt_ids"] + meta["generated_ids"][:-1]
        return engine.forward(ids, 0, all_logits=True), engine
    finally:
        engine.stop_workers()


def greedy_ids(comm: Comm, name: str, prompt_ids, steps: int, argmax: bool = False, **kw):
    """Greedy generation through the engine (root: list of ids; workers: None): np.argmax of the
    gathered logits, or with argmax=True the engine's distributed (value, id) reduction."""
    engine = build_engine(comm, model_path(name) if comm.is_root or kw.get("load") == "local" else None, **kw)
    if not comm.is_root:
        engine.serve()
        return None
    try:
        out = []
        best = lambda r: r if argmax else int(np.argmax(r))  # noqa: E731
        t = best(engine.forward(prompt_ids, 0, argmax=argmax))
        pos = len(prompt_ids)
        for _ in range(steps):
            out.append(t)
            t = best(engine.forward([t], pos, argmax=argmax))
            pos += 1
        return out
    finally:
        engine.stop_workers()


# ------------------------------------------------------------------------------------------------
# many sequences per pass

# three prompts of different lengths; the last two share their first 20 tokens
SEQS = [
    [(7 * i + 3) % 250 + 1 for i in range(5)],
    [(11 * i + 5) % 250 + 1 for i in range(20)] + [(3 * i) % 250 + 1 for i in range(17)],
    [(11 * i + 5) % 250 + 1 for i in range(20)] + [(13 * i + 1) % 250 + 1 for i in range(9)],
]


def rows_logits(engine, seqs, passes):
    """Root: evaluate the sequences with the rows grouped into the given passes (each a list of
    (sequence, position); a sequence's positions in increasing order), every sequence in a slot of
    its own and no page shared; logits of every row: {(sequence, position): [vocab]}."""
    from dllama_mpi.engine import LOGITS_FULL, Rows
    from dllama_mpi.kvcache import KVCache

    kv = engine.kv = KVCache(engine.kv_plan)
    live = [kv.admit([], len(s)) for s in seqs]
    out = {}
    for rows in passes:
        for s, p in rows:
            kv.ensure(live[s], p + 1)
        r = Rows([seqs[s][p] for s, p in rows], [live[s].slot for s, _ in rows], [p for _, p in rows],
                 list(range(len(rows))), [LOGITS_FULL] * len(rows))
        res = engine.step(r, *kv.take_commands())
        for (s, p), logits in zip(rows, res):
            out[(s, p)] = np.array(logits)
    return out


def batch_invariance(comm: Comm, name: str, **kw):
    """Root: (logits of each sequence run alone, the same rows mixed into shared passes); both
    {(sequence, position): logits}. Workers: (None, None)."""
    engine = build_engine(comm, model_path(name) if comm.is_root else None, n_slots=len(SEQS), **kw)
    if not comm.is_root:
        engine.serve()
        return None, None
    try:
        B = engine.max_batch
        alone = []
        for s, toks in enumerate(SEQS):
            rows = [(s, p) for p in range(len(toks))]
            alone += [rows[i:i + B] for i in range(0, len(rows), B)]
        # mixed: round-robin over the sequences, so each pass holds rows of several of them
        order, idx = [], [0] * len(SEQS)
        while any(i < len(t) for i, t in zip(idx, SEQS)):
            for s, toks in enumerate(SEQS):
                if idx[s] < len(toks):
                    order.append((s, idx[s]))
                    idx[s] += 1
        mixed = [order[i:i + B] for i in range(0, len(order), B)]
        return rows_logits(engine, SEQS, alone), rows_logits(engine, SEQS, mixed)
    finally:
        engine.stop_workers()


def scheduled_alone_and_together(comm: Comm, name: str, steps: int = 10, **kw):
    """Root: greedy tokens of each of SEQS run alone through the scheduler, and of all of them (plus
    a late twin of the second) run together. Workers: (None, None)."""
    from dllama_mpi.sampler import Sampler
    from dllama_mpi.scheduler import Request, Scheduler, run_to_completion
    from dllama_mpi.tokenizer import Tokenizer

    engine = build_engine(comm, model_path(name) if comm.is_root else None, n_slots=4, **kw)
    if not comm.is_root:
        engine.serve()
        return None, None
    try:
        tok = Tokenizer.load(TINY / "t" / ("dllama_tokenizer_tiny_qwen3.t" if "qwen" in name else
                                           "dllama_tokenizer_tiny_llama3.t"))
        req = lambda p: Request(p, steps, Sampler(engine.h.vocab_size, 0.0), ignore_eos=True)  # noqa: E731
        sched = Scheduler(engine, tok)
        alone = []
        for p in SEQS:
            r = req(p)
            run_to_completion(sched, [r])
            engine.kv.drop_cached()
            alone.append(r.generated)
        rs = [req(p) for p in SEQS]
        run_to_completion(sched, rs[:2])    # the first two end, their pages stay cached
        late = [req(SEQS[2]), req(SEQS[1])]
        run_to_completion(sched, late)      # the twin shares its prompt's cached pages
        return alone + [alone[1]], [r.generated for r in rs[:2]] + [r.generated for r in late]
    finally:
        engine.stop_workers()
