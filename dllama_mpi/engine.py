"""The forward pass: one SPMD function run by every rank on its shard of every layer.

Reads like the math (FORMATS.md §5):

    x = embed[token]                                   (root, then broadcast)
    per layer:  x += wo · attention(rope(wq·y), rope(wk·y), wv·y)     y = rmsnorm(x)
                x += w2 · (silu(w1·y) * (w3·y))                        y = rmsnorm(x)
    logits = wcls · rmsnorm(x)

Each rank multiplies its own rows (wq, wk, wv, w1, w3, wcls) or columns (wo, w2) from the shard plan;
the two `x +=` are the only synchronisation points (`sync.PartialSum`), plus the broadcast of the
embedding row and the gather of the logits. All buffers are allocated once (`RunState`); a token is
a few dozen C kernel calls.
"""

from __future__ import annotations

import math
import mmap
import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import comm as C
from .comm import Comm
from .errors import ConfigError
from .formats import (BLOCK, F16, F32, FLOAT_NAMES, Q40, Q80, Q80_BYTES, ModelFile, ModelHeader, TensorInfo,
                      block_shape, float_type_name, read_model_header, tensor_layout, tensor_nbytes)
from .kernels import ffi, lib
from .shard import COL_SPLIT, ROW_SPLIT, ShardPlan, make_plan
from .sync import PartialSum

DEFAULT_BATCH = 32  # prompt positions per forward pass (Distributed Llama uses 32 too)


# cffi pointers are made once per buffer (numpy's .ctypes costs microseconds); a token's kernel
# calls pass them, with cheap pointer arithmetic for offsets.
def fptr(a: np.ndarray):
    return ffi.cast("float *", a.ctypes.data)


def qptr(a: np.ndarray):
    return ffi.cast("dl_block_q80 *", a.ctypes.data)


# ------------------------------------------------------------------------------------------------
# weights

REPACK = os.environ.get("DLLAMA_REPACK", "1") != "0"   # DLLAMA_REPACK=0: keep the plain q40 / q80 layouts


def _aligned_empty(nbytes: int) -> np.ndarray:
    """uint8 buffer whose data starts on a 64-byte boundary (SIMD loads, no false sharing)."""
    buf = np.empty(nbytes + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + nbytes]


@dataclass
class Matrix:
    """One rank's slice of a weight matrix [rows, cols]: f32 / f16 row-major, q80 blocks, or q40
    repacked once at load into the interleaved layout of kernels/repack.c (16 rows per SIMD pass;
    the repacked buffer replaces the raw slice, so memory does not double); q80 likewise into the
    q80r layout of kernels/matmul_q80.c. DLLAMA_REPACK=0 keeps plain blocks. q40 / q80 multiply the
    q80 activations, f32 / f16 the f32 ones."""

    data: np.ndarray   # f32 / f16 / q80 / plain q40: raw bytes of the slice; q40r: the repacked buffer
    rows: int
    cols: int
    ftype: int
    ptr: object = field(init=False, repr=False)
    repacked: bool = field(init=False, default=False)

    def __post_init__(self):
        if self.ftype in (Q40, Q80) and REPACK:
            q40 = self.ftype == Q40
            src = self.data
            size = lib.dl_q40r_bytes(self.rows, self.cols) if q40 else lib.dl_q80r_bytes(self.rows, self.cols)
            self.data = _aligned_empty(size)
            dst = ffi.cast("void *", self.data.ctypes.data)
            if q40:
                lib.dl_repack_q40(dst, ffi.cast("dl_block_q40 *", src.ctypes.data), self.rows, self.cols)
            else:
                lib.dl_repack_q80(dst, ffi.cast("dl_block_q80 *", src.ctypes.data), self.rows, self.cols)
            self.repacked = True
            self.ptr = dst
            self._kernel = "dl_matmul_q40r_q80" if q40 else "dl_matmul_q80r_q80"
            self._quantized_input = True
            return
        ctype = {Q40: "dl_block_q40 *", Q80: "dl_block_q80 *", F16: "uint16_t *", F32: "float *"}[self.ftype]
        self.ptr = ffi.cast(ctype, self.data.ctypes.data)
        self._kernel = {Q40: "dl_matmul_q40_q80", Q80: "dl_matmul_q80_q80", F16: "dl_matmul_f16_f32",
                        F32: "dl_matmul_f32"}[self.ftype]
        self._quantized_input = self.ftype in (Q40, Q80)

    @property
    def nbytes(self) -> int:
        """Bytes of weights read by one matmul (the payload, without repacking padding)."""
        return tensor_nbytes(self.ftype, self.rows, self.cols)

    def matmul(self, out, xq, xf, batch: int) -> None:
        """out[batch, rows] = x[batch, cols] · selfᵀ (cffi pointers); q40 / q80 take the q80
        input xq, f32 / f16 the f32 input xf."""
        # looked up per call: the benchmark's profiler replaces the module's `lib` with a timing proxy
        getattr(lib, self._kernel)(out, self.ptr, xq if self._quantized_input else xf, self.rows, self.cols, batch)


def _drop_pages(model: ModelFile | None, t: TensorInfo) -> None:
    """After a repack copied a tensor out of the root's map, let the kernel drop its file pages
    (they would otherwise count in the root's RSS next to the repacked copy)."""
    mm = getattr(model, "_mm", None)
    if mm is None or not hasattr(mm, "madvise"):
        return
    page = mmap.PAGESIZE
    start = t.offset // page * page
    end = min(t.offset + t.nbytes, len(mm)) // page * page
    if end > start:
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass


@dataclass
class Layer:
    wq: Matrix
    wk: Matrix
    wv: Matrix
    wo: Matrix
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    w1: Matrix | None = None
    w2: Matrix | None = None
    w3: Matrix | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    router: np.ndarray | None = None                 # [n_experts, dim] f32 (replicated)
    experts: list = field(default_factory=list)      # [(w1, w2, w3)] per expert

    def __post_init__(self):
        p = lambda a: None if a is None else fptr(a)  # noqa: E731
        self.p_attn_norm, self.p_ffn_norm = p(self.attn_norm), p(self.ffn_norm)
        self.p_q_norm, self.p_k_norm, self.p_router = p(self.q_norm), p(self.k_norm), p(self.router)


@dataclass
class Weights:
    embed: np.ndarray | None   # root only: [vocab, dim] f32 (a view of the mapped file)
    layers: list[Layer]
    norm: np.ndarray
    wcls: Matrix


def _slice_bytes(model: ModelFile, t: TensorInfo, plan: ShardPlan, rank: int) -> np.ndarray:
    """The bytes of rank's slice of a matrix: a view for row ranges, a packed copy for columns."""
    raw = model.raw(t)
    if t.name in ROW_SPLIT:
        r0, r1 = plan.rows(t.name, rank)
        if (r0, r1) == (0, t.rows):
            return raw
        return model.rows_raw(t, r0, r1)
    c0, c1 = plan.cols(t.name, rank)
    if (c0, c1) == (0, t.cols):
        return raw
    unit, unit_bytes = block_shape(t.ftype)
    rows = raw.reshape(t.rows, t.nbytes // t.rows)
    return np.ascontiguousarray(rows[:, c0 // unit * unit_bytes: c1 // unit * unit_bytes]).reshape(-1)


def _slice_shape(t: TensorInfo, plan: ShardPlan, rank: int) -> tuple[int, int]:
    if t.name in ROW_SPLIT:
        r0, r1 = plan.rows(t.name, rank)
        return r1 - r0, t.cols
    c0, c1 = plan.cols(t.name, rank)
    return t.rows, c1 - c0


def _row_displacements(t: TensorInfo, plan: ShardPlan, n: int) -> list[int] | None:
    """Byte offsets of each rank's rows in the tensor when the row slices tile it in rank order
    (no overlap: MPI forbids reading a Scatterv byte twice), else None."""
    if t.name not in ROW_SPLIT:
        return None
    ranges = [plan.rows(t.name, r) for r in range(n)]
    if ranges[0][0] != 0 or ranges[-1][1] != t.rows or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        return None
    row_bytes = t.nbytes // t.rows
    return [r0 * row_bytes for r0, _ in ranges]


def _slice_nbytes(t: TensorInfo, rows: int, cols: int) -> int:
    return tensor_nbytes(t.ftype, rows, cols)


def load_weights(comm: Comm, header: ModelHeader, header_size: int, plan: ShardPlan,
                 model: ModelFile | None, load: str = "scatter", progress=None) -> Weights:
    """Give every rank its slices. `scatter`: only the root reads the file and Scatterv's each
    tensor (one tensor of extra memory at a time); `local`: every rank maps the file itself."""
    rank, n = comm.rank, comm.size
    layers: dict[int, dict] = {}
    embed = norm = wcls = None
    for t in tensor_layout(header, header_size):
        if progress is not None:
            progress(t)
        if t.name == "embed":
            if comm.is_root:
                embed = model.f32(t)
            continue
        if t.ftype == F32 and t.name not in ROW_SPLIT + COL_SPLIT:
            # small replicated vectors (norms) and the MoE router: copy (aligned) and broadcast
            arr = np.empty((t.rows, t.cols), np.float32)
            if comm.is_root or load == "local":
                arr[...] = model.f32(t)
            if load != "local":
                comm.bcast_array(arr)
            value = arr if t.rows > 1 else arr.reshape(-1)
        else:
            rows, cols = _slice_shape(t, plan, rank)
            if n == 1:
                data = model.raw(t)
            elif load == "local":
                data = np.array(_slice_bytes(model, t, plan, rank))
            else:
                counts = [_slice_nbytes(t, *_slice_shape(t, plan, r)) for r in range(n)]
                displs = _row_displacements(t, plan, n)
                send = None
                if comm.is_root:
                    # row slices that tile the tensor go straight from the map; column slices (and
                    # replicated KV rows) are packed into one tensor-sized buffer first
                    send = model.raw(t) if displs is not None else \
                        np.concatenate([_slice_bytes(model, t, plan, r) for r in range(n)])
                data = np.empty(counts[rank], np.uint8)
                comm.scatterv(send, counts, data, displs)
                del send
            if t.ftype == F32:
                data = data.view(np.float32) if data.ctypes.data % 4 == 0 else np.array(data).view(np.float32)
            value = Matrix(data, rows, cols, t.ftype)
            if value.repacked:
                del data
                _drop_pages(model, t)
        if t.layer < 0:
            if t.name == "norm":
                norm = value
            elif t.name == "wcls":
                wcls = value
            continue
        slot = layers.setdefault(t.layer, {"experts": {}})
        if t.expert >= 0:
            slot["experts"].setdefault(t.expert, {})[t.name] = value
        else:
            slot[t.name] = value
    out = []
    for l in range(header.n_layers):
        d = layers[l]
        experts = [(e["w1"], e["w2"], e["w3"]) for _, e in sorted(d.pop("experts").items())]
        out.append(Layer(experts=experts, **d))
    return Weights(embed, out, norm, wcls)


# ------------------------------------------------------------------------------------------------
# rope

def rope_freqs(h: ModelHeader) -> np.ndarray:
    """Inverse frequencies per pair, float32, with llama3 scaling when the header asks for it."""
    hd = h.head_size
    freqs = (1.0 / (np.float32(h.rope_theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(np.float32)
    if h.rope_scaling_factor != 1 and not h.is_qwen3:
        factor = float(h.rope_scaling_factor)
        low, high = float(h.rope_scaling_low_freq_factor), float(h.rope_scaling_high_freq_factor)
        L = float(h.rope_scaling_orig_max_seq_len)
        wavelen = 2 * math.pi / freqs.astype(np.float64)
        scaled = np.where(wavelen > L / low, freqs / factor, freqs)
        smooth = (L / wavelen - low) / (high - low)
        medium = (wavelen >= L / high) & (wavelen <= L / low)
        freqs = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled).astype(np.float32)
    return np.ascontiguousarray(freqs, dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# run state

class RunState:
    """Every activation buffer, allocated once for `max_batch` rows."""

    def __init__(self, h: ModelHeader, plan: ShardPlan, rank: int, max_seq: int, max_batch: int, is_root: bool):
        s = plan[rank]
        hd = h.head_size
        B = max_batch
        self.q_loc, self.kv_loc, self.ffn_loc = s.n_heads * hd, s.n_kv_heads * hd, s.n_ffn
        qb = lambda n: np.zeros(max(B * n // BLOCK, 1) * Q80_BYTES, np.uint8)  # q80 of [B, n]
        self.x = np.zeros((B, h.dim), np.float32)          # residual stream (same on every rank)
        self.xb = np.zeros((B, h.dim), np.float32)         # normed residual
        self.xq = qb(h.dim)
        self.q = np.zeros((B, self.q_loc), np.float32)
        self.z = np.zeros((B, self.q_loc), np.float32)     # attention output (this rank's heads)
        self.zq = qb(self.q_loc)
        self.partial = np.zeros((B, h.dim), np.float32)    # this rank's share of wo / w2 output
        self.h1 = np.zeros((B, self.ffn_loc), np.float32)
        self.h3 = np.zeros((B, self.ffn_loc), np.float32)
        self.hq = qb(self.ffn_loc)
        self.key_cache = np.zeros((h.n_layers, max_seq, self.kv_loc), np.float32)
        self.value_cache = np.zeros((h.n_layers, max_seq, self.kv_loc), np.float32)
        if h.is_moe:
            self.router = np.zeros(h.n_experts, np.float32)
            self.expert_out = np.zeros(h.dim, np.float32)
        # one row: logits are computed for the row being sampled (all rows, one at a time, on request)
        self.logits_local = np.zeros(s.n_vocab, np.float32)
        self.logits = np.zeros(h.vocab_size, np.float32) if is_root else None
        self.ctrl = np.zeros(C.CONTROL_LEN, np.int32)
        self.best = np.zeros(2, np.float64)                       # (largest logit, its id) of this rank
        self.all_best = np.zeros((plan.n_nodes, 2), np.float64)   # every rank's, on the root
        self.p_x, self.p_xb, self.p_q, self.p_z = fptr(self.x), fptr(self.xb), fptr(self.q), fptr(self.z)
        self.p_partial, self.p_h1, self.p_h3 = fptr(self.partial), fptr(self.h1), fptr(self.h3)
        self.p_xq, self.p_zq, self.p_hq = qptr(self.xq), qptr(self.zq), qptr(self.hq)
        self.p_k = [fptr(c) for c in self.key_cache]
        self.p_v = [fptr(c) for c in self.value_cache]
        self.p_logits_local = fptr(self.logits_local)
        if h.is_moe:
            self.p_router, self.p_expert_out = fptr(self.router), fptr(self.expert_out)


@dataclass
class Stats:
    forward_calls: int = 0
    tokens: int = 0
    seconds: float = 0.0
    sync_seconds: float = 0.0


class Engine:
    """One rank's part of the model. The root calls `forward`; workers run `serve()`."""

    def __init__(self, comm: Comm, header: ModelHeader, plan: ShardPlan, weights: Weights,
                 max_seq_len: int, max_batch: int = DEFAULT_BATCH, buffer_type: str = "q80",
                 sync: str = "ring"):
        self.comm, self.h, self.plan, self.w = comm, header, plan, weights
        self.max_seq_len, self.max_batch = max_seq_len, max_batch
        self.buffer_type, self.sync_scheme = buffer_type, sync
        self.st = RunState(header, plan, comm.rank, max_seq_len, max_batch, comm.is_root)
        self.sync = PartialSum(comm, plan, header.dim, max_batch, buffer_type, sync)
        self.kv_of_q = np.array(plan.kv_of_q(comm.rank), np.int32)
        self.freqs = rope_freqs(header)
        self.p_kv_of_q = ffi.cast("int32_t *", self.kv_of_q.ctypes.data)
        self.p_freqs = fptr(self.freqs)
        self.p_norm = fptr(weights.norm)
        self.rope_type = 1 if header.effective_rope_type == 1 else 0
        self.eps = header.eps
        self.quantized = header.quantized   # some matrix reads the q80 activations
        shard = plan[comm.rank]
        counts = [plan[r].n_vocab for r in range(comm.size)]
        self.vocab_counts = np.array(counts, np.int64)
        self.vocab_displs = np.concatenate([[0], np.cumsum(counts[:-1])]).astype(np.int64)
        self.vocab_local = shard.n_vocab
        self.stats = Stats()
        self.pos = 0  # next position the root will fill (informational)

    # ---- the root's entry points ----------------------------------------------------------

    def forward(self, tokens, pos: int, all_logits: bool = False, argmax: bool = False):
        """Root: evaluate tokens at positions pos.. and return the logits of the last row
        ([vocab], a buffer reused by the next call), of every row ([batch, vocab]) with
        all_logits, or only the id of the last row's largest logit with argmax (greedy decoding:
        each rank sends its best (value, id) instead of its vocabulary slice)."""
        tokens = list(tokens)
        if not tokens:
            raise ValueError("forward() needs at least one token")
        if pos + len(tokens) > self.max_seq_len:
            raise ConfigError(f"context is full: {pos + len(tokens)} positions needed, max_seq_len is {self.max_seq_len}")
        for t in tokens:   # before any worker starts: a bad id must not leave them mid-pass
            if not 0 <= t < self.h.vocab_size:
                raise ConfigError(f"token id {t} is outside the vocabulary (size {self.h.vocab_size})")
        out = np.zeros((len(tokens), self.h.vocab_size), np.float32) if all_logits else None
        flags = (C.FLAG_ALL_LOGITS if all_logits else 0) | (C.FLAG_ARGMAX if argmax else 0)
        best = None
        for i in range(0, len(tokens), self.max_batch):
            chunk = tokens[i:i + self.max_batch]
            b = len(chunk)
            ctrl = self.st.ctrl
            ctrl[:] = (C.CMD_FORWARD, pos + i, b, flags)
            self.comm.send_control(ctrl)
            for j, t in enumerate(chunk):
                self.st.x[j] = self.w.embed[t]
            best = self._forward(pos + i, b, out[i:i + b] if all_logits else None, argmax)
        self.pos = pos + len(tokens)
        if all_logits:
            return out
        return best if argmax else self.st.logits

    def stop_workers(self) -> None:
        if self.comm.is_root and self.comm.size > 1:
            ctrl = self.st.ctrl
            ctrl[:] = (C.CMD_STOP, 0, 0, 0)
            self.comm.send_control(ctrl)

    # ---- the workers' loop -----------------------------------------------------------------

    def serve(self) -> None:
        """Worker: follow the root's forward passes until it says stop."""
        ctrl = self.st.ctrl
        while True:
            self.comm.wait_control(ctrl)
            if ctrl[0] == C.CMD_STOP:
                return
            b, flags = int(ctrl[2]), int(ctrl[3])
            self._forward(int(ctrl[1]), b, [None] * b if flags & C.FLAG_ALL_LOGITS else None,
                          bool(flags & C.FLAG_ARGMAX))

    # ---- the pass itself ------------------------------------------------------------------

    def _forward(self, pos: int, b: int, all_rows=None, argmax: bool = False):
        """One pass over b rows at positions pos..; logits of the last row into st.logits, or of
        every row into all_rows[r] (root; workers pass placeholders), or (argmax) only the id of the
        last row's largest logit, returned on the root."""
        t0 = time.perf_counter()
        w0 = self.comm.wait_seconds
        st = self.st
        self.comm.bcast_f32(st.x[:b])
        for l, layer in enumerate(self.w.layers):
            self._attention(l, layer, pos, b)
            if layer.experts:
                self._moe(layer, b)
            else:
                self._ffn(layer, b)
        best = None
        if argmax:
            best = self._argmax(b - 1)
        elif all_rows is None:
            self._logits(b - 1, self.st.logits)
        else:
            for r in range(b):
                self._logits(r, all_rows[r])
        self.stats.forward_calls += 1
        self.stats.tokens += b
        self.stats.seconds += time.perf_counter() - t0
        self.stats.sync_seconds += self.comm.wait_seconds - w0
        return best

    def _norm_quant(self, p_norm, b: int) -> None:
        """xb = rmsnorm(x); xq = q80(xb) when the weights are quantized."""
        st = self.st
        lib.dl_rmsnorm(st.p_xb, st.p_x, p_norm, self.h.dim, self.eps, b)
        if self.quantized:
            lib.dl_quantize_q80(st.p_xq, st.p_xb, b * self.h.dim)

    def _attention(self, l: int, layer: Layer, pos: int, b: int) -> None:
        st, hd = self.st, self.h.head_size
        self._norm_quant(layer.p_attn_norm, b)
        k = st.p_k[l] + pos * st.kv_loc                     # k, v go straight into the cache
        v = st.p_v[l] + pos * st.kv_loc
        layer.wq.matmul(st.p_q, st.p_xq, st.p_xb, b)
        layer.wk.matmul(k, st.p_xq, st.p_xb, b)
        layer.wv.matmul(v, st.p_xq, st.p_xb, b)
        n_q, n_kv = st.q_loc // hd, st.kv_loc // hd
        if layer.p_q_norm is not None:  # Qwen3: per-head RMSNorm of q and k before rope
            lib.dl_rmsnorm(st.p_q, st.p_q, layer.p_q_norm, hd, self.eps, b * n_q)
            lib.dl_rmsnorm(k, k, layer.p_k_norm, hd, self.eps, b * n_kv)
        lib.dl_rope(st.p_q, n_q, hd, pos, b, self.rope_type, self.p_freqs)
        lib.dl_rope(k, n_kv, hd, pos, b, self.rope_type, self.p_freqs)
        lib.dl_attention(st.p_z, st.p_q, st.p_k[l], st.p_v[l], self.p_kv_of_q, n_q, n_kv, hd, pos, b)
        if self.quantized:
            lib.dl_quantize_q80(st.p_zq, st.p_z, b * st.q_loc)
        layer.wo.matmul(st.p_partial, st.p_zq, st.p_z, b)
        self.sync(st.x, st.partial, b)

    def _ffn(self, layer: Layer, b: int) -> None:
        st = self.st
        self._norm_quant(layer.p_ffn_norm, b)
        layer.w1.matmul(st.p_h1, st.p_xq, st.p_xb, b)
        layer.w3.matmul(st.p_h3, st.p_xq, st.p_xb, b)
        lib.dl_silu_mul(st.p_h1, st.p_h1, st.p_h3, b * st.ffn_loc)
        if self.quantized:
            lib.dl_quantize_q80(st.p_hq, st.p_h1, b * st.ffn_loc)
        layer.w2.matmul(st.p_partial, st.p_hq, st.p_h1, b)
        self.sync(st.x, st.partial, b)

    def _moe(self, layer: Layer, b: int) -> None:
        """Qwen3-MoE: every rank routes its own copy of y (same result everywhere) and computes its
        slice of each chosen expert; the weighted sum is this rank's partial."""
        st, h = self.st, self.h
        self._norm_quant(layer.p_ffn_norm, b)
        k, dim = h.n_active_experts, h.dim
        for r in range(b):
            xq, xf = st.p_xq + r * (dim // BLOCK), st.p_xb + r * dim
            lib.dl_matmul_f32(st.p_router, layer.p_router, xf, h.n_experts, dim, 1)
            lib.dl_softmax(st.p_router, h.n_experts)
            top = np.argsort(-st.router, kind="stable")[:k]
            weights = st.router[top] / st.router[top].sum()
            out = st.partial[r]
            out.fill(0.0)
            for e, we in zip(top, weights):   # summed in top-k order, weight applied after w2
                w1, w2, w3 = layer.experts[e]
                w1.matmul(st.p_h1, xq, xf, 1)
                w3.matmul(st.p_h3, xq, xf, 1)
                lib.dl_silu_mul(st.p_h1, st.p_h1, st.p_h3, st.ffn_loc)
                if self.quantized:
                    lib.dl_quantize_q80(st.p_hq, st.p_h1, st.ffn_loc)
                w2.matmul(st.p_expert_out, st.p_hq, st.p_h1, 1)
                out += np.float32(we) * st.expert_out
        self.sync(st.x, st.partial, b)

    def _local_logits(self, r: int) -> None:
        """This rank's vocabulary slice of the logits of batch row r, into st.logits_local."""
        st, h = self.st, self.h
        lib.dl_rmsnorm(st.p_xb, st.p_x + r * h.dim, self.p_norm, h.dim, self.eps, 1)
        if self.quantized:
            lib.dl_quantize_q80(st.p_xq, st.p_xb, h.dim)
        self.w.wcls.matmul(st.p_logits_local, st.p_xq, st.p_xb, 1)

    def _logits(self, r: int, out) -> None:
        """logits of batch row r: every rank its vocabulary rows, gathered on the root into out."""
        st = self.st
        self._local_logits(r)
        if self.comm.size == 1:
            out[:] = st.logits_local
        else:
            self.comm.gatherv_f32(st.logits_local, out if self.comm.is_root else None,
                                  self.vocab_counts, self.vocab_displs)

    def _argmax(self, r: int):
        """Greedy decoding needs one id, not the vocabulary: each rank sends its best (value, id)
        (16 bytes instead of 4·vocab/N), the root takes the largest value, lowest id on ties."""
        st = self.st
        self._local_logits(r)
        i = int(np.argmax(st.logits_local)) if st.logits_local.size else 0
        if self.comm.size == 1:
            return i
        st.best[0] = st.logits_local[i] if st.logits_local.size else -np.inf
        st.best[1] = self.plan[self.comm.rank].vocab[0] + i
        self.comm.gather_f64(st.best, st.all_best)
        if not self.comm.is_root:
            return None
        top = st.all_best[:, 0].max()
        return int(st.all_best[st.all_best[:, 0] == top, 1].min())


# ------------------------------------------------------------------------------------------------
# building an engine on every rank

BUFFER_TYPES = ("q80", "f32")


def check_options(h: ModelHeader, buffer_type: str) -> None:
    """Every weight type (f32, f16, q40, q80, mixed per matrix) runs with q80 or f32 buffers: q40 /
    q80 matrices always multiply q80-quantized activations, f32 / f16 ones the f32 activations; the
    buffer type is the format of the synchronised partial sums."""
    for t in h.matrix_types:
        if t not in FLOAT_NAMES:
            raise ConfigError(f"{float_type_name(t)} weights are not supported (supported: f32, f16, q40, q80)")
    if buffer_type not in BUFFER_TYPES:
        raise ConfigError(f"--buffer-float-type {buffer_type} is not supported (supported: q80, f32)")
    if buffer_type == "q80" and h.dim % BLOCK:
        raise ConfigError(f"--buffer-float-type q80 needs dim % 32 == 0 (dim is {h.dim})")


def build_engine(comm: Comm, model_path: str | None, *, max_seq_len: int | None = None,
                 buffer_type: str = "auto", sync: str = "ring", load: str = "scatter",
                 max_batch: int = DEFAULT_BATCH, progress=None) -> Engine:
    """Collective: the root opens the model, every rank gets the header, the plan and its slices."""
    from .formats import open_model

    model = None
    header_bytes = b""
    if comm.is_root or load == "local":
        model = open_model(model_path)
    if comm.is_root:
        with open(model_path, "rb") as f:
            header_bytes = f.read(model.header_size)
    header_bytes = comm.bcast_bytes(header_bytes) if comm.size > 1 else header_bytes
    h, header_size = read_model_header(model_path or "<root>", header_bytes, len(header_bytes))
    if buffer_type in (None, "auto"):
        buffer_type = "q80" if h.quantized else "f32"
    check_options(h, buffer_type)
    if max_seq_len is not None:
        if max_seq_len <= 0:
            raise ConfigError(f"--max-seq-len must be positive, got {max_seq_len}")
        if max_seq_len > h.max_seq_len:
            raise ConfigError(f"--max-seq-len {max_seq_len} is beyond the model's context ({h.max_seq_len})")
    seq = min(max_seq_len or h.max_seq_len, h.max_seq_len)
    plan = make_plan(h, comm.size)
    weights = load_weights(comm, h, header_size, plan, model, load, progress)
    return Engine(comm, h, plan, weights, seq, max_batch, buffer_type, sync)
