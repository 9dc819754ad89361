"""What n-gram speculation can give on a prompt set, whatever the kernels: a model's own greedy
tokens (decoded plainly, one rank) replayed through this engine's drafter, with each pass costing
1 + b x (its drafted rows) one-row passes, b being what an extra row costs relative to a one-row pass
(the engine's PassCost fits it from the verify passes; ~0.3 for SmolLM2 on 2 cores, smaller where a
pass waits on memory or on the network). For each b it prints the modeled speedup over plain decoding
(tokens / pass costs) and tokens per pass for

- the rule: the scheduler's own (speculative.SeqSpec + Pace with that b: how long a draft pays);
- hindsight: every draft cut exactly where the model's tokens stop matching it (no rejected row is
  ever paid for; the bound of any length rule on these proposals).

So it separates what the proposals allow from what the rows cost: if hindsight is below a goal at
the measured b, no draft-length rule reaches it on this host. --pass-ms prices passes by a measured
table instead (a pass's ms by its rows, e.g. scripts/bench_rows.py's medians; sizes between two
measured ones interpolated, past the last extrapolated from the last two): where a pass's time is not
a line in its rows, the rule sees that table as the scheduler's PassCost would learn it.

    .venv/bin/python scripts/spec_bound.py PROMPTS.jsonl [--model FILE] [--chat-template NAME]
                                           [--steps 64] [--row-cost 0.05,0.1,0.2,0.3]
                                           [--pass-ms 1:6.3,2:8.4,4:10.2,8:20.1,16:34.4]
"""

import argparse

from dllama_mpi import kernels
from dllama_mpi import speculative as S
from dllama_mpi.benchmark import _read_prompts
from dllama_mpi.chat import render_prompt, template_for
from dllama_mpi.comm import solo
from dllama_mpi.sampler import Sampler
from dllama_mpi.scheduler import Request, Scheduler, run_to_completion
from dllama_mpi.startup import resolve_model, start


class Line:
    """A pass of r rows costs 1 + b (r - 1) one-row passes; the rule's Pace knows that line."""

    def __init__(self, b: float):
        self.b, self.label = b, f"{b:g}"

    def __call__(self, rows: int) -> float:
        return 1 + self.b * (rows - 1)

    def pace(self) -> S.Pace:
        return S.Pace(1.0, self.b, 0.0, 1)


class Table:
    """A pass of r rows costs the measured ms[r] / ms[1] (linear between measured sizes, and past the
    last along its last two); the rule's Pace sees the PassCost that those passes would teach."""

    def __init__(self, spec: str):
        try:
            ms = dict(sorted((int(r), float(t)) for r, t in (x.split(":") for x in spec.split(","))))
        except ValueError:
            raise SystemExit(f"--pass-ms {spec}: give ROWS:MS pairs, e.g. 1:6.3,2:8.4,4:10.2") from None
        if 1 not in ms or len(ms) < 2 or min(ms) < 1 or min(ms.values()) <= 0:
            raise SystemExit(f"--pass-ms {spec}: give the 1-row pass and at least one other size, positive times")
        rs = list(ms)
        self.rel = {}
        for r in range(1, S.DRAFT_MAX + 2):
            lo = max([x for x in rs if x <= r] or rs[:1])
            hi = min([x for x in rs if x > lo] or rs[-1:])
            if hi == lo:
                lo, hi = rs[-2], rs[-1]
            self.rel[r] = (ms[lo] + (ms[hi] - ms[lo]) * (r - lo) / (hi - lo)) / ms[1]
        self.cost = S.PassCost()
        for _ in range(50):   # many passes of every size, as a long run would have timed them
            for r in rs:
                self.cost.observe(r, self.rel[r])
        self.label = "measured (" + ", ".join(f"{r}: {self.rel[r]:.2f}" for r in rs) + ")"

    def __call__(self, rows: int) -> float:
        return self.rel[rows]

    def pace(self) -> S.Pace:
        return self.cost.pace(1)


def replay_rule(prompt: list[int], out: list[int], price) -> tuple[float, int]:
    """(cost in one-row passes, passes) of the scheduler's rule on these tokens."""
    st = S.SeqSpec(S.SpecConfig(method="ngram"))
    i = passes = 0
    cost = 0.0
    while i < len(out):
        draft = st.propose(prompt, out[:i], len(out) - i, price.pace())
        acc = 0
        while acc < len(draft) and i + acc < len(out) and draft[acc] == out[i + acc]:
            acc += 1
        st.verified(len(draft), acc)
        i += min(acc + 1, len(out) - i)
        passes += 1
        cost += price(1 + len(draft))
    return cost, passes


def replay_hindsight(prompt: list[int], out: list[int], price, k_max: int = S.DRAFT_MAX) -> tuple[float, int]:
    """The same proposals, each cut where it stops matching (drafts that would be wholly rejected
    are not made)."""
    d = S.NgramDrafter()
    i = passes = 0
    cost = 0.0
    while i < len(out):
        seq = prompt + out[:i]
        d.extend(seq[len(d.tokens):])
        n, j = d.match()
        prop = d.continuation(j, k_max) if n else []
        acc = 0
        while acc < len(prop) and i + acc < len(out) and prop[acc] == out[i + acc]:
            acc += 1
        if acc:
            d.copy_offset = j - len(d.tokens)   # a draft that was made: the sequence copies from there (SeqSpec)
        i += min(acc + 1, len(out) - i)
        passes += 1
        cost += price(1 + acc)
    return cost, passes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prompts")
    ap.add_argument("--model", default=None)
    ap.add_argument("--chat-template", default=None)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--row-cost", default="0.05,0.1,0.2,0.3")
    ap.add_argument("--pass-ms", default=None, help="a pass's ms by its rows, '1:6.3,2:8.4,...'")
    a = ap.parse_args()
    prices = [Table(a.pass_ms)] if a.pass_ms else [Line(float(x)) for x in a.row_cost.split(",")]
    model, _ = resolve_model(a.model, None)
    kernels.set_threads(2)
    engine, tok = start(solo(), model, None, 2, None, None, "ring", "scatter", 32, quiet=True, n_slots=1)
    sched = Scheduler(engine, tok)
    runs = []
    template = None
    for p in _read_prompts(a.prompts):
        if isinstance(p, list):
            template = template or template_for(tok, a.chat_template)
            ids = tok.encode(render_prompt(template, p, a.prompts), add_bos=False)
        else:
            ids = tok.encode(p)
        req = Request(ids, a.steps + 1, Sampler(engine.h.vocab_size, 0.0, 0.9, 0), ignore_eos=True)
        run_to_completion(sched, [req])
        runs.append((ids + [req.generated[0]], list(req.generated[1:])))   # the first token: the prompt pass's
    print(f"{model}: {len(runs)} prompts from {a.prompts}, {a.steps} greedy tokens each after the first")
    print("| pass cost: b (extra row / one-row pass), or measured | rule: speedup (per prompt) | rule tok/pass | hindsight: speedup (per prompt) | hindsight tok/pass |")
    print("|---|---|---|---|---|")
    for price in prices:
        cols = []
        for replay in (replay_rule, replay_hindsight):
            res = [replay(ids[:], out, price) for ids, out in runs]
            toks = sum(len(out) for _, out in runs)
            speed = toks / sum(c for c, _ in res)
            per = ", ".join(f"{len(out) / c:.2f}" for (c, _), (_, out) in zip(res, runs))
            cols += [f"{speed:.2f}x ({per})", f"{toks / sum(p for _, p in res):.2f}"]
        print(f"| {price.label} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
