"""A plain numpy float64 forward pass of a Gemma 3 model, `.m` or GGUF (test-only).

Written from the model's definition (transformers' modeling_gemma3.py, llama.cpp's
src/models/gemma3.cpp), not from the engine; FORMATS-EXT.md "Gemma 3" says how the file stores it:

    x = embed[token] * sqrt(dim)
    per layer l (global iff l % sliding_window_pattern == pattern - 1, else a sliding window):
        y = rmsnorm(x, attn_norm)
        q, k, v = wq y, wk y, wv y                       (per head)
        q, k = rmsnorm(q, q_norm), rmsnorm(k, k_norm)     (per head, over head_dim)
        q, k = rope_neox(q), rope_neox(k)                 (theta: rope_theta / linear factor on global
                                                           layers, rope_theta_local on local ones)
        a = softmax(q k^T * query_pre_attn_scalar^-1/2, causal; local: only the last `window`) v
        x = x + rmsnorm(wo a, attn_post_norm)
        y = rmsnorm(x, ffn_norm)
        x = x + rmsnorm(w2 (gelu_tanh(w1 y) * w3 y), ffn_post_norm)
    logits = wcls rmsnorm(x, norm)                        (wcls = the tied embedding)

rmsnorm(x, w) = w * x / sqrt(mean(x^2) + eps): the file's norm vectors already hold Gemma's 1 + w.
Whole sequences are evaluated at once (positions 0..T-1) with an explicit mask; several at a time
share each weight's float64 copy (`hidden_many`).
"""

from __future__ import annotations

import numpy as np

from reference_forward import ReferenceModel

VOCAB_CHUNK = 16384          # lm_head rows per float64 block (the 262k x 640 head is 1.3 GB in f64)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


class ReferenceGemma3(ReferenceModel):
    def __init__(self, path):
        super().__init__(path)
        if not self.h.is_gemma3:
            raise ValueError("reference forward: gemma3 models only")

    def rope(self, x, layer, pos):
        """x [T, n, hd]: NeoX rotation of the pairs (j, j + hd/2) by pos * freq_j."""
        h = self.h
        hd = h.head_size
        if h.is_global_layer(layer):
            theta, scale = float(h.rope_theta), 1.0 / h.rope_linear_factor
        else:
            theta, scale = float(h.rope_theta_local), 1.0
        freq = scale / theta ** (np.arange(0, hd, 2) / hd)                      # [hd/2]
        ang = pos[:, None] * freq[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)

    def mask(self, pos, seq, layer):
        """0 where row t may attend to row s (same sequence, not later, inside the window), else -inf."""
        t, s = pos[:, None], pos[None, :]
        ok = (seq[:, None] == seq[None, :]) & (s <= t)
        if not self.h.is_global_layer(layer) and self.h.sliding_window:
            ok &= t - s < self.h.sliding_window
        return np.where(ok, 0.0, -np.inf)

    def hidden(self, tokens):
        """The final normed hidden states [T, dim] (float64) of tokens at positions 0, 1, ..."""
        return self.hidden_many([tokens])[0]

    def hidden_many(self, sequences):
        """hidden() of several independent sequences in one pass (each weight read once)."""
        h = self.h
        hd, nh, nkv = h.head_size, h.n_heads, h.n_kv_heads
        tokens = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
        pos = np.concatenate([np.arange(len(s), dtype=np.float64) for s in sequences])
        seq = np.concatenate([np.full(len(s), i) for i, s in enumerate(sequences)])
        T = len(tokens)
        x = self.embed(tokens) * np.sqrt(h.dim)
        scale = float(h.query_pre_attn_scalar or hd) ** -0.5
        for l in range(h.n_layers):
            y = self.rmsnorm(x, self.w("attn_norm", l))
            q = (y @ self.w("wq", l).T).reshape(T, nh, hd)
            k = (y @ self.w("wk", l).T).reshape(T, nkv, hd)
            v = (y @ self.w("wv", l).T).reshape(T, nkv, hd)
            q = self.rope(self.rmsnorm(q, self.w("q_norm", l)), l, pos)
            k = self.rope(self.rmsnorm(k, self.w("k_norm", l)), l, pos)
            g = nh // nkv
            k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
            s = np.einsum("thd,shd->hts", q, k) * scale + self.mask(pos, seq, l)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            z = np.einsum("hts,shd->thd", s, v).reshape(T, nh * hd)
            x = x + self.rmsnorm(z @ self.w("wo", l).T, self.w("attn_post_norm", l))
            y = self.rmsnorm(x, self.w("ffn_norm", l))
            f = gelu_tanh(y @ self.w("w1", l).T) * (y @ self.w("w3", l).T)
            x = x + self.rmsnorm(f @ self.w("w2", l).T, self.w("ffn_post_norm", l))
        x = self.rmsnorm(x, self.w("norm"))
        return np.split(x, np.cumsum([len(s) for s in sequences])[:-1])

    def logits(self, hidden):
        """hidden [T, dim] -> logits [T, vocab], the head read in float64 blocks of rows."""
        wcls = self.head()
        out = np.empty((hidden.shape[0], wcls.shape[0]))
        for r0 in range(0, wcls.shape[0], VOCAB_CHUNK):
            out[:, r0:r0 + VOCAB_CHUNK] = hidden @ wcls[r0:r0 + VOCAB_CHUNK].astype(np.float64).T
        return out

    def head(self) -> np.ndarray:
        """The output matrix as float32 (decoded once)."""
        if getattr(self, "_head", None) is None:
            self._head = self.dense("wcls")
        return self._head

    def argmax(self, hidden, candidates: int = 32) -> np.ndarray:
        """argmax of the float64 logits of each row of hidden, without the 1.3 GB float64 head: a
        float32 product finds each row's top `candidates`, whose logits are then recomputed in
        float64 (float32's error, ~1e-5, is far below the gap to the 32nd logit)."""
        wcls = self.head()
        approx = hidden.astype(np.float32) @ wcls.T
        top = np.argpartition(-approx, candidates, axis=1)[:, :candidates]
        exact = np.einsum("rd,rkd->rk", hidden, wcls[top].astype(np.float64))
        return top[np.arange(len(top)), exact.argmax(axis=1)]

    def forward(self, tokens, last_only: bool = False):
        """Logits [len(tokens), vocab] (float64) of tokens at positions 0, 1, ...; with
        last_only only the last row ([1, vocab])."""
        x = self.hidden(list(tokens))
        return self.logits(x[-1:] if last_only else x)

    def greedy(self, tokens, n: int) -> list[int]:
        """n greedy continuation ids of the prompt `tokens` (whole sequence re-evaluated per step)."""
        ids = list(tokens)
        for _ in range(n):
            ids.append(int(self.argmax(self.hidden(ids)[-1:])[0]))
        return ids[len(tokens):]


def reference_logits(path, tokens) -> np.ndarray:
    ref = ReferenceGemma3(path)
    try:
        return ref.forward(list(tokens))
    finally:
        ref.close()
