"""Sampling on the root (FORMATS.md §4.3): greedy at temperature 0, else temperature + top-p with
Distributed Llama's xorshift64* generator, so a given --seed gives the same tokens every run."""

from __future__ import annotations

import time

import numpy as np

MASK64 = (1 << 64) - 1


class Sampler:
    def __init__(self, vocab_size: int, temperature: float = 0.8, topp: float = 0.9, seed: int | None = None,
                 state: int | None = None):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 <= topp <= 1:
            raise ValueError(f"topp must be in [0, 1], got {topp}")
        self.vocab_size = vocab_size
        self.temperature = float(temperature)
        self.topp = float(topp)
        self.seed = int(seed) if seed is not None else int(time.time())
        self.state = (self.seed & MASK64) or 0x9E3779B97F4A7C15
        if state is not None:   # resume a stream where it was (serve re-submits a request after a restart)
            if not 0 < state <= MASK64:
                raise ValueError(f"sampler state must be in 1..2^64-1, got {state}")
            self.state = int(state)
        self.probs = np.zeros(vocab_size, np.float32)  # reused every step

    def random_f32(self) -> float:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & MASK64
        s ^= s >> 27
        self.state = s
        u32 = ((s * 0x2545F4914F6CDD1D) & MASK64) >> 32
        return (u32 >> 8) / 16777216.0

    def sample(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))  # lowest index wins ties
        p = self.probs
        np.multiply(logits, np.float32(1.0 / self.temperature), out=p)
        p -= p.max()
        np.exp(p, out=p)
        p /= p.sum()
        r = self.random_f32()
        if 0 < self.topp < 1:
            return self._topp(p, r)
        cdf = np.cumsum(p)
        k = int(min(np.searchsorted(cdf, r, side="right"), self.vocab_size - 1))
        if p[k] == 0:   # r past the rounded total: the last token that has a probability (never a masked one)
            k = int(np.flatnonzero(p)[-1])
        return k

    def _topp(self, p: np.ndarray, r: float) -> int:
        # candidates below (1 - topp) / (n - 1) cannot be part of the nucleus
        cutoff = (1.0 - self.topp) / (len(p) - 1)
        idx = np.flatnonzero(p >= cutoff)
        if idx.size == 0:
            idx = np.array([int(np.argmax(p))])
        # The nucleus is usually a few dozen tokens of thousands of candidates: sort only the m most
        # likely (every candidate tied with the m-th included, in index order, so that the stable sort
        # puts them where sorting all would), m x 8 until they hold more than topp. The same order,
        # hence the same token, as sorting every candidate.
        pc, m = p[idx], 256
        while True:
            # (a sort of all costs about what the partition would once m nears the candidates)
            sel = idx if 4 * m >= idx.size else idx[pc >= -np.partition(-pc, m - 1)[m - 1]]
            order = sel[np.argsort(-p[sel], kind="stable")]
            cum = np.cumsum(p[order], dtype=np.float64)
            if sel is idx or cum[-1] > self.topp:
                break
            m *= 8
        last = int(np.searchsorted(cum, self.topp, side="right"))
        last = min(last, len(order) - 1)
        total = cum[last]
        k = int(np.searchsorted(cum[:last + 1], r * total, side="right"))
        return int(order[min(k, last)])
