"""Sampling on the root (FORMATS.md §4.3): greedy at temperature 0, else temperature + top-p with
Distributed Llama's xorshift64* generator, so a given --seed gives the same tokens every run.

The probabilities are computed so that N ranks can sample a row without sending it: a token's weight
2^(x·inv_t·log2 e) is an exact integer M·2^(E−40) (kernels/logits.c), the normalisation an exact
integer sum of them rounded once, so every slicing of the vocabulary gives the same bits. Top-p's
candidates are ordered by logit (lower id first among equals) and summed in that order. A rank sends
its slice's weight buckets and its SAMPLE_TOPK largest logits (`dl_sample_summary`); `nucleus` merges
them and returns the nucleus (ids and cumulative sums) when the merged lists decide it, which they
do unless it runs past some rank's list; then the row is gathered whole and `Sampler.sample` takes
the same decisions from it, so both ways give the same token."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .kernels import ffi, fptr, lib

MASK64 = (1 << 64) - 1
SAMPLE_TOPK = 64        # a slice's candidates in a summary (the nucleus of a sampled row is usually fewer)
STATS_TOPK = 20         # the most top log-probabilities a row reports (OpenAI's top_logprobs limit; <= SAMPLE_TOPK)
SAMPLE_BUCKETS = 64     # weights below 2^-63 of the row's largest count as 0
SAMPLE_HEAD = 3 + SAMPLE_BUCKETS
SAMPLE_LEN = SAMPLE_HEAD + 4 * SAMPLE_TOPK


@dataclass
class Nucleus:
    """What a top-p draw needs of a row: the nucleus's ids in sampling order, the cumulative sums of
    their probabilities and their logits; and for log-probabilities (at the sampler's temperature)
    its largest logits (`top_ids`, `top_x`: the first STATS_TOPK in sampling order, the most likely
    first) and ln(Z / w_top), the log of the weights' sum over the most likely token's weight."""

    ids: np.ndarray
    cum: np.ndarray
    x: np.ndarray
    inv_t: float
    ln_rest: float
    top_ids: np.ndarray
    top_x: np.ndarray

    def _lp(self, x: float) -> float:
        # log p = (y - y_top) - ln(Z / w_top), y = x * inv_t in double (as kernels/logits.c scales):
        # measured from the most likely token, a row with one allowed token gives it exactly 0
        return float((x * self.inv_t - self.top_x[0] * self.inv_t) - self.ln_rest)

    def logprob(self, token: int) -> float:
        """The log-probability of a token of the nucleus."""
        return self._lp(self.x[int(np.flatnonzero(self.ids == token)[0])])

    def top(self, k: int) -> list:
        """[(id, log-probability)] of the k most likely tokens, largest first."""
        return [(int(i), self._lp(x)) for i, x in zip(self.top_ids[:k], self.top_x[:k])]


def slice_summary(x: np.ndarray, inv_t: float, id0: int = 0, k: int = SAMPLE_TOPK,
                  out: np.ndarray | None = None) -> np.ndarray:
    """dl_sample_summary of one slice of a logits row (int64[SAMPLE_LEN])."""
    out = np.zeros(SAMPLE_LEN, np.int64) if out is None else out
    x = np.ascontiguousarray(x, np.float32)
    lib.dl_sample_summary(ffi.cast("int64_t *", out.ctypes.data), fptr(x), x.size, inv_t, id0, k)
    return out


def _row_z(recs: np.ndarray) -> tuple[int, float] | None:
    """The row's largest weight exponent and its exact weight sum (scaled by 2^(63 − E_max), rounded
    once to a double) from its slices' buckets; None when every logit is -inf."""
    live = recs[recs[:, 1] > 0]
    if not len(live):
        return None
    e_max = int(live[:, 0].max())
    z = 0
    for r in live:
        top = int(r[0]) - e_max + 63        # bucket j holds weights of exponent r[0] - j
        for j in range(min(SAMPLE_BUCKETS, top + 1)):
            b = int(r[3 + j])
            if b:
                z += b << (top - j)
    return e_max, float(z)


@dataclass
class _Merged:
    """A row's slices' summaries merged: the exponent and exact sum of its weights, its ln Z, and the
    records of every slice in sampling order (logit, then lower id), of which the first `known` are
    the row's own order (`cut`: some slice sent only part of its candidates)."""

    e_max: int
    z: float
    ln_rest: float
    x: np.ndarray
    ids: np.ndarray
    m: np.ndarray
    e: np.ndarray
    known: int
    cut: bool


def _merge(recs: np.ndarray) -> _Merged | None:
    ez = _row_z(recs)
    if ez is None:
        return None
    e_max, z = ez
    parts = [r[SAMPLE_HEAD:SAMPLE_HEAD + 4 * int(r[2])].reshape(-1, 4) for r in recs]
    cand = np.concatenate(parts)
    x, ids = cand[:, 0].view(np.float64), cand[:, 1]
    order = np.lexsort((ids, -x))
    x, ids = x[order], ids[order]
    # the merged lists are the row's order up to the last record of any slice that sent only part
    # of its candidates (what it did not send comes after that record)
    known, cut = len(x), False
    for r, part in zip(recs, parts):
        if r[1] > r[2]:
            bx, bid = part[-1, 0:1].view(np.float64)[0], part[-1, 1]
            known = min(known, int(np.count_nonzero((x > bx) | ((x == bx) & (ids <= bid)))))
            cut = True
    m, e = cand[order, 2], cand[order, 3]
    ln_rest = math.log(z / _probs(m[:1], e[:1], e_max, 1.0)[0])   # ln(Z / the most likely token's weight)
    return _Merged(e_max, z, ln_rest, x, ids, m, e, known, cut)


def nucleus(recs: np.ndarray, topp: float, vocab_size: int, inv_t: float) -> Nucleus | None:
    """The top-p nucleus of a row from its slices' summaries ([slices, SAMPLE_LEN], any cut of the
    vocabulary; inv_t: the float32 1 / temperature they were made with), or None when they do not
    decide it (the row is needed whole)."""
    g = _merge(recs)
    return None if g is None else _decide(g, topp, vocab_size, inv_t)


def _decide(g: _Merged, topp: float, vocab_size: int, inv_t: float) -> Nucleus | None:
    """`nucleus` from the merged summaries."""
    x, ids, known = g.x, g.ids, g.known
    p = _probs(g.m, g.e, g.e_max, g.z)
    n_cand = int(np.count_nonzero(p >= _candidate_floor(topp, vocab_size)))
    top = min(STATS_TOPK, known)   # every slice sent at least STATS_TOPK of its largest, or all it has
    if n_cand == 0:        # nothing reaches the cut-off: the most likely token
        return Nucleus(ids[:1], p[:1], x[:1], inv_t, g.ln_rest, ids[:top], x[:top])
    cum = np.cumsum(p[:min(n_cand, known)])
    last = int(np.searchsorted(cum, topp, side="right"))
    if last >= len(cum):
        if n_cand >= known and g.cut:
            return None    # the candidates go on past what the slices sent
        last = len(cum) - 1
    return Nucleus(ids[:last + 1], cum[:last + 1], x[:last + 1], inv_t, g.ln_rest, ids[:top], x[:top])


def _candidate_floor(topp: float, vocab_size: int) -> float:
    """Distributed Llama's top-p pre-filter: a token below (1 - topp) / (n - 1) cannot be in the
    nucleus."""
    return (1.0 - topp) / (vocab_size - 1)


def _probs(m: np.ndarray, e: np.ndarray, e_max: int, z: float) -> np.ndarray:
    """M·2^(E − E_max + 63) / z, 0 below the buckets: dl_sample_probs's arithmetic, op for op."""
    shift = e - e_max + 63
    return np.where(shift >= 0, np.ldexp(m.astype(np.float64), np.maximum(shift, 0).astype(np.int32)) / z, 0.0)


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
        # the nucleus rule reads top-p as float32, as the engine's control packet carries it to the ranks
        self.topp_rule = float(np.float32(topp))
        self.seed = int(seed) if seed is not None else int(time.time())
        self.state = (self.seed & MASK64) or 0x9E3779B97F4A7C15
        if state is not None:   # resume a stream where it was (serve re-submits a request after a restart)
            if not 0 < state <= MASK64:
                raise ValueError(f"sampler state must be in 1..2^64-1, got {state}")
            self.state = int(state)
        self.probs: np.ndarray | None = None   # a row's probabilities (multinomial, fallback), made once
        self._rec = np.zeros((1, SAMPLE_LEN), np.int64)    # a whole row's summary

    def random_f32(self) -> float:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & MASK64
        s ^= s >> 27
        self.state = s
        u32 = ((s * 0x2545F4914F6CDD1D) & MASK64) >> 32
        return (u32 >> 8) / 16777216.0

    @property
    def draws_nucleus(self) -> bool:
        """Whether a token is drawn from the top-p nucleus (temperature > 0, 0 < top-p < 1), which the
        ranks' summaries can decide; else greedy or a plain multinomial draw over the whole row."""
        return self.temperature > 0 and 0 < self.topp < 1

    @property
    def inv_t(self) -> np.float32:
        """1 / temperature as the engine's control packet carries it (float32)."""
        return np.float32(1.0 / self.temperature)

    def sample(self, logits: np.ndarray) -> int:
        """The next token from a whole logits row."""
        if self.temperature == 0:
            return int(np.argmax(logits))  # lowest index wins ties
        x = np.ascontiguousarray(logits, np.float32)
        if self.draws_nucleus:
            return self.pick(self.nucleus_of(x))
        p = self._probs(x)
        r = self.random_f32()
        cdf = np.cumsum(p)
        k = int(min(np.searchsorted(cdf, r, side="right"), x.size - 1))
        if p[k] == 0:   # r past the rounded total: the last token that has a probability (never a masked one)
            k = int(np.flatnonzero(p)[-1])
        return k

    def nucleus_of(self, logits: np.ndarray) -> Nucleus:
        """The top-p nucleus of a whole row: its summary as one slice, and where that does not decide
        it, every candidate (the same ids, sums and log-probabilities as from any cut's summaries)."""
        x = np.ascontiguousarray(logits, np.float32)
        g = _merge(slice_summary(x, self.inv_t, out=self._rec[0])[None])
        nuc = _decide(g, self.topp_rule, x.size, float(self.inv_t))
        if nuc is not None:
            return nuc
        ids, cum = self._nucleus(x, g.e_max, g.z)
        top = min(STATS_TOPK, g.known)    # ln Z and the largest logits from the summary
        return Nucleus(ids, cum, x[ids].astype(np.float64), float(self.inv_t), g.ln_rest, g.ids[:top], g.x[:top])

    def pick(self, nuc: Nucleus) -> int:
        """The top-p draw from a row's nucleus (one random number, as every sampled token takes)."""
        r = self.random_f32()
        k = int(np.searchsorted(nuc.cum, r * nuc.cum[-1], side="right"))
        return int(nuc.ids[min(k, len(nuc.ids) - 1)])

    def _probs(self, x: np.ndarray, e_max: int | None = None, z: float | None = None) -> np.ndarray:
        """Every token's probability (dl_sample_probs), with the row's E_max and weight sum when
        known (else from the row's summary)."""
        if e_max is None:
            slice_summary(x, self.inv_t, k=0, out=self._rec[0])
            e_max, z = _row_z(self._rec)
        if self.probs is None or self.probs.size != x.size:
            self.probs = np.zeros(x.size, np.float64)
        p = self.probs
        lib.dl_sample_probs(ffi.cast("double *", p.ctypes.data), fptr(x), x.size, self.inv_t, e_max, z)
        return p

    def _nucleus(self, x: np.ndarray, e_max: int, z: float) -> tuple[np.ndarray, np.ndarray]:
        """The nucleus's ids and cumulative sums from the whole row, when the summary's candidates
        were too few: every candidate, in the order and with the probabilities `nucleus` uses."""
        p = self._probs(x, e_max, z)
        idx = np.flatnonzero(p >= _candidate_floor(self.topp_rule, x.size))
        if idx.size == 0:
            idx = np.array([int(np.argmax(x))])
        order = idx[np.argsort(-x[idx], kind="stable")]
        cum = np.cumsum(p[order])
        last = min(int(np.searchsorted(cum, self.topp_rule, side="right")), len(order) - 1)
        return order[:last + 1], cum[:last + 1]
