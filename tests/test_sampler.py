"""Sampling: greedy ties, seeded repeatability, top-p keeps to the nucleus."""

import numpy as np
import pytest

from dllama_mpi.sampler import SAMPLE_TOPK, Sampler, nucleus, slice_summary


def test_greedy_lowest_index_wins_ties():
    s = Sampler(5, temperature=0)
    assert s.sample(np.array([1, 3, 3, 0, -1], np.float32)) == 1


def test_xorshift_matches_distributed_llama_formula():
    s = Sampler(2, seed=12345)
    state, out = 12345, []
    for _ in range(5):
        state ^= state >> 12
        state ^= (state << 25) & (2 ** 64 - 1)
        state ^= state >> 27
        out.append((((state * 0x2545F4914F6CDD1D) % 2 ** 64) >> 32 >> 8) / 2 ** 24)
    assert [s.random_f32() for _ in range(5)] == out


@pytest.mark.parametrize("topp", [0.9, 1.0])
def test_same_seed_same_tokens(topp):
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 3
    run = lambda seed: [s.sample(logits) for s in [Sampler(1000, 0.8, topp, seed=seed)] for _ in range(50)]  # noqa: E731
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_topp_samples_only_from_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    s = Sampler(4, temperature=1.0, topp=0.7, seed=1)
    seen = {s.sample(logits) for _ in range(2000)}
    assert seen == {0, 1}   # 0.5 + 0.3 exceeds 0.7: the nucleus is the first two


def test_plain_multinomial_frequencies():
    p = np.array([0.6, 0.3, 0.1], np.float32)
    s = Sampler(3, temperature=1.0, topp=1.0, seed=3)
    counts = np.bincount([s.sample(np.log(p)) for _ in range(6000)], minlength=3) / 6000
    assert np.allclose(counts, p, atol=0.03)


def test_bad_settings():
    with pytest.raises(ValueError):
        Sampler(3, temperature=-1)
    with pytest.raises(ValueError):
        Sampler(3, topp=1.5)


def _rows(rng, vocab, n):
    """Spread, flat, tied (rounded) and masked (-inf) logits rows; one token allowed at least."""
    for t in range(n):
        x = [lambda: rng.normal(0, rng.uniform(0.1, 8), vocab), lambda: np.round(rng.normal(0, 3, vocab)),
             lambda: np.where(rng.random(vocab) < 0.7, -np.inf, rng.normal(0, 2, vocab)),
             lambda: rng.normal(0, 0.05, vocab)][t % 4]()
        x[rng.integers(vocab)] = 0.0
        yield t, x.astype(np.float32)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_probabilities_are_the_softmax(temperature):
    rng = np.random.default_rng(1)
    s = Sampler(3000, temperature, 0.9, seed=1)
    for _, x in _rows(rng, 3000, 8):
        y = x.astype(np.float64) * np.float64(np.float32(1 / temperature))
        e = np.exp(y - y.max())
        p = s._probs(x)
        assert np.allclose(p, e / e.sum(), rtol=1e-9, atol=2.0 ** -62)   # lighter than 2^-63 of the largest: 0
        assert p[np.isneginf(x)].max(initial=0.0) == 0.0
        # log-probabilities: of the nucleus's tokens and the 20 most likely, the log-softmax's
        lse = y.max() + np.log(e.sum())
        nuc = s.nucleus_of(x)
        assert np.allclose([nuc.logprob(i) for i in nuc.ids], y[nuc.ids] - lse, rtol=0, atol=1e-9)
        top = nuc.top(20)
        assert [i for i, _ in top] == sorted(range(3000), key=lambda i: (-x[i], i))[:20]
        assert np.allclose([v for _, v in top], [y[i] - lse for i, _ in top], rtol=0, atol=1e-9)


def _topp_by_sorting_all(s, x, r):
    """The definition (Distributed Llama's sample_topp over this sampler's probabilities): every
    candidate ordered by logit (ties in id order), the nucleus up to the first cumulative sum over topp,
    r scaled to its total."""
    p = s._probs(x)
    idx = np.flatnonzero(p >= (1.0 - s.topp_rule) / (len(p) - 1))
    if idx.size == 0:
        idx = np.array([int(np.argmax(x))])
    order = sorted(idx, key=lambda i: (-x[i], i))
    cum = np.cumsum(p[order])
    last = min(int(np.searchsorted(cum, s.topp_rule, side="right")), len(order) - 1)
    k = int(np.searchsorted(cum[:last + 1], r * cum[last], side="right"))
    return int(order[min(k, last)])


@pytest.mark.parametrize("vocab", [8, 3000, 49152])
def test_topp_is_the_definition_and_any_cut_of_the_vocabulary_gives_the_same_nucleus(vocab):
    """The sampler's nucleus from a whole row is the definition's; the nucleus merged from the
    summaries of 1-7 slices (any cut, empty slices included) is the same ids and the same bits of the
    cumulative sums whenever the summaries decide it, and they decide it unless the candidates run past
    a slice's list (the flat rows at topp near 1); whole rows decide every time."""
    rng = np.random.default_rng(vocab)
    decided = undecided = 0
    for topp in (0.1, 0.9, 0.999999):
        s = Sampler(vocab, 0.8, topp, seed=1)
        for t, x in _rows(rng, vocab, 24):
            whole = s.nucleus_of(x)
            for r in (0.0, float(rng.random()), 0.999999):
                s.random_f32 = lambda r=r: r
                assert s.pick(whole) == _topp_by_sorting_all(s, x, r), (topp, t, r)
                assert s.sample(x) == s.pick(whole)
            for n in (1, 2, 3, 7):
                cuts = np.sort(rng.integers(0, vocab + 1, n - 1))
                bounds = np.concatenate([[0], cuts, [vocab]])
                recs = np.stack([slice_summary(x[a:b], s.inv_t, int(a)) for a, b in zip(bounds[:-1], bounds[1:])])
                nuc = nucleus(recs, float(np.float32(topp)), vocab, float(s.inv_t))   # as the ranks read it
                if nuc is None:
                    undecided += 1
                    assert n > 1 or vocab > SAMPLE_TOPK
                    continue
                decided += 1
                assert np.array_equal(nuc.ids, whole.ids) and np.array_equal(nuc.cum, whole.cum), (topp, t, n)
                assert nuc.ln_rest == whole.ln_rest and nuc.top(20) == whole.top(20), (topp, t, n)
                assert [nuc.logprob(i) for i in nuc.ids] == [whole.logprob(i) for i in whole.ids]
    assert decided > 0 and (undecided > 0) == (vocab > SAMPLE_TOPK)


def test_one_allowed_token_has_log_probability_zero():
    """A row a grammar leaves one token: probability 1, log-probability exactly 0 (as the log-softmax
    of one value), the others' -inf absent from the top."""
    x = np.full(500, -np.inf, np.float32)
    x[123] = 7.25
    s = Sampler(500, 0.7, 0.9, seed=2)
    nuc = s.nucleus_of(x)
    assert s.pick(nuc) == 123 and nuc.logprob(123) == 0.0 and nuc.top(5) == [(123, 0.0)]
