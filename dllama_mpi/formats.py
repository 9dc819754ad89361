"""Distributed Llama's file formats: `.m` models and `.t` tokenizers (../spec/FORMATS.md §1–§3).

dllama-mpi's extensions (the Gemma 3 and Qwen2 archs, SentencePiece token types) are in FORMATS-EXT.md beside
this file. This module is the only place that knows byte layouts. Readers memory-map the model (nothing is
copied until a tensor is asked for) and validate everything against the file length; every problem
is a one-line ModelFormatError / TokenizerFormatError naming the file and the field.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field, fields

import numpy as np

from .errors import ModelFormatError, TokenizerFormatError

# ---------------------------------------------------------------------------------------------
# enumerations (§1.3)

MODEL_MAGIC = 0x0A00ABCD
OLD_MODEL_MAGICS = (0x00ABCD00, 0x00ABCD01)

ARCH_LLAMA, ARCH_QWEN3, ARCH_QWEN3_MOE = 0xABCD00, 0xABCD01, 0xABCD02
# dllama-mpi's own archs (FORMATS-EXT.md) count from 0xABCD80, away from Distributed Llama's next ids
ARCH_GEMMA3, ARCH_QWEN2 = 0xABCD80, 0xABCD81
ARCH_NAMES = {ARCH_LLAMA: "llama", ARCH_QWEN3: "qwen3", ARCH_QWEN3_MOE: "qwen3_moe", ARCH_GEMMA3: "gemma3",
              ARCH_QWEN2: "qwen2"}

ACT_GELU, ACT_SILU = 0, 1
ROPE_LLAMA, ROPE_FALCON, ROPE_LLAMA3_1 = 0, 1, 2
ROPE_NAMES = {ROPE_LLAMA: "llama", ROPE_FALCON: "falcon", ROPE_LLAMA3_1: "llama3.1"}

# Weight types. Distributed Llama's four (FORMATS §1.3) are 0-3; dllama-mpi's extension (FORMATS-EXT.md
# "Weight types") adds the GGUF block types as 32 + their GGML type id, for the per-matrix type table
# (key 22) and the embedding (key 23). Q4_0 and Q8_0 are DL's q40 and q80 blocks byte for byte.
F32, F16, Q40, Q80 = 0, 1, 2, 3
GGML_BASE = 32
Q4_1, Q5_0, Q5_1 = GGML_BASE + 3, GGML_BASE + 6, GGML_BASE + 7
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = (GGML_BASE + g for g in (10, 11, 12, 13, 14))
IQ4_NL, IQ4_XS, BF16 = GGML_BASE + 20, GGML_BASE + 23, GGML_BASE + 30
FLOAT_NAMES = {F32: "f32", F16: "f16", Q40: "q40", Q80: "q80", BF16: "bf16", Q4_1: "q4_1", Q5_0: "q5_0",
               Q5_1: "q5_1", Q2_K: "q2_k", Q3_K: "q3_k", Q4_K: "q4_k", Q5_K: "q5_k", Q6_K: "q6_k",
               IQ4_NL: "iq4_nl", IQ4_XS: "iq4_xs"}
FLOAT_BY_NAME = {v: k for k, v in FLOAT_NAMES.items()}
DL_TYPES = (F32, F16, Q40, Q80)          # the types Distributed Llama's own files use
BLOCK = 32
Q40_BYTES, Q80_BYTES = 18, 34
# (values, bytes) of one storage unit per type: slices and sizes are whole units
TYPE_BLOCK = {F32: (1, 4), F16: (1, 2), Q40: (BLOCK, Q40_BYTES), Q80: (BLOCK, Q80_BYTES), BF16: (1, 2),
              Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24), Q2_K: (256, 84), Q3_K: (256, 110),
              Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210), IQ4_NL: (32, 18), IQ4_XS: (256, 136)}
FLOAT_TYPES = (F32, F16, BF16)           # multiplied with f32 activations
QUANTIZED = tuple(t for t in TYPE_BLOCK if t not in FLOAT_TYPES)   # block types: q80 activations


def ggml_to_type(ggml_type: int) -> int | None:
    """The weight type of a GGML type id (gguf's GGMLQuantizationType), None if not in TYPE_BLOCK."""
    t = {0: F32, 1: F16, 2: Q40, 8: Q80}.get(ggml_type, GGML_BASE + ggml_type)
    return t if t in TYPE_BLOCK else None


def type_to_ggml(t: int) -> int:
    return {F32: 0, F16: 1, Q40: 2, Q80: 8}.get(t, t - GGML_BASE)


def float_type_name(ftype: int) -> str:
    return FLOAT_NAMES.get(ftype, f"unknown({ftype})")


def block_shape(ftype: int) -> tuple[int, int]:
    """(values, bytes) of one block of this float type (1 value for f32 / f16)."""
    try:
        return TYPE_BLOCK[ftype]
    except KeyError:
        raise ValueError(f"unknown float type {ftype}") from None


def tensor_nbytes(ftype: int, rows: int, cols: int) -> int:
    values, nbytes = block_shape(ftype)
    return rows * cols // values * nbytes


# ---------------------------------------------------------------------------------------------
# .m header (§1.2)

# key -> field name, in key order. The converter's write order is HEADER_WRITE_ORDER.
HEADER_KEYS = {
    0: "version", 1: "arch_type", 2: "dim", 3: "hidden_dim", 4: "n_layers", 5: "n_heads",
    6: "n_kv_heads", 7: "n_experts", 8: "n_active_experts", 9: "vocab_size", 10: "max_seq_len",
    11: "hidden_act", 12: "rope_theta", 13: "weights_float_type", 14: "rope_scaling_factor",
    15: "rope_scaling_low_freq_factor", 16: "rope_scaling_high_freq_factor",
    17: "rope_scaling_orig_max_seq_len", 18: "rope_type", 19: "head_dim", 20: "norm_epsilon",
    21: "moe_hidden_dim",
    22: "n_tensor_types",   # dllama-mpi extension (FORMATS-EXT.md, "Per-matrix float types"): per-matrix type table follows
    23: "embed_type",       # dllama-mpi extension (FORMATS-EXT.md, "Weight types"): the embedding's type (default f32)
    # Gemma 3 extension (FORMATS-EXT.md "Gemma 3"): keys 64.. are only valid with arch gemma3
    64: "sliding_window", 65: "sliding_window_pattern", 66: "rope_theta_local",
    67: "query_pre_attn_scalar", 68: "rope_linear_factor",
}
GEMMA3_KEYS = (64, 65, 66, 67, 68)
HEADER_KEY_OF = {v: k for k, v in HEADER_KEYS.items()}
HEADER_WRITE_ORDER = [0, 1, 11, 2, 3, 4, 5, 6, 13, 10, 9, 7, 8, 12, 14, 15, 16, 17, 18, 19, 20, 21, 22, *GEMMA3_KEYS]
REQUIRED_KEYS = ("arch_type", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
                 "vocab_size", "max_seq_len", "weights_float_type")


@dataclass
class ModelHeader:
    """The .m header with the reader's defaults (§1.2); derived sizes are properties."""

    arch_type: int = ARCH_LLAMA
    dim: int = 0
    hidden_dim: int = 0
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    vocab_size: int = 0
    max_seq_len: int = 0
    weights_float_type: int = Q40
    version: int = 0
    n_experts: int = 0
    n_active_experts: int = 0
    hidden_act: int = ACT_SILU
    rope_theta: int = 10000
    rope_scaling_factor: int = 1
    rope_scaling_low_freq_factor: int = 0
    rope_scaling_high_freq_factor: int = 0
    rope_scaling_orig_max_seq_len: int = 0
    rope_type: int = ROPE_LLAMA
    head_dim: int = 0          # 0 = dim / n_heads
    norm_epsilon: int = 5      # coded: 5 -> 1e-5, 6 -> 1e-6
    moe_hidden_dim: int = 0
    n_tensor_types: int = 0    # extension: entries of the per-matrix type table (0 = none)
    tensor_types: tuple = ()   # extension: the type of every matrix ("W" tensor) in file order
    embed_type: int = F32      # extension (key 23): the token embedding's type
    sliding_window: int = 0            # gemma3: local layers attend to the last N positions (0 = none)
    sliding_window_pattern: int = 6    # gemma3: layer l is global iff l % pattern == pattern - 1
    rope_theta_local: int = 10000      # gemma3: rope base of the local (sliding-window) layers
    query_pre_attn_scalar: int = 0     # gemma3: attention scale is query_pre_attn_scalar^-1/2 (0 = head_dim)
    rope_linear_factor: int = 1        # gemma3: global layers divide their rope frequencies by this
    present: tuple = field(default=(), repr=False, compare=False)  # keys the file had, in order

    @property
    def arch_name(self) -> str:
        return ARCH_NAMES[self.arch_type]

    @property
    def is_qwen3(self) -> bool:
        return self.arch_type in (ARCH_QWEN3, ARCH_QWEN3_MOE)

    @property
    def is_gemma3(self) -> bool:
        return self.arch_type == ARCH_GEMMA3

    @property
    def has_qkv_bias(self) -> bool:
        """Qwen2: biases added to q, k and v after their matmuls (q_bias / k_bias / v_bias tensors)."""
        return self.arch_type == ARCH_QWEN2

    @property
    def has_qk_norm(self) -> bool:
        """Per-head RMSNorm of q and k before rope (q_norm / k_norm tensors)."""
        return self.is_qwen3 or self.is_gemma3

    def is_global_layer(self, layer: int) -> bool:
        """gemma3: full attention on this layer (else a sliding window); every layer of other archs."""
        if not self.is_gemma3 or self.sliding_window == 0:
            return True
        return layer % self.sliding_window_pattern == self.sliding_window_pattern - 1

    def rope_of_layer(self, layer: int) -> tuple[int, float]:
        """(rope base, frequency multiplier) of a layer: gemma3's local layers use rope_theta_local
        unscaled, its global layers rope_theta with 1/rope_linear_factor; other archs rope_theta."""
        if not self.is_gemma3:
            return self.rope_theta, 1.0
        if self.is_global_layer(layer):
            return self.rope_theta, 1.0 / self.rope_linear_factor
        return self.rope_theta_local, 1.0

    def window_of_layer(self, layer: int) -> int:
        """Positions a query of this layer attends to (itself included); 0 = all previous ones."""
        return 0 if self.is_global_layer(layer) else self.sliding_window

    @property
    def attn_scale(self) -> float:
        """The factor of q·k in attention: 1/sqrt(head_dim), or gemma3's query_pre_attn_scalar^-1/2."""
        return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_size)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.head_size * self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_size * self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        """FFN inner size used by the graph: moe_hidden_dim for QWEN3_MOE, hidden_dim otherwise."""
        return self.moe_hidden_dim if self.arch_type == ARCH_QWEN3_MOE else self.hidden_dim

    @property
    def eps(self) -> float:
        return {5: 1e-5, 6: 1e-6}[self.norm_epsilon]

    @property
    def effective_rope_type(self) -> int:
        """Qwen2, Qwen3 and Gemma 3 always use FALCON (half-split) rope, whatever the header says."""
        return ROPE_FALCON if self.is_qwen3 or self.is_gemma3 or self.has_qkv_bias else self.rope_type

    @property
    def n_matrices(self) -> int:
        """Tensors of type W (§1.4): 7 per dense layer, 4 + 3 per expert per MoE layer, plus wcls."""
        per_layer = 7 if self.n_experts == 0 else 4 + 3 * self.n_experts
        return self.n_layers * per_layer + 1

    @property
    def matrix_types(self) -> tuple:
        """The distinct float types of the matrices (one, unless the file has a type table)."""
        return tuple(sorted(set(self.tensor_types))) if self.tensor_types else (self.weights_float_type,)

    @property
    def weights_name(self) -> str:
        """'q80', or the types of a mixed file ('q40+q80')."""
        return "+".join(float_type_name(t) for t in self.matrix_types)

    @property
    def quantized(self) -> bool:
        """Some matrix is a block type: its input is the q80 activation buffer."""
        return any(t in QUANTIZED for t in self.matrix_types)

    def matrix_type_list(self) -> list[int]:
        """The type of every matrix in file order (the table, or weights_float_type for each)."""
        return list(self.tensor_types) if self.tensor_types else [self.weights_float_type] * self.n_matrices

    def matrix_names(self) -> list[str]:
        """The name (wq ... w3, wcls) of every matrix in file order, as matrix_type_list."""
        per_layer = ("wq", "wk", "wv", "wo") + ("w1", "w2", "w3") * max(self.n_experts, 1)
        return [n for _ in range(self.n_layers) for n in per_layer] + ["wcls"]

    def types_of(self, name: str) -> set[int]:
        """The types of the matrices called `name` (e.g. every layer's wo)."""
        return {t for n, t in zip(self.matrix_names(), self.matrix_type_list()) if n == name}

    def to_pairs(self) -> list[tuple[int, int]]:
        """(key, value) pairs in the converter's order; optional keys only if present/meaningful.
        Key 23 (the embedding's type) is written when, and only when, it is not f32; key 22 (the type
        table's length) when, and only when, there is a table, last."""
        keys = self.present or tuple(k for k in HEADER_WRITE_ORDER if k not in GEMMA3_KEYS or self.is_gemma3)
        order = [k for k in HEADER_WRITE_ORDER if k in keys and k != 22]
        if self.embed_type != F32:
            order.append(23)
        pairs = [(k, int(getattr(self, HEADER_KEYS[k]))) for k in order]
        if self.tensor_types:
            pairs.append((22, len(self.tensor_types)))
        return pairs

    def header_nbytes(self) -> int:
        """header_size of this header: magic, size, pairs, then the padded type table if any."""
        return 8 + 8 * len(self.to_pairs()) + _pad8(len(self.tensor_types))


def norm_epsilon_code(eps: float) -> int | None:
    """RMSNorm epsilon -> its header code (key 20: 5 = 1e-5, 6 = 1e-6), exact or equal as float32
    (GGUF stores it as f32); None for any other epsilon."""
    for code, ref in ((5, 1e-5), (6, 1e-6)):
        if eps == ref or np.float32(eps) == np.float32(ref):
            return code
    return None


def set_matrix_types(h: ModelHeader, types: list[int]) -> None:
    """Give every matrix (file order) its type: one type is key 13 alone, several the per-matrix
    table (key 22) with the most common one in key 13."""
    if len(set(types)) == 1:
        h.weights_float_type, h.tensor_types, h.n_tensor_types = types[0], (), 0
    else:
        h.weights_float_type = max(set(types), key=lambda t: (types.count(t), -t))
        h.tensor_types, h.n_tensor_types = tuple(types), len(types)


def drop_pages(mm, offset: int, nbytes: int) -> None:
    """madvise(DONTNEED) on the whole pages of [offset, offset + nbytes) of a read-only map: after the
    root copied (repacked) or sent a tensor, its file pages would otherwise count in its RSS next to
    the copy. A page shared with a neighbour tensor stays."""
    if mm is None or not hasattr(mm, "madvise"):
        return
    page = mmap.PAGESIZE
    start = -(-offset // page) * page
    end = min(offset + nbytes, len(mm)) // page * page
    if end > start:
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def _int_fields():
    return {f.name for f in fields(ModelHeader) if f.name not in ("present", "tensor_types")}


# ---------------------------------------------------------------------------------------------
# tensor layout (§1.4)

# the tensors of type W (weights_float_type, or their entry of the per-matrix type table)
MATRIX_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls")

@dataclass(frozen=True)
class TensorInfo:
    name: str          # embed, wq, wk, wv, wo, w1, w2, w3, router, q_norm, k_norm, attn_norm, ffn_norm,
                       # attn_post_norm, ffn_post_norm (gemma3), q_bias, k_bias, v_bias (qwen2), norm, wcls
    layer: int         # -1 for global tensors
    expert: int        # -1 unless an MoE expert matrix
    ftype: int
    rows: int
    cols: int
    offset: int        # byte offset in the file
    nbytes: int

    @property
    def key(self) -> tuple:
        return (self.name, self.layer, self.expert)


def tensor_layout(h: ModelHeader, header_size: int) -> list[TensorInfo]:
    """The tensors of a model in file order, with their offsets."""
    out: list[TensorInfo] = []
    off = header_size
    W = None   # a matrix: the header's weights_float_type, or its entry of the type table
    types = iter(h.tensor_types) if h.tensor_types else None

    def add(name, ftype, rows, cols, layer=-1, expert=-1):
        nonlocal off
        if ftype is None:
            ftype = next(types) if types is not None else h.weights_float_type
        n = tensor_nbytes(ftype, rows, cols)
        out.append(TensorInfo(name, layer, expert, ftype, rows, cols, off, n))
        off += n

    add("embed", h.embed_type, h.vocab_size, h.dim)
    for l in range(h.n_layers):
        add("wq", W, h.q_dim, h.dim, l)
        add("wk", W, h.kv_dim, h.dim, l)
        add("wv", W, h.kv_dim, h.dim, l)
        add("wo", W, h.dim, h.q_dim, l)
        if h.n_experts == 0:
            add("w1", W, h.hidden_dim, h.dim, l)
            add("w2", W, h.dim, h.hidden_dim, l)
            add("w3", W, h.hidden_dim, h.dim, l)
        else:
            add("router", F32, h.n_experts, h.dim, l)
            for e in range(h.n_experts):
                add("w1", W, h.moe_hidden_dim, h.dim, l, e)
                add("w2", W, h.dim, h.moe_hidden_dim, l, e)
                add("w3", W, h.moe_hidden_dim, h.dim, l, e)
        if h.has_qk_norm:
            add("q_norm", F32, 1, h.head_size, l)
            add("k_norm", F32, 1, h.head_size, l)
        add("attn_norm", F32, 1, h.dim, l)
        add("ffn_norm", F32, 1, h.dim, l)
        if h.is_gemma3:                        # sandwich norms: after attention, after the FFN
            add("attn_post_norm", F32, 1, h.dim, l)
            add("ffn_post_norm", F32, 1, h.dim, l)
        if h.has_qkv_bias:                     # qwen2: added to q, k, v after their matmuls
            add("q_bias", F32, 1, h.q_dim, l)
            add("k_bias", F32, 1, h.kv_dim, l)
            add("v_bias", F32, 1, h.kv_dim, l)
    add("norm", F32, 1, h.dim)
    add("wcls", W, h.vocab_size, h.dim)
    return out


def model_nbytes(h: ModelHeader, header_size: int) -> int:
    """The file size `tensor_layout` describes, computed without listing the tensors (a damaged
    header may claim billions of layers: check the size first, then build the table). With a type
    table (whose length the header bytes bound) the list is short enough to build."""
    if h.tensor_types:
        last = tensor_layout(h, header_size)[-1]
        return last.offset + last.nbytes
    W = h.weights_float_type
    per_layer = (tensor_nbytes(W, h.q_dim, h.dim) + 2 * tensor_nbytes(W, h.kv_dim, h.dim)
                 + tensor_nbytes(W, h.dim, h.q_dim) + 2 * tensor_nbytes(F32, 1, h.dim))
    if h.n_experts == 0:
        per_layer += 2 * tensor_nbytes(W, h.hidden_dim, h.dim) + tensor_nbytes(W, h.dim, h.hidden_dim)
    else:
        per_layer += tensor_nbytes(F32, h.n_experts, h.dim) + h.n_experts * (
            2 * tensor_nbytes(W, h.moe_hidden_dim, h.dim) + tensor_nbytes(W, h.dim, h.moe_hidden_dim))
    if h.has_qk_norm:
        per_layer += 2 * tensor_nbytes(F32, 1, h.head_size)
    if h.is_gemma3:
        per_layer += 2 * tensor_nbytes(F32, 1, h.dim)
    if h.has_qkv_bias:
        per_layer += tensor_nbytes(F32, 1, h.q_dim) + 2 * tensor_nbytes(F32, 1, h.kv_dim)
    return (header_size + tensor_nbytes(h.embed_type, h.vocab_size, h.dim) + h.n_layers * per_layer
            + tensor_nbytes(F32, 1, h.dim) + tensor_nbytes(W, h.vocab_size, h.dim))


def validate_header(path: str, h: ModelHeader) -> None:
    def bad(msg):
        raise ModelFormatError(f"{path}: {msg}")

    if h.version != 0:
        bad(f"header key 0 (version) is {h.version}, expected 0")
    if h.arch_type not in ARCH_NAMES:
        bad(f"header key 1 (arch_type) has unknown value {h.arch_type:#x}")
    if h.hidden_act not in (ACT_GELU, ACT_SILU):
        bad(f"header key 11 (hidden_act) has unknown value {h.hidden_act}")
    if h.rope_type not in ROPE_NAMES:
        bad(f"header key 18 (rope_type) has unknown value {h.rope_type}")
    if h.weights_float_type not in FLOAT_NAMES:
        bad(f"header key 13 (weights_float_type) has unknown value {h.weights_float_type}")
    if h.embed_type not in FLOAT_NAMES:
        bad(f"header key 23 (embed_type) has unknown value {h.embed_type}")
    if h.norm_epsilon not in (5, 6):
        bad(f"header key 20 (norm_epsilon) is {h.norm_epsilon}, expected 5 (1e-5) or 6 (1e-6)")
    for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
        if getattr(h, name) <= 0:
            bad(f"header key {HEADER_KEY_OF[name]} ({name}) is {getattr(h, name)}, must be positive")
    if h.head_dim < 0 or h.moe_hidden_dim < 0 or h.n_experts < 0 or h.n_active_experts < 0:
        bad("negative head_dim, moe_hidden_dim, n_experts or n_active_experts")
    if h.n_heads % h.n_kv_heads:
        bad(f"n_heads {h.n_heads} is not a multiple of n_kv_heads {h.n_kv_heads}")
    if h.head_dim == 0 and h.dim % h.n_heads:
        bad(f"dim {h.dim} is not a multiple of n_heads {h.n_heads} and head_dim is absent")
    if h.head_size % 2:
        bad(f"head_dim {h.head_size} must be even for rope")
    if h.has_qkv_bias and h.n_experts:
        bad(f"qwen2 model with n_experts {h.n_experts} (key 7); qwen2 is dense")
    if h.has_qkv_bias and h.rope_scaling_factor != 1:
        bad(f"qwen2 model with llama3 rope scaling (key 14 is {h.rope_scaling_factor}); qwen2 has no rope scaling")
    if h.arch_type == ARCH_QWEN3_MOE and (h.n_experts == 0 or h.moe_hidden_dim == 0):
        bad("qwen3_moe model without n_experts (key 7) or moe_hidden_dim (key 21)")
    if h.n_experts and not 0 < h.n_active_experts <= h.n_experts:
        bad(f"n_active_experts {h.n_active_experts} must be in 1..n_experts ({h.n_experts})")
    if h.n_experts and h.moe_hidden_dim == 0:
        bad("MoE model (n_experts > 0) without moe_hidden_dim (key 21)")
    if h.rope_scaling_factor != 1 and (
            h.rope_scaling_orig_max_seq_len <= 0
            or h.rope_scaling_high_freq_factor == h.rope_scaling_low_freq_factor):
        bad("llama3 rope scaling (key 14) without a valid original length / low / high freq factors")
    if h.is_gemma3:
        _validate_gemma3(bad, h)
    elif any(k in h.present for k in GEMMA3_KEYS):
        k = next(k for k in h.present if k in GEMMA3_KEYS)
        bad(f"header key {k} ({HEADER_KEYS[k]}) is only defined for arch gemma3, not {h.arch_name}")
    if h.tensor_types:
        if h.n_tensor_types != h.n_matrices:
            bad(f"header key 22 (n_tensor_types) is {h.n_tensor_types}, the model has {h.n_matrices} matrices")
        for i, t in enumerate(h.tensor_types):
            if t not in FLOAT_NAMES:
                bad(f"tensor type table entry {i} has unknown float type {t}")
    if h.quantized:
        q = next(t for t in h.matrix_types if t in QUANTIZED)
        for name, n in (("dim", h.dim), ("q_dim", h.q_dim), ("ffn_dim", h.ffn_dim)):
            if n % BLOCK:
                bad(f"{name} {n} is not a multiple of {BLOCK}, required for {float_type_name(q)} weights")
    if h.dim % TYPE_BLOCK[h.embed_type][0]:
        bad(f"dim {h.dim} is not a multiple of {TYPE_BLOCK[h.embed_type][0]}, required for a "
            f"{float_type_name(h.embed_type)} embedding")
    if any(TYPE_BLOCK[t][0] > BLOCK for t in h.matrix_types):
        # 256-value block types: each matrix of such a type needs whole blocks per row. Without a
        # type table every matrix has the one type (and n_layers may be anything yet: no list)
        cols = {"wq": h.dim, "wk": h.dim, "wv": h.dim, "wo": h.q_dim, "w1": h.dim, "w2": h.ffn_dim, "w3": h.dim,
                "wcls": h.dim}
        if h.tensor_types:
            named = zip(h.matrix_names(), h.tensor_types)
        else:
            named = ((n, h.weights_float_type) for n in cols)
        for i, (name, t) in enumerate(named):
            if cols[name] % TYPE_BLOCK[t][0]:
                where = f"matrix {i} ({name})" if h.tensor_types else name
                bad(f"{where} is {float_type_name(t)}, whose {TYPE_BLOCK[t][0]}-value blocks do not divide its "
                    f"{cols[name]} columns")


def _validate_gemma3(bad, h: ModelHeader) -> None:
    if h.hidden_act != ACT_GELU:
        bad(f"gemma3 model with hidden_act {h.hidden_act} (key 11); gemma3 uses GELU (0, tanh approximation)")
    if h.n_experts:
        bad(f"gemma3 model with n_experts {h.n_experts} (key 7); gemma3 is dense")
    if h.rope_scaling_factor != 1:
        bad("gemma3 model with llama3 rope scaling (key 14); gemma3 scales with rope_linear_factor (key 68)")
    for key in GEMMA3_KEYS:
        name = HEADER_KEYS[key]
        v = getattr(h, name)
        if v < 0 or (v == 0 and name in ("sliding_window_pattern", "rope_theta_local", "rope_linear_factor")):
            bad(f"header key {key} ({name}) is {v}, must be positive")


@dataclass
class ModelFile:
    """A memory-mapped .m file: header + tensor table; tensor data is read lazily from the map."""

    path: str
    header: ModelHeader
    header_size: int
    tensors: list[TensorInfo]
    _mm: mmap.mmap | None = field(default=None, repr=False)
    _by_key: dict = field(default_factory=dict, repr=False)
    notes = ()   # nothing is converted when it loads (a GGUFModel's notes say what is)

    def __post_init__(self):
        self._by_key = {t.key: t for t in self.tensors}

    def info(self, name: str, layer: int = -1, expert: int = -1) -> TensorInfo:
        return self._by_key[(name, layer, expert)]

    def raw(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the map (no copy)."""
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def rows_raw(self, t: TensorInfo, r0: int, r1: int) -> np.ndarray:
        """Bytes of rows [r0, r1) (a contiguous range for any float type)."""
        row_bytes = t.nbytes // t.rows
        return np.frombuffer(self._mm, dtype=np.uint8, count=(r1 - r0) * row_bytes,
                             offset=t.offset + r0 * row_bytes)

    @property
    def paths(self) -> list[str]:
        """The files of the model (one; a split GGUF has several)."""
        return [self.path]

    def stored_rows(self, key: tuple, r0: int, r1: int):
        """(bytes of rows [r0, r1) of the tensor `key`: a view of the map, its type, None): the
        model-source interface weights.py reads both .m and GGUF files through."""
        return self.rows_raw(self._by_key[key], r0, r1), self._by_key[key].ftype, None

    def drop(self, key: tuple) -> None:
        """Let the kernel drop the file pages of a tensor the root has copied or sent."""
        t = self._by_key[key]
        drop_pages(self._mm, t.offset, t.nbytes)

    def f32(self, t: TensorInfo) -> np.ndarray:
        """An F32 tensor as a [rows, cols] float32 view (may be unaligned; copy small ones)."""
        if t.ftype != F32:
            raise ModelFormatError(f"{self.path}: tensor {t.name} is {float_type_name(t.ftype)}, not f32")
        return np.frombuffer(self._mm, dtype="<f4", count=t.rows * t.cols, offset=t.offset).reshape(t.rows, t.cols)

    def close(self):
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still alive; the map goes with them
                pass
            self._mm = None


def read_model_header(path: str, data: bytes | mmap.mmap, file_size: int) -> tuple[ModelHeader, int]:
    if file_size < 8:
        raise ModelFormatError(f"{path}: file is {file_size} bytes, too short for a .m header")
    magic, header_size = struct.unpack_from("<ii", data, 0)
    if magic in OLD_MODEL_MAGICS:
        raise ModelFormatError(f"{path}: old Distributed Llama model format (magic {magic:#x}) is not supported; reconvert it")
    if magic != MODEL_MAGIC:
        raise ModelFormatError(f"{path}: not a .m model file (magic {magic & 0xffffffff:#010x}, expected {MODEL_MAGIC:#010x})")
    if header_size < 8 or (header_size - 8) % 8:
        raise ModelFormatError(f"{path}: header_size {header_size} is not 8 + 8 x pairs")
    if header_size > file_size:
        raise ModelFormatError(f"{path}: header_size {header_size} is larger than the file ({file_size} bytes)")
    values: dict[str, int] = {}
    present = []
    types: tuple = ()
    pos = 8
    while pos < header_size:
        key, value = struct.unpack_from("<ii", data, pos)
        pos += 8
        if key not in HEADER_KEYS:
            raise ModelFormatError(f"{path}: unknown header key {key} (value {value})")
        if key in present:
            raise ModelFormatError(f"{path}: header key {key} ({HEADER_KEYS[key]}) appears twice")
        present.append(key)
        values[HEADER_KEYS[key]] = value
        if key == 22:   # extension: the last pair; its table of one byte per matrix ends the header
            if value <= 0 or pos + _pad8(value) != header_size:
                raise ModelFormatError(f"{path}: header key 22 (n_tensor_types) is {value} but the header has "
                                       f"{header_size - pos} bytes after it (the padded type table must end the header)")
            types = tuple(data[pos:pos + value])
            break
    for name in REQUIRED_KEYS:
        if name not in values:
            raise ModelFormatError(f"{path}: header has no key {HEADER_KEY_OF[name]} ({name})")
    h = ModelHeader(**values, tensor_types=types, present=tuple(present))
    validate_header(path, h)
    return h, header_size


def map_model_file(path: str) -> tuple[mmap.mmap, int]:
    """(a read-only map of the whole file, its size) of a model file, .m or GGUF; one-line errors."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot open model file: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ModelFormatError(f"{path}: model file is empty")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size


def open_model(path: str | os.PathLike) -> ModelFile:
    """Memory-map and validate a .m file. Raises ModelFormatError with a one-line message."""
    path = os.fspath(path)
    mm, size = map_model_file(path)
    try:
        h, header_size = read_model_header(path, mm, size)
        expected = model_nbytes(h, header_size)
        if expected != size:
            what = "missing" if expected > size else "extra"
            raise ModelFormatError(
                f"{path}: file is {size} bytes but the header describes {expected} bytes "
                f"({abs(expected - size)} bytes {what}; truncated or wrong header?)")
        tensors = tensor_layout(h, header_size)
    except Exception:
        mm.close()
        raise
    return ModelFile(path, h, header_size, tensors, mm)


def write_model_header(f, h: ModelHeader) -> None:
    pairs = h.to_pairs()
    f.write(struct.pack("<ii", MODEL_MAGIC, h.header_nbytes()))
    for k, v in pairs:
        f.write(struct.pack("<ii", k, v))
    if h.tensor_types:
        table = bytes(h.tensor_types)
        f.write(table + b"\0" * (_pad8(len(table)) - len(table)))


def model_header_bytes(h: ModelHeader) -> bytes:
    """A header as the bytes of a .m header (what the root broadcasts: every rank derives the layout
    from it)."""
    import io

    b = io.BytesIO()
    write_model_header(b, h)
    return b.getvalue()


# ---------------------------------------------------------------------------------------------
# .t tokenizer (§3)

TOKENIZER_MAGIC = 0x567124
TOKENIZER_MAGIC_OLD = 0x567123
TOK_KEYS = {0: "version", 1: "vocab_size", 2: "max_token_length", 3: "bos_id", 4: "eos_id",
            5: "pad_id", 6: "chat_eos_id", 7: "chat_template", 8: "chat_stop", 9: "n_eos_tokens",
            10: "add_bos",
            # SentencePiece extension (FORMATS-EXT.md "SentencePiece tokenizers")
            11: "token_types", 12: "add_space_prefix"}

# token types of a SentencePiece vocabulary: GGUF's tokenizer.ggml.token_type values
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class TokenizerData:
    vocab: list[bytes]
    scores: np.ndarray            # float32 [vocab_size]
    bos_id: int
    eos_ids: list[int]
    add_bos: bool
    chat_template: str | None
    max_token_length: int = 0
    # SentencePiece vocabularies (key 11): one TOKEN_* type per token, uint8; None = byte-level BPE
    token_types: np.ndarray | None = None
    add_space_prefix: bool = False

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def read_tokenizer(path: str | os.PathLike) -> TokenizerData:
    """Read and validate a .t file (current magic 0x567124 and legacy 0x567123)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerFormatError(f"{path}: cannot open tokenizer file: {e.strerror}") from None

    def bad(msg):
        raise TokenizerFormatError(f"{path}: {msg}")

    def need(pos, n, what):
        if n < 0 or pos + n > len(data):
            bad(f"{what} needs {n} bytes at offset {pos} but the file has {len(data)} bytes (truncated?)")

    need(0, 4, "magic")
    (magic,) = struct.unpack_from("<i", data, 0)
    eos_ids: list[int] = []
    template = None
    add_bos = True
    token_types = None
    add_space_prefix = False
    if magic == TOKENIZER_MAGIC_OLD:
        need(4, 20, "legacy header")
        vocab_size, max_len, bos_id, eos_id, _pad = struct.unpack_from("<IIiii", data, 4)
        eos_ids = [eos_id] if eos_id >= 0 else []
        pos = 24
    elif magic == TOKENIZER_MAGIC:
        need(4, 4, "header_size")
        (header_size,) = struct.unpack_from("<i", data, 4)
        if header_size < 8 or (header_size - 8) % 8:
            bad(f"header_size {header_size} is not 8 + 8 x pairs")
        need(0, header_size, "header")
        vals: dict[str, int] = {}
        for i in range((header_size - 8) // 8):
            k, v = struct.unpack_from("<ii", data, 8 + 8 * i)
            if k not in TOK_KEYS:
                bad(f"unknown header key {k} (value {v})")
            vals[TOK_KEYS[k]] = v
        if vals.get("version") != 1:
            bad(f"header key 0 (version) is {vals.get('version')}, expected 1 (old tokenizer version?)")
        for k in ("vocab_size", "max_token_length", "bos_id"):
            if k not in vals:
                bad(f"header has no key {k}")
        vocab_size, max_len, bos_id = vals["vocab_size"], vals["max_token_length"], vals["bos_id"]
        pos = header_size
        if "chat_stop" in vals:            # legacy: skipped bytes before the template
            need(pos, vals["chat_stop"], "chat_stop text")
            pos += vals["chat_stop"]
        if "chat_template" in vals:
            n = vals["chat_template"]
            need(pos, n, "chat template")
            try:
                template = data[pos:pos + n].decode("utf-8")
            except UnicodeDecodeError as e:
                bad(f"chat template is not valid UTF-8 ({e.reason} at byte {e.start})")
            pos += n
        n_eos = vals.get("n_eos_tokens", 0)
        if n_eos < 0:
            bad(f"n_eos_tokens is {n_eos}")
        need(pos, 4 * n_eos, "eos ids")
        eos_ids = list(struct.unpack_from(f"<{n_eos}i", data, pos))
        pos += 4 * n_eos
        for legacy in ("eos_id", "chat_eos_id"):
            if legacy in vals and vals[legacy] >= 0 and vals[legacy] not in eos_ids:
                eos_ids.append(vals[legacy])
        add_bos = bool(vals.get("add_bos", 1))
        if "token_types" in vals:
            if vals["token_types"] != vocab_size:
                bad(f"header key 11 (token_types) is {vals['token_types']}, expected vocab_size {vocab_size}")
            need(pos, vocab_size, "token types")
            token_types = np.frombuffer(data, dtype=np.uint8, count=vocab_size, offset=pos).copy()
            pos += vocab_size
            wrong = np.flatnonzero((token_types < TOKEN_NORMAL) | (token_types > TOKEN_BYTE))
            if wrong.size:
                bad(f"token {wrong[0]} has unknown type {token_types[wrong[0]]} (expected 1..6)")
        elif "add_space_prefix" in vals:
            bad("header key 12 (add_space_prefix) without key 11 (token_types)")
        add_space_prefix = bool(vals.get("add_space_prefix", 0))
    else:
        bad(f"not a .t tokenizer file (magic {magic & 0xffffffff:#x})")

    if vocab_size <= 0:
        bad(f"vocab_size is {vocab_size}")
    if max_len < 1:
        bad(f"max_token_length is {max_len}, must be >= 1")
    if 9 * vocab_size > len(data) - pos:   # each token record is >= 9 bytes: no huge allocation
        bad(f"vocab_size {vocab_size} does not fit in the file ({len(data)} bytes; truncated?)")
    vocab: list[bytes] = []
    scores = np.empty(vocab_size, dtype=np.float32)
    unpack = struct.Struct("<fi").unpack_from  # int32 length, as Distributed Llama reads it
    for i in range(vocab_size):
        need(pos, 8, f"token {i} record")
        score, length = unpack(data, pos)
        pos += 8
        if length < 1 or length > max_len:
            bad(f"token {i} has length {length} (max_token_length is {max_len})")
        need(pos, length, f"token {i} bytes")
        vocab.append(data[pos:pos + length])
        scores[i] = score
        pos += length
    if pos != len(data):
        bad(f"{len(data) - pos} unexpected bytes after the last token record")
    if not 0 <= bos_id < vocab_size:
        bad(f"bos_id {bos_id} is outside the vocabulary (size {vocab_size})")
    for e in eos_ids:
        if not 0 <= e < vocab_size:
            bad(f"eos id {e} is outside the vocabulary (size {vocab_size})")
    if token_types is not None:
        for i in np.flatnonzero(token_types == TOKEN_BYTE):
            if len(vocab[i]) != 1:
                bad(f"byte token {i} is {len(vocab[i])} bytes long, expected 1")
    return TokenizerData(vocab, scores, bos_id, eos_ids, add_bos, template, max_len, token_types, add_space_prefix)


def write_tokenizer(path: str | os.PathLike, t: TokenizerData) -> None:
    """Write a current-format .t file (keys in the converter's order 3, 0, 1, 2, (7), 9, 10; then
    11, 12 for a SentencePiece vocabulary with token types, FORMATS-EXT.md)."""
    template = t.chat_template.encode("utf-8") if t.chat_template is not None else None
    max_len = max(len(v) for v in t.vocab)
    pairs = [(3, t.bos_id), (0, 1), (1, len(t.vocab)), (2, max_len)]
    if template is not None:
        pairs.append((7, len(template)))
    pairs += [(9, len(t.eos_ids)), (10, 1 if t.add_bos else 0)]
    if t.token_types is not None:
        pairs += [(11, len(t.vocab)), (12, 1 if t.add_space_prefix else 0)]
    parts = [struct.pack("<ii", TOKENIZER_MAGIC, 8 + 8 * len(pairs))]
    parts += [struct.pack("<ii", k, v) for k, v in pairs]
    if template is not None:
        parts.append(template)
    parts.append(struct.pack(f"<{len(t.eos_ids)}i", *t.eos_ids))
    if t.token_types is not None:
        parts.append(np.asarray(t.token_types, dtype=np.uint8).tobytes())
    for tok, score in zip(t.vocab, t.scores):
        parts.append(struct.pack("<fI", float(score), len(tok)))
        parts.append(tok)
    atomic_write_bytes(path, b"".join(parts))


def atomic_write_bytes(path, data: bytes) -> None:
    tmp = os.fspath(path) + ".partial"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
