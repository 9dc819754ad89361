"""The KV page pool (kvcache.py) and the continuous-batching scheduler on a real tiny engine (one
rank; the same runs under mpiexec are in test_mpi.py)."""

import random

import pytest
import numpy as np
from mpi4py import MPI

from dllama_mpi.comm import Comm
from dllama_mpi.startup import build_engine
from dllama_mpi.kvcache import KVCache, KVPlan, parse_size, plan_kv
from dllama_mpi.errors import ConfigError
from dllama_mpi.sampler import Sampler
from dllama_mpi.scheduler import Request, RequestError, Scheduler, run_to_completion
from dllama_mpi.tokenizer import Tokenizer

from conftest import TINY
from goldens import SEQS, model_path

TOK = TINY / "t" / "dllama_tokenizer_tiny_llama3.t"


# ------------------------------------------------------------------------------------------------
# the page pool alone

def check_pool(kv: KVCache, live):
    """Every page is exactly one of: free, cached-unreferenced, referenced; references add up."""
    n = kv.plan.n_pages
    refs = [0] * n
    for s in live:
        for p in s.pages:
            refs[p] += 1
    for p in kv._copy_holds:
        refs[p] += 1
    assert refs == kv.ref
    free, cached = set(kv.free), set(kv.evictable)
    assert len(free) == len(kv.free) and not free & cached
    for p in range(n):
        assert (p in free) + (p in cached) + (kv.ref[p] > 0) == 1, p
    assert kv.reserved == sum(s.reserve for s in live) and kv.available >= 0


def test_pool_shares_full_pages_and_copies_or_adopts_partial_ones():
    kv = KVCache(KVPlan(page_size=4, n_pages=12, n_slots=3, table_stride=6, row_bytes=8))
    a = kv.admit(list(range(10)), 12)
    assert a.shared_tokens == 0 and a.reserve == 3
    kv.ensure(a, 10)
    kv.written(a, list(range(10)))
    kv.take_commands()
    a_tail = a.pages[2]
    # while a runs, b with the same first 9 tokens shares a's two full pages (a's third page is
    # still being written: only full pages, and pages of ended sequences, are in the cache)
    b = kv.admit(list(range(9)) + [99, 98], 11)
    assert b.pages[:2] == a.pages[:2] and b.shared_tokens == 8
    up, cp = kv.take_commands()
    assert cp == [] and up == [(b.slot, 0, a.pages[0]), (b.slot, 1, a.pages[1])]
    kv.ensure(b, 11)
    kv.written(b, [8, 99, 98])
    check_pool(kv, [a, b])
    kv.release(a)
    kv.release(b)
    check_pool(kv, [])
    assert kv.pages_in_use == 0 and len(kv.evictable) == 4   # 2 shared full pages + both tails
    # a follow-up of a's conversation finds all of a and takes a's unused tail page over (no copy)
    c = kv.admit(list(range(10)) + [5, 6], 14)
    assert c.shared_tokens == 10 and c.pages[2] == a_tail
    assert kv.take_commands()[1] == []
    # c's third page is private now (out of the cache): d finds the two full pages and the first
    # row of b's cached tail, which it takes over
    d = kv.admit(list(range(10)) + [7], 12)
    assert d.shared_tokens == 9 and kv.take_commands()[1] == []
    check_pool(kv, [c, d])
    kv.release(d)
    e = kv.admit(list(range(9)) + [99, 98, 1], 13)
    assert e.shared_tokens == 9
    check_pool(kv, [c, e])


def test_pool_reservations_never_overcommit_and_evict_lru():
    kv = KVCache(KVPlan(page_size=4, n_pages=6, n_slots=4, table_stride=6, row_bytes=8))
    a = kv.admit([1, 2, 3], 12)           # 3 pages promised
    b = kv.admit([4, 5, 6], 12)           # 3 more: the pool is promised out
    assert a and b and kv.available == 0
    assert kv.admit([7], 1) is None      # waits, even though no page is taken yet
    for s, t in ((a, [1, 2, 3]), (b, [4, 5, 6])):
        kv.ensure(s, 12)
        kv.written(s, t * 4)
    kv.release(a)
    c = kv.admit([8, 9], 8)               # evicts a's cached pages, least recently used first
    assert c is not None
    kv.ensure(c, 8)
    check_pool(kv, [b, c])


def test_pool_random_operations_keep_the_books():
    rnd = random.Random(5)
    kv = KVCache(KVPlan(page_size=4, n_pages=20, n_slots=5, table_stride=8, row_bytes=8))
    live, prompts = [], [[rnd.randrange(3) for _ in range(rnd.randrange(1, 14))] for _ in range(8)]
    for _ in range(400):
        op = rnd.random()
        if op < 0.35 and kv.free_slots:
            p = list(rnd.choice(prompts)) + [rnd.randrange(3)] * rnd.randrange(3)
            s = kv.admit(p, min(len(p) + rnd.randrange(1, 10), 32))
            if s is not None:
                s.target = p
                s.limit = min(len(p) + rnd.randrange(1, 10), 32)
                live.append(s)
        elif op < 0.8 and live:
            s = rnd.choice(live)
            n = min(len(s.tokens) + rnd.randrange(1, 5), s.limit if hasattr(s, "limit") else 32)
            n = min(n, kv.pages_for(len(s.tokens)) * 4 + s.reserve * 4)
            if n > len(s.tokens):
                kv.ensure(s, n)
                ext = (s.target + [rnd.randrange(3) for _ in range(40)])[len(s.tokens):n]
                kv.written(s, ext)
        elif live:
            s = live.pop(rnd.randrange(len(live)))
            kv.release(s, keep=rnd.random() < 0.8)
        kv.take_commands()
        check_pool(kv, live)


def test_sizes_and_plans():
    assert parse_size("512MiB") == 512 << 20 and parse_size("2G") == 2 << 30 and parse_size("1.5kb") == 1536
    for bad in ("", "x", "-1G", "5 parsecs"):
        with pytest.raises(ConfigError):
            parse_size(bad)
    p = plan_kv(row_bytes=1000, max_seq_len=100, n_slots=3)
    assert p.n_pages == 3 * 7 and p.table_stride == 7
    assert plan_kv(1000, 100, 3, kv_memory=16000 * 5).n_pages == 5
    with pytest.raises(ConfigError, match="holds no page"):
        plan_kv(1000, 100, 3, kv_memory=100)


# ------------------------------------------------------------------------------------------------
# the scheduler on a real engine

@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(TOK)


def engine_for(name="tiny_llama_f32", **kw):
    return build_engine(Comm(MPI.COMM_SELF), model_path(name), **kw)


def greedy(prompt, n, seed=None, temperature=0.0, **kw):
    return Request(prompt, n, Sampler(512, temperature, 0.9, seed), ignore_eos=True, **kw)


@pytest.mark.parametrize("name,kw", [("tiny_llama_f32", {}), ("tiny_qwen3_q40", {"buffer_type": "q80"})])
def test_requests_give_the_same_tokens_alone_and_together(tok, name, kw):
    eng = engine_for(name, n_slots=4, **kw)
    alone = []
    for p in SEQS:
        s = Scheduler(eng, tok)
        r = greedy(p, 12)
        run_to_completion(s, [r])
        alone.append(r.generated)
        eng.kv.drop_cached()
    s = Scheduler(eng, tok)
    rs = [greedy(p, 12) for p in SEQS]
    for r in rs:
        s.submit(r)
    while not rs[1].generated:
        s.step()
    rs.append(greedy(SEQS[1], 12))   # arriving later, it shares the full pages of its twin's prompt
    run_to_completion(s, rs[3:])
    while s.busy:
        s.step()
    assert [r.generated for r in rs] == alone + [alone[1]]
    assert rs[3].stats.evaluated_prompt_tokens == len(SEQS[1]) - 32
    # sampled requests with a seed repeat too, beside others
    a, b = greedy(SEQS[0], 10, seed=3, temperature=0.9), greedy(SEQS[0], 10, seed=3, temperature=0.9)
    run_to_completion(s, [a, greedy(SEQS[2], 10)])
    run_to_completion(s, [greedy(SEQS[1], 7), b])
    assert a.generated == b.generated


def test_prefill_is_chunked_beside_running_streams(tok):
    eng = engine_for(n_slots=2, max_batch=8)
    s = Scheduler(eng, tok)
    short = greedy(SEQS[0], 30)
    s.submit(short)
    while not short.generated:
        s.step()
    long = greedy(SEQS[1], 4)   # 37 prompt tokens: 5 passes of 7 prompt rows + the stream's row
    s.submit(long)
    sizes = []
    while not long.generated:
        n0 = len(short.generated)
        s.step()
        sizes.append(len(short.generated) - n0)
    assert sizes == [1] * len(sizes) and len(sizes) == 6   # the stream got a token in every pass


def test_pool_exhaustion_waits_then_completes(tok):
    eng = engine_for(n_slots=4, kv_memory=4 * 16 * 1024)   # 4 pages of 16 rows of 1 kB: one sequence at a time
    assert eng.kv_plan.n_pages == 4
    s = Scheduler(eng, tok)
    rs = [greedy(p, 20) for p in SEQS]
    for r in rs:
        s.submit(r)
    s.step()
    assert len(s.running) == 1 and len(s.waiting) == 2 and s.waited_for_pages == 1
    run_to_completion(s, [])
    while s.busy:
        s.step()
    assert all(r.done and len(r.generated) == 20 for r in rs)
    with pytest.raises(RequestError, match="raise --kv-memory"):
        s.submit(greedy(list(range(1, 60)), 20))


def test_cancel_one_leaves_the_others_alone(tok):
    eng = engine_for(n_slots=3)
    s = Scheduler(eng, tok)
    ref = [greedy(p, 15) for p in SEQS]
    run_to_completion(s, ref)
    eng.kv.drop_cached()
    rs = [greedy(p, 15) for p in SEQS]
    for r in rs:
        s.submit(r)
    for _ in range(6):
        s.step()
    rs[1].cancel()
    while s.busy:
        s.step()
    assert rs[1].stats.finish_reason == "abort" and len(rs[1].generated) < 15
    assert rs[0].generated == ref[0].generated and rs[2].generated == ref[2].generated
    assert not s.running and eng.kv.pages_in_use == 0


def test_stop_strings_eos_and_limits(tok):
    eng = engine_for(n_slots=2)
    s = Scheduler(eng, tok)
    r = greedy(SEQS[0], 8)
    run_to_completion(s, [r])
    text = tok.decode(r.generated)
    stop = text[len(text) // 2:len(text) // 2 + 2] if len(text) > 4 else None
    if stop:
        r2 = Request(SEQS[0], 8, Sampler(512, 0.0), stop=[stop], ignore_eos=True)
        pieces = []
        r2.sink = lambda k, v: pieces.append(v) if k == "piece" else None
        run_to_completion(s, [r2])
        assert r2.stats.finish_reason == "stop" and stop not in "".join(p.text for p in pieces)
    with pytest.raises(RequestError):
        s.submit(greedy([], 3))
    z = greedy(SEQS[1], 0)   # evaluate the prompt, generate nothing
    run_to_completion(s, [z])
    assert z.generated == [] and z.stats.finish_reason == "length"


# ------------------------------------------------------------------------------------------------
# log-probabilities and several choices

def log_softmax(x, inv_t=1.0):
    y = x.astype(np.float64) * inv_t
    m = y.max(axis=-1, keepdims=True)
    return y - (m + np.log(np.exp(y - m).sum(axis=-1, keepdims=True)))


def teacher_forced(eng, ids):
    """Logits after every prefix of ids, through the single-sequence path (independent of the
    scheduler's logit modes)."""
    eng.kv.drop_cached()
    out = eng.forward(ids, 0, all_logits=True)
    eng.forget()
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_an_independent_log_softmax(tok, temperature):
    eng = engine_for("tiny_qwen3_f32", n_slots=2)
    s = Scheduler(eng, tok)
    pieces = []
    r = Request(SEQS[1], 10, Sampler(512, temperature, 1.0, 4), ignore_eos=True, logprobs=5, prompt_logprobs=True,
                sink=lambda k, v: pieces.append(v) if k == "piece" else None)
    run_to_completion(s, [r])
    ids = SEQS[1] + r.generated
    ref = log_softmax(teacher_forced(eng, ids), 1 / temperature if temperature else 1.0)
    n = len(SEQS[1])
    for i, p in enumerate(pieces):               # generated tokens: row n-1+i predicts ids[n+i]
        row = ref[n - 1 + i]
        assert p.logprob.token == ids[n + i]
        assert abs(p.logprob.logprob - row[ids[n + i]]) < 1e-4
        want = np.lexsort((np.arange(row.size), -row))[:5]
        assert [t for t, _ in p.logprob.top] == list(want)
        assert np.allclose([lp for _, lp in p.logprob.top], row[want], atol=1e-4)
        if temperature == 0:
            assert p.token == want[0]
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == n
    for j in range(1, n):                        # prompt token j scored by row j-1
        assert abs(r.prompt_logprobs[j].logprob - ref[j - 1][ids[j]]) < 1e-4


def test_followers_share_the_prompt_and_match_separate_requests(tok):
    eng = engine_for("tiny_llama_f32", n_slots=4)
    s = Scheduler(eng, tok)
    sep = [Request(SEQS[2], 12, Sampler(512, 0.9, 0.9, 10 + i), ignore_eos=True) for i in range(3)]
    for r in sep:
        run_to_completion(s, [r])
        eng.kv.drop_cached()
    followers = [Request(SEQS[2], 12, Sampler(512, 0.9, 0.9, 11 + i), ignore_eos=True) for i in range(2)]
    lead = Request(SEQS[2], 12, Sampler(512, 0.9, 0.9, 10), ignore_eos=True, followers=followers)
    s.submit(lead)
    while lead.state != "decode":
        s.step()
    assert len(s.running) == 3 and all(f.stats.evaluated_prompt_tokens == 0 for f in followers)
    while s.busy:
        s.step()
    assert [r.generated for r in [lead] + followers] == [r.generated for r in sep]
    assert len({tuple(r.generated) for r in sep}) > 1     # different seeds, different choices
    assert eng.kv.pages_in_use == 0
