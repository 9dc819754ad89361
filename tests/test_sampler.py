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
