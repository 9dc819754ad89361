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


# ------------------------------------------------------------------------------------------------
# speculative decoding

class OracleSpec:
    """A drafter that knows the answer: it drafts up to k tokens of `ref` (a plain run's tokens) after
    what the sequence has generated, each token whose index is in `wrong` replaced by another; so a
    test decides where drafts are accepted and where they are rejected. (SeqSpec's interface.)"""

    def __init__(self, ref, k: int = 8, wrong=(), vocab: int = 512):
        from dllama_mpi.speculative import SpecConfig

        self.cfg = SpecConfig("ngram", draft_max=k)
        self.ref, self.k, self.wrong, self.vocab = list(ref), k, set(wrong), vocab
        self.drafts = []    # (index of the first drafted token, the draft, accepted) per verify pass

    def propose(self, prompt, generated, k_cap, pace=None):   # drafts its k whatever a row costs
        i = len(generated)
        draft = [(t + 1) % self.vocab if i + j in self.wrong else t
                 for j, t in enumerate(self.ref[i:i + min(self.k, k_cap)])]
        self.drafts.append([i, draft, None])
        return draft

    def verified(self, drafted, accepted):
        self.drafts[-1][1:] = self.drafts[-1][1][:drafted], accepted


def _untimed_pass_cost():
    from dllama_mpi.speculative import PassCost

    class UntimedPassCost(PassCost):
        """A row costs ROW_COST_PRIOR of a pass, always: the scheduler's drafts do not depend on how
        fast this host runs the test (the tokens never do; what is drafted and accepted would)."""

        def observe(self, rows, seconds):
            pass

    return UntimedPassCost


def _settings_runner(engine, name: str, steps: int):
    """run(spec, oracle=None): greedy, seeded and logprob requests of SEQS run together through the
    scheduler with a SpecConfig (an oracle drafter per request when given); returns
    ([(tokens, logprobs)] per request, the requests)."""
    from dllama_mpi.sampler import Sampler
    from dllama_mpi.scheduler import Request, Scheduler, run_to_completion
    from dllama_mpi.tokenizer import Tokenizer

    tok = Tokenizer.load(TINY / "t" / ("dllama_tokenizer_tiny_qwen3.t" if "qwen" in name else
                                       "dllama_tokenizer_tiny_llama3.t"))
    UntimedPassCost = _untimed_pass_cost()
    settings = [(0.0, None, None), (0.9, 3, None), (0.7, 5, 3)] * 2   # temperature, seed, logprobs

    def run(spec, oracle=None):
        sched = Scheduler(engine, tok, spec=spec)
        sched.pass_cost = UntimedPassCost()   # the draft lengths "what pays" chooses, whatever the host's load
        sched.drop_cached()
        reqs = []
        for i, (t, seed, lp) in enumerate(settings):
            pieces = []
            r = Request(SEQS[i % 3], steps, Sampler(engine.h.vocab_size, t, 0.9, seed), ignore_eos=True,
                        logprobs=lp, sink=lambda k, v, pieces=pieces: pieces.append(v) if k == "piece" else None)
            r.pieces = pieces
            if oracle is not None:
                r._spec = OracleSpec(oracle[i], k=7, wrong=range(3, steps, 5), vocab=engine.h.vocab_size)
            reqs.append(r)
        run_to_completion(sched, reqs)
        out = [(r.generated, [None if p.logprob is None else (p.logprob.logprob, p.logprob.top) for p in r.pieces])
               for r in reqs]
        return out, reqs

    return run


def spec_equals_plain(comm: Comm, name: str, steps: int = 40, **kw):
    """Root: [(plain tokens, spec tokens)] for greedy, seeded and logprob requests of SEQS run together
    through the scheduler, with --spec none, with ngram, and with an oracle drafter that has drafts
    rejected (every 5th token wrong) across page boundaries; and the tokens accepted by each
    speculating run. Workers: None."""
    from dllama_mpi.speculative import SpecConfig

    engine = build_engine(comm, model_path(name) if comm.is_root else None, n_slots=6, **kw)
    if not comm.is_root:
        engine.serve()
        return None
    try:
        run = _settings_runner(engine, name, steps)
        accepted = lambda reqs: sum(r.stats.accepted_tokens for r in reqs)  # noqa: E731
        plain, _ = run(SpecConfig())
        ngram, reqs = run(SpecConfig("ngram"))
        oracle, oreqs = run(SpecConfig("ngram"), [g for g, _ in plain])
        return plain, ngram, oracle, accepted(reqs), accepted(oreqs)
    finally:
        engine.stop_workers()


def draft_equals_plain(comm: Comm, name: str, draft_name: str, steps: int = 40, **kw):
    """Root: (plain, [(p_min, outputs, [(drafted, accepted)] per request)]): the greedy, seeded and
    logprob requests of SEQS run together with --spec none and with --spec draft (the model
    `draft_name` whole on the root; --draft-p-min 0 and the default), and the draft model's pages
    in use afterwards (0: every sequence gave them back). Workers: None."""
    from dllama_mpi.speculative import DRAFT_P_MIN, SpecConfig
    from dllama_mpi.startup import load_draft_model

    engine = build_engine(comm, model_path(name) if comm.is_root else None, n_slots=6, **kw)
    if not comm.is_root:
        engine.serve()
        return None
    try:
        engine.draft = load_draft_model(model_path(draft_name), engine)
        run = _settings_runner(engine, name, steps)
        plain, _ = run(SpecConfig())
        drafted = []
        for p_min in (0.0, DRAFT_P_MIN):
            # fixed: a tiny draft model costs what the model does, so drafting by what pays would not draft
            out, reqs = run(SpecConfig("draft", p_min=p_min, draft_model=model_path(draft_name), fixed=True))
            drafted.append((p_min, out, [(r.stats.draft_tokens, r.stats.accepted_tokens) for r in reqs]))
        return plain, drafted, engine.draft.kv.pages_in_use
    finally:
        engine.stop_workers()


def sampled_tokens(comm: Comm, name: str, steps: int = 24, **kw):
    """Root: ([(tokens, log-probabilities)] of seeded top-p requests over SEQS at several temperatures
    and top-p values, some with log-probabilities, run together through the scheduler; sampled rows
    the engine took from per-rank summaries; those it took whole). Workers: None."""
    from dllama_mpi.sampler import Sampler
    from dllama_mpi.scheduler import Request, Scheduler, run_to_completion
    from dllama_mpi.tokenizer import Tokenizer

    engine = build_engine(comm, model_path(name) if comm.is_root else None, n_slots=6, **kw)
    if not comm.is_root:
        engine.serve()
        return None
    try:
        tok = Tokenizer.load(TINY / "t" / ("dllama_tokenizer_tiny_qwen3.t" if "qwen" in name else
                                           "dllama_tokenizer_tiny_llama3.t"))
        settings = [(0.8, 0.9, None), (1.5, 0.999, 5), (0.5, 0.5, None), (1.0, 0.95, 20), (3.0, 0.99, None),
                    (0.7, 0.1, 2)]   # temperature, top-p, log-probabilities
        reqs = []
        for i, (t, p, lp) in enumerate(settings):
            pieces = []
            r = Request(SEQS[i % 3], steps, Sampler(engine.h.vocab_size, t, p, 11 + i), ignore_eos=True, logprobs=lp,
                        sink=lambda k, v, pieces=pieces: pieces.append(v) if k == "piece" else None)
            r.pieces = pieces
            reqs.append(r)
        run_to_completion(Scheduler(engine, tok), reqs)
        out = [(r.generated, [None if p.logprob is None else (p.logprob.logprob, p.logprob.top) for p in r.pieces])
               for r in reqs]
        return out, engine.sampled_rows_summarised, engine.sampled_rows_whole
    finally:
        engine.stop_workers()
