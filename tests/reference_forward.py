"""A plain numpy float64 forward pass of a dense Llama `.m` model with f32 weights (test-only).

llama2.c style, FORMATS §5 without the q80 details: whole sequence at once with a causal mask.
Weights come from `dllama_mpi.formats.open_model`; q/k rows are already in DL's (converter-permuted)
order, so rope rotates adjacent pairs (x[2i], x[2i+1]) (§5.3, LLAMA rope, llama3 frequency scaling
when the header has it).
"""

from __future__ import annotations

import numpy as np

from dllama_mpi.formats import ARCH_LLAMA, F16, F32, Q40, Q80


def dequantize(m, t) -> np.ndarray:
    """A tensor of any weight type as float32 [rows, cols], decoded here with numpy from FORMATS §1.3
    (not with the engine's kernels): f32 as stored, f16, q80 (f16 scale d, 32 int8: q * d), q40 (f16
    d, 16 bytes: low nibbles are values 0-15, high nibbles 16-31, (code - 8) * d); a GGUF's tensors
    by gguf-py's dequantization of the stored blocks, whatever their type."""
    if hasattr(m, "src"):   # a GGUFModel
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        raw, _, ggml_type = m.stored_rows(t.key, 0, t.rows)
        a = gguf_dequantize(np.asarray(raw).reshape(t.rows, -1), GGMLQuantizationType(ggml_type))
        return np.asarray(a, np.float32).reshape(t.rows, t.cols)
    if t.ftype == F32:
        return m.f32(t)
    raw = m.raw(t)
    if t.ftype == F16:
        return raw.view("<f2").astype(np.float32).reshape(t.rows, t.cols)
    if t.ftype == Q80:
        b = raw.reshape(-1, 34)
        d = b[:, :2].copy().view("<f2").astype(np.float32)
        return (b[:, 2:].view(np.int8).astype(np.float32) * d).reshape(t.rows, t.cols)
    if t.ftype == Q40:
        b = raw.reshape(-1, 18)
        d = b[:, :2].copy().view("<f2").astype(np.float32)
        qs = b[:, 2:]
        codes = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32) - 8
        return (codes * d).reshape(t.rows, t.cols)
    raise ValueError(f"reference forward: unknown float type {t.ftype}")


class ReferenceModel:
    """A `.m` file's tensors as float64 (read per use; quantized ones decoded exactly, so the
    reference differs from the engine only by the engine's own arithmetic: q80 activations, float32
    sums) and the RMSNorm every arch shares."""

    def __init__(self, path):
        from dllama_mpi.weights import open_model_file

        self.m = open_model_file(path)     # a .m, or a GGUF (its stored values, as gguf-py decodes them)
        self.h = self.m.header

    def close(self):
        self.m.close()

    def dense(self, name, layer=-1) -> np.ndarray:
        return dequantize(self.m, self.m.info(name, layer))

    def w(self, name, layer=-1):
        t = self.m.info(name, layer)
        a = dequantize(self.m, t).astype(np.float64)
        return a[0] if t.rows == 1 else a

    def embed(self, tokens) -> np.ndarray:
        """The embedding rows of tokens as float64 [T, dim] (only those rows decoded)."""
        t = self.m.info("embed")
        if t.ftype == F32 and not hasattr(self.m, "src"):
            return self.m.f32(t)[np.asarray(tokens)].astype(np.float64)
        rows = np.asarray(tokens)
        uniq, inv = np.unique(rows, return_inverse=True)
        if hasattr(self.m, "src"):
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize as gguf_dequantize

            row_bytes = self.m.src[t.key].nbytes // t.rows
            raw, _, ggml_type = self.m.stored_rows(t.key, 0, t.rows)
            blocks = np.asarray(raw).reshape(t.rows, row_bytes)[uniq]
            out = np.asarray(gguf_dequantize(blocks, GGMLQuantizationType(ggml_type)), np.float64).reshape(-1, t.cols)
        else:
            out = dequantize(self.m, t)[uniq].astype(np.float64)
        return out[inv]

    def rmsnorm(self, x, w):
        return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + self.h.eps)


class ReferenceLlama(ReferenceModel):
    def __init__(self, path):
        super().__init__(path)
        h = self.h
        if h.arch_type != ARCH_LLAMA or h.n_experts:
            raise ValueError("reference forward: dense llama models only")

    def freqs(self):
        """1 / theta^(2i/hd), with llama3 scaling (FORMATS §5.3) when rope_scaling_factor != 1."""
        h, hd = self.h, self.h.head_size
        freq = 1.0 / float(h.rope_theta) ** (np.arange(0, hd, 2) / hd)
        if h.rope_scaling_factor in (0, 1):
            return freq
        L, lo, hi, fac = (h.rope_scaling_orig_max_seq_len, h.rope_scaling_low_freq_factor,
                          h.rope_scaling_high_freq_factor, h.rope_scaling_factor)
        wl = 2 * np.pi / freq
        s = (L / wl - lo) / (hi - lo)
        return np.where(wl < L / hi, freq, np.where(wl > L / lo, freq / fac, (1 - s) * freq / fac + s * freq))

    def rope(self, x, n_heads, pos0):
        """x [T, n_heads * hd]; rotate each adjacent pair (2i, 2i+1) of each head by pos * freq_i."""
        hd = self.h.head_size
        T = x.shape[0]
        freq = self.freqs()                                                       # [hd/2]
        ang = (pos0 + np.arange(T))[:, None] * freq[None, :]                      # [T, hd/2]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        p = x.reshape(T, n_heads, hd // 2, 2)
        a, b = p[..., 0], p[..., 1]
        return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(T, -1)

    def forward(self, tokens):
        """Logits [len(tokens), vocab] (float64) of tokens at positions 0, 1, ..."""
        h = self.h
        T, hd, nh, nkv = len(tokens), h.head_size, h.n_heads, h.n_kv_heads
        x = self.embed(tokens)   # [T, dim]
        mask = np.triu(np.full((T, T), -np.inf), 1)
        for l in range(h.n_layers):
            y = self.rmsnorm(x, self.w("attn_norm", l))
            q = self.rope(y @ self.w("wq", l).T, nh, 0).reshape(T, nh, hd)
            k = self.rope(y @ self.w("wk", l).T, nkv, 0).reshape(T, nkv, hd)
            v = (y @ self.w("wv", l).T).reshape(T, nkv, hd)
            g = nh // nkv                                      # query heads per kv head
            k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            z = np.einsum("hts,shd->thd", s, v).reshape(T, nh * hd)
            x = x + z @ self.w("wo", l).T
            y = self.rmsnorm(x, self.w("ffn_norm", l))
            a = y @ self.w("w1", l).T                          # gate
            f = (a / (1 + np.exp(-a))) * (y @ self.w("w3", l).T)   # silu(gate) * up
            x = x + f @ self.w("w2", l).T                      # down
        return self.rmsnorm(x, self.w("norm")) @ self.w("wcls").T


def reference_logits(path, tokens) -> np.ndarray:
    return ReferenceLlama(path).forward(list(tokens))
