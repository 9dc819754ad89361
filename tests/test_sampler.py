"""Sampling: greedy ties, seeded repeatability, top-p keeps to the nucleus."""

import numpy as np
import pytest

from dllama_mpi.sampler import Sampler


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


def _topp_by_sorting_all(topp, p, r):
    """The definition (Distributed Llama's sample_topp): every candidate sorted by probability (ties in
    index order), the nucleus up to the first cumulative sum over topp, r scaled to its total."""
    idx = np.flatnonzero(p >= (1.0 - topp) / (len(p) - 1))
    if idx.size == 0:
        idx = np.array([int(np.argmax(p))])
    order = idx[np.argsort(-p[idx], kind="stable")]
    cum = np.cumsum(p[order], dtype=np.float64)
    last = min(int(np.searchsorted(cum, topp, side="right")), len(order) - 1)
    k = int(np.searchsorted(cum[:last + 1], r * cum[last], side="right"))
    return int(order[min(k, last)])


@pytest.mark.parametrize("vocab", [8, 3000, 49152])
def test_topp_partial_sort_equals_sorting_every_candidate(vocab):
    """The sampler sorts only the most likely candidates (growing until they hold topp): the same token
    as sorting all, on spread, flat, tied (rounded logits) and masked (-inf) distributions."""
    rng = np.random.default_rng(vocab)
    for topp in (0.1, 0.9, 0.999999):
        s = Sampler(vocab, 1.0, topp, seed=1)
        for t in range(60):
            x = [lambda: rng.normal(0, rng.uniform(0.1, 8), vocab), lambda: np.round(rng.normal(0, 3, vocab)),
                 lambda: np.where(rng.random(vocab) < 0.7, -np.inf, rng.normal(0, 2, vocab))][t % 3]()
            x[rng.integers(vocab)] = 0.0   # one token allowed at least
            e = np.exp(x - x.max())
            p = (e / e.sum()).astype(np.float32)
            for r in (0.0, float(rng.random()), 0.999999):
                assert s._topp(p, r) == _topp_by_sorting_all(topp, p, r), (topp, t, r)
