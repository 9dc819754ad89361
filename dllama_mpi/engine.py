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
import time
from dataclasses import dataclass, field

import numpy as np

from . import comm as C
from .comm import Comm
from .errors import ConfigError
from .formats import ACT_GELU, BLOCK, Q80_BYTES, ModelHeader, float_type_name
from .kernels import ffi, fptr, lib, qptr
from .kvcache import KVCache, KVPlan, plan_kv
from .sampler import SAMPLE_LEN, SAMPLE_TOPK, STATS_TOPK, nucleus
from .shard import ShardPlan
from .sync import PartialSum
from .weights import Layer, Pieces, Weights

DEFAULT_BATCH = 32  # prompt positions per forward pass (Distributed Llama uses 32 too)


def _fused(mats, outs):
    """(kernel, outs, weights, rows, cols): one call of a repacked type's _n kernel over `mats` (all
    of one type and width), or None: then each matrix is called alone."""
    if any(m is None or not m.repacked for m in mats) or len({(m.ftype, m.cols) for m in mats}) != 1:
        return None
    return (mats[0].spec.fused, ffi.new("float *[]", list(outs)), ffi.new("void *[]", [m.ptr for m in mats]),
            ffi.new("int[]", [m.rows for m in mats]), mats[0].cols)


def _matmuls(fused, mats, outs, st, b: int) -> None:
    """mats[i] times the layer input into outs[i]: one fused call (_fused), or one call each."""
    if fused is not None:
        kernel, p_outs, p_ws, p_rows, cols = fused
        # looked up per call, as in Matrix.matmul (the benchmark's profiler swaps `lib`)
        getattr(lib, kernel)(len(mats), p_outs, p_ws, p_rows, st.p_xq, cols, b)
        return
    for m, out in zip(mats, outs):
        m.matmul(out, st.p_xq, st.p_xb, b)


# ------------------------------------------------------------------------------------------------
# rope

def rope_freqs(h: ModelHeader, layer: int = 0) -> np.ndarray:
    """Inverse frequencies per pair of a layer, float32, with llama3 scaling when the header asks for
    it (gemma3: its local and global layers have their own base, the global ones a linear factor)."""
    hd = h.head_size
    theta, mult = h.rope_of_layer(layer)
    freqs = (1.0 / (np.float32(theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(np.float32)
    if mult != 1.0:
        freqs = (freqs * np.float32(mult)).astype(np.float32)
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
# the control packet

# per logit row: the id of the largest logit; every logit; or log-probability statistics (the argmax,
# log Z, the log-probability of a target id, the top STATS_TOPK) from a distributed log-softmax
LOGITS_ARGMAX, LOGITS_FULL, LOGITS_STATS, LOGITS_SAMPLE = 0, 1, 2, 3
FULL_MODES = (LOGITS_FULL, LOGITS_SAMPLE)   # the modes whose row may come back whole
STATS_LEN = 3 + 2 * STATS_TOPK


@dataclass
class TokenStats:
    """Log-probabilities of one logits row at some temperature: of the `target` id (None when there is
    none) and of the `top` ids (largest first, lower id first among equals); `argmax` = top[0] id."""

    argmax: int
    log_z: float
    target: float | None
    top: list            # [(id, logprob)] * STATS_TOPK


def row_stats(logits: np.ndarray, inv_t: float = 1.0, target: int = -1) -> TokenStats:
    """TokenStats of a whole logits row (the root, when it has gathered the row anyway)."""
    rec = np.empty(STATS_LEN, np.float64)
    lib.dl_logit_stats(ffi.cast("double *", rec.ctypes.data), fptr(np.ascontiguousarray(logits, np.float32)),
                       logits.size, inv_t, target, STATS_TOPK)
    return _merge_stats(rec.reshape(1, STATS_LEN), target >= 0)


class Control:
    """The root's instructions for one pass, in one fixed-size int32 buffer (no pickling): which rows
    (page-table slot, position, cache row for the new K/V), which rows need logits and how, and the
    page-table updates and page copies to apply first. Every field is a numpy view of `buf`, laid
    out from max_batch alone, so every rank can read it."""

    HEADER = 8          # cmd, n_rows, n_logits, n_masks, n_updates, n_copies, n_ring_copies, 1 spare
    MAX_COPIES = 16

    def __init__(self, max_batch: int):
        self.max_updates = max(64, 2 * max_batch)
        B, U, K = max_batch, self.max_updates, self.MAX_COPIES
        self.buf = np.zeros(self.HEADER + 9 * B + 3 * U + 4 * K, np.int32)
        o = self.HEADER
        self.slot, self.pos, self.kvrow = self.buf[o:o + B], self.buf[o + B:o + 2 * B], self.buf[o + 2 * B:o + 3 * B]
        o += 3 * B
        self.logit_row, self.logit_mode = self.buf[o:o + B], self.buf[o + B:o + 2 * B]
        self.logit_target = self.buf[o + 2 * B:o + 3 * B]              # LOGITS_STATS: id to score, or -1
        self.logit_inv_t = self.buf[o + 3 * B:o + 4 * B].view(np.float32)  # STATS, SAMPLE: 1 / temperature
        self.logit_topp = self.logit_target.view(np.float32)     # LOGITS_SAMPLE rows (no target): top-p
        o += 4 * B
        self.updates = self.buf[o:o + 3 * U].reshape(U, 3)
        self.copies = self.buf[o + 3 * U:o + 3 * U + 2 * K].reshape(K, 2)
        o += 3 * U + 2 * K
        self.ring_copies = self.buf[o:o + 2 * K].reshape(K, 2)   # (src slot, dst slot): a fork's ring
        self.kvring = self.buf[o + 2 * K:o + 2 * K + B]          # ring row of each row's new K/V
        self.logit_mask = self.buf[o + 2 * K + B:o + 2 * K + 2 * B]   # per logit row: its grammar mask, or -1

    @property
    def cmd(self) -> int:
        return int(self.buf[0])

    def header(self, cmd: int, n_rows: int = 0, n_logits: int = 0, n_updates: int = 0, n_copies: int = 0,
               n_ring_copies: int = 0, n_masks: int = 0) -> None:
        self.buf[:7] = (cmd, n_rows, n_logits, n_masks, n_updates, n_copies, n_ring_copies)


# ------------------------------------------------------------------------------------------------
# run state

class RunState:
    """Every activation buffer, allocated once for `max_batch` rows, and the paged KV cache."""

    def __init__(self, h: ModelHeader, plan: ShardPlan, rank: int, kv: KVPlan, max_batch: int,
                 max_logit_rows: int, is_root: bool, windows: list[int] | None = None):
        s = plan[rank]
        # the window of each layer this rank runs (all, or a pipeline stage's); 0 = full attention
        windows = [h.window_of_layer(l) for l in range(h.n_layers)] if windows is None else windows
        hd = h.head_size
        B = max_batch
        self.q_loc, self.kv_loc, self.ffn_loc = s.n_heads * hd, s.n_kv_heads * hd, s.n_ffn
        qb = lambda n: np.zeros(max(B * n // BLOCK, 1) * Q80_BYTES, np.uint8)  # q80 of [B, n]
        self.x = np.zeros((B, h.dim), np.float32)          # residual stream (same on every rank)
        self.xb = np.zeros((B, h.dim), np.float32)         # normed residual
        self.xq = qb(h.dim)
        self.q = np.zeros((B, self.q_loc), np.float32)
        self.k = np.zeros((B, self.kv_loc), np.float32)    # this pass's new K/V rows, then scattered
        self.v = np.zeros((B, self.kv_loc), np.float32)    # into their cache rows
        self.z = np.zeros((B, self.q_loc), np.float32)     # attention output (this rank's heads)
        self.zq = qb(self.q_loc)
        # this rank's share of wo / w2 output; with --as-nodes one per virtual node it computes, a pass
        # of b rows packing them as [piece][b][dim] (what the sync sends), and a scratch block for a
        # piece's columns of z / h when b > 1 (the kernels take whole rows)
        self.partials = np.zeros(max(len(s.pieces), 1) * B * h.dim, np.float32)
        self.partial = self.partials[:B * h.dim].reshape(B, h.dim)
        wide = max([b - a for ranges in (plan.piece_cols("wo", rank), plan.piece_cols("w2", rank))
                    for a, b in ranges] if s.pieces else [0])
        self.piece_x = np.zeros(B * wide, np.float32)
        self.piece_xq = qb(wide)
        self.attn_out = np.zeros((B, h.dim), np.float32)   # the summed wo / w2 output (post-norm models)
        self.h1 = np.zeros((B, self.ffn_loc), np.float32)
        self.h3 = np.zeros((B, self.ffn_loc), np.float32)
        self.hq = qb(self.ffn_loc)
        # K/V pages of the full-attention layers: zeroed address space that the OS commits page by
        # page as rows are first written, so memory follows the pages in use, not the pool size
        n_pool = sum(1 for w in windows if w == 0)
        self.key_cache = np.zeros((n_pool, kv.n_tokens, self.kv_loc), np.float32)
        self.value_cache = np.zeros((n_pool, kv.n_tokens, self.kv_loc), np.float32)
        self.tables = np.zeros((kv.n_slots, kv.table_stride), np.int32)   # the same on every rank
        # sliding-window layers: each slot's ring of kv.ring_pages pages (slot s owns ring pages
        # s * R .. s * R + R - 1), position t in ring page (t / page_size) % R
        n_ring = len(windows) - n_pool
        R, ps = kv.ring_pages, kv.page_size
        self.key_ring = np.zeros((n_ring, kv.n_slots * R * ps, self.kv_loc), np.float32)
        self.value_ring = np.zeros((n_ring, kv.n_slots * R * ps, self.kv_loc), np.float32)
        self.ring_tables = np.arange(kv.n_slots * max(R, 1), dtype=np.int32).reshape(kv.n_slots, max(R, 1))
        if h.is_moe:
            self.router = np.zeros(h.n_experts, np.float32)
            self.expert_out = np.zeros(h.dim, np.float32)
        # logits of up to max_logit_rows rows at a time (rows that sample, not every prompt row)
        L = max_logit_rows
        self.xl = np.zeros((L, h.dim), np.float32)
        self.xlq = np.zeros(max(L * h.dim // BLOCK, 1) * Q80_BYTES, np.uint8)
        self.logits_local = np.zeros((L, s.n_vocab), np.float32)
        self.logits = np.zeros((L, h.vocab_size), np.float32) if is_root else None
        self.gathered = np.zeros(L * h.vocab_size, np.float32) if is_root and plan.n_nodes > 1 else None
        self.best = np.zeros((L, 2), np.float64)                       # (largest logit, its id) per row
        self.all_best = np.zeros(plan.n_nodes * L * 2, np.float64) if is_root else None
        self.stats = np.zeros((L, STATS_LEN), np.float64)              # LOGITS_STATS summaries per row
        self.all_stats = np.zeros(plan.n_nodes * L * STATS_LEN, np.float64) if is_root else None
        self.sample_recs = np.zeros((L, SAMPLE_LEN), np.int64)         # LOGITS_SAMPLE summaries per row
        self.all_sample_recs = np.zeros(plan.n_nodes * L * SAMPLE_LEN, np.int64)   # on every rank
        # grammar masks of the pass's constrained logit rows (int32 words, bit i = token i allowed)
        self.masks = np.zeros((max_batch, (h.vocab_size + 31) // 32), np.int32)
        self.ctrl = Control(max_batch)
        self.p_x, self.p_xb, self.p_q, self.p_z = fptr(self.x), fptr(self.xb), fptr(self.q), fptr(self.z)
        self.p_k, self.p_v = fptr(self.k), fptr(self.v)
        self.p_partial, self.p_h1, self.p_h3 = fptr(self.partial), fptr(self.h1), fptr(self.h3)
        self.p_piece_x, self.p_piece_xq = fptr(self.piece_x), qptr(self.piece_xq)
        self.p_attn_out = fptr(self.attn_out)
        self.p_xq, self.p_zq, self.p_hq = qptr(self.xq), qptr(self.zq), qptr(self.hq)
        self.p_xl, self.p_xlq = fptr(self.xl), qptr(self.xlq)
        self.p_logits_local = fptr(self.logits_local)
        c = self.ctrl
        self.p_slot, self.p_pos, self.p_kvrow, self.p_kvring = (
            ffi.cast("int32_t *", a.ctypes.data) for a in (c.slot, c.pos, c.kvrow, c.kvring))
        self.kv_pages = ffi.new("dl_kv_pages *", {"tables": ffi.cast("int32_t *", self.tables.ctypes.data),
                                                  "table_stride": kv.table_stride, "page_size": kv.page_size,
                                                  "ring_pages": 0})
        self.ring_pages = ffi.new("dl_kv_pages *", {"tables": ffi.cast("int32_t *", self.ring_tables.ctypes.data),
                                                    "table_stride": max(R, 1), "page_size": ps, "ring_pages": R})
        # per layer: its K/V arrays, where this pass's rows go, and how attention finds them
        self.layer_kv = []
        i_pool = i_ring = 0
        for w in windows:
            if w == 0:
                self.layer_kv.append((fptr(self.key_cache[i_pool]), fptr(self.value_cache[i_pool]),
                                      self.p_kvrow, self.kv_pages))
                i_pool += 1
            else:
                self.layer_kv.append((fptr(self.key_ring[i_ring]), fptr(self.value_ring[i_ring]),
                                      self.p_kvring, self.ring_pages))
                i_ring += 1
        if h.is_moe:
            self.p_router, self.p_expert_out = fptr(self.router), fptr(self.expert_out)


@dataclass
class Stats:
    forward_calls: int = 0
    tokens: int = 0
    seconds: float = 0.0
    sync_seconds: float = 0.0


@dataclass
class Rows:
    """What the root asks of one pass: per row a token, the page-table slot of its sequence and its
    position; the rows whose logits are wanted (with LOGITS_ARGMAX or LOGITS_FULL each)."""

    tokens: list
    slots: list
    positions: list
    logit_rows: list = field(default_factory=list)
    logit_modes: list = field(default_factory=list)
    logit_targets: list | None = None    # LOGITS_STATS rows: the id to score (-1: none)
    logit_inv_t: list | None = None      # LOGITS_STATS rows: 1 / temperature (1.0: the model's distribution)
    logit_topp: list | None = None       # LOGITS_SAMPLE rows: top-p, in (0, 1)
    # constrained decoding (grammar.py): per logit row the index of its mask in masks, or -1; masks is
    # (wait, int32 [n_masks, words]): wait() returns once the root's mask computation has filled them
    logit_masks: list | None = None
    masks: tuple | None = None


class Engine:
    """One rank's part of the model. The root calls `step` (or `forward`); workers run `serve()`."""

    depth = 1   # passes the root may have in flight (pipeline stages: pipeline.StageEngine)

    def __init__(self, comm: Comm, header: ModelHeader, plan: ShardPlan, weights: Weights,
                 max_seq_len: int, max_batch: int = DEFAULT_BATCH, buffer_type: str = "q80",
                 sync: str = "ring", kv: KVPlan | None = None):
        self.comm, self.h, self.plan, self.w = comm, header, plan, weights
        self.world = comm   # the whole job (a pipeline stage's engine: every stage)
        self.max_seq_len, self.max_batch = max_seq_len, max_batch
        self.buffer_type, self.sync_scheme = buffer_type, sync
        self.kv_plan = kv or plan_kv(kv_row_bytes(header, plan), max_seq_len, 1)
        self.max_logit_rows = min(max_batch, max(self.kv_plan.n_slots, 8))
        # sampled rows: per-rank summaries (one all-gather) where there are ranks to summarise for;
        # a pipeline hands rows to rank 0 whole (PipelineEngine turns this off)
        self.summarises_samples = comm.size > 1
        self.sampled_rows_summarised = self.sampled_rows_whole = 0
        self.st = RunState(header, plan, comm.rank, self.kv_plan, max_batch, self.max_logit_rows, comm.is_root,
                           [header.window_of_layer(layer.index) for layer in weights.layers])
        self.kv = KVCache(self.kv_plan) if comm.is_root else None   # the root's page bookkeeping
        self.sync = PartialSum(comm, plan, header.dim, max_batch, buffer_type, sync)
        self.sync_src = self.st.partials if plan.as_nodes else self.st.partial   # what the sync adds up
        self._bind_pieces()
        self.kv_of_q = np.array(plan.kv_of_q(comm.rank), np.int32)
        # per layer: rope frequencies (one table per distinct base) and the attention window
        tables = {}
        for layer in weights.layers:
            key = header.rope_of_layer(layer.index)
            if key not in tables:
                tables[key] = rope_freqs(header, layer.index)
            layer.freqs = tables[key]
            layer.p_freqs = fptr(layer.freqs)
            layer.window = header.window_of_layer(layer.index)
        self.p_kv_of_q = ffi.cast("int32_t *", self.kv_of_q.ctypes.data)
        self.p_norm = fptr(weights.norm) if weights.norm is not None else None   # None: not the last stage
        self.rope_type = 1 if header.effective_rope_type == 1 else 0
        self.eps = header.eps
        # scores are q.k / attn_scale_div: sqrt(head_dim) (gemma3: sqrt(query_pre_attn_scalar))
        self.attn_scale_div = float(np.sqrt(np.float32(header.query_pre_attn_scalar or header.head_size)))
        self.gelu = header.hidden_act == ACT_GELU
        # gemma3 scales the embedding rows by sqrt(dim) (in float32, as transformers and llama.cpp do)
        self.embed_scale = float(np.sqrt(np.float32(header.dim))) if header.is_gemma3 else None
        self.quantized = header.quantized   # some matrix reads the q80 activations
        counts = [plan[r].n_vocab for r in range(comm.size)]
        self.vocab_counts = np.array(counts, np.int64)
        self.vocab_displs = np.concatenate([[0], np.cumsum(counts[:-1])]).astype(np.int64)
        self.vocab0 = plan[comm.rank].vocab[0]
        self.stats = Stats()
        self._direct = None   # the sequence `forward` works on
        self._pass_masks = None   # the root's Rows.masks of the pass being run
        self._out_full = None     # the root's full logit rows when a pass has several groups of logit rows
        # q, k, v (and gate, up) read the same activations: where all are repacked q40 (or q80), one C call
        # and one parallel job for the set (dl_matmul_q40r_q80_n / _q80r_), not one per matrix
        st = self.st
        for layer in weights.layers:
            layer.qkv = _fused((layer.wq, layer.wk, layer.wv), (st.p_q, st.p_k, st.p_v))
            layer.w13 = _fused((layer.w1, layer.w3), (st.p_h1, st.p_h3))

    # ---- the root's entry points ----------------------------------------------------------

    def step(self, rows: Rows, updates=(), copies=(), out_full=None) -> list:
        """Root: one forward pass over rows of any sequences (at most max_batch). `updates` (slot,
        index, page) and `copies` (src page, dst page) are applied first on every rank. Returns, per
        logit row, the argmax id (LOGITS_ARGMAX), its logits (LOGITS_FULL: a view reused by the next
        pass, or a row of out_full when given) or its TokenStats (LOGITS_STATS)."""
        b = self._begin(rows, updates, copies)
        n_full = sum(1 for m in rows.logit_modes if m in FULL_MODES)
        if out_full is None and n_full and len(rows.logit_rows) > self.max_logit_rows:
            # logits come in groups of max_logit_rows, each gathered into st.logits: full rows of
            # several groups need a buffer of their own (kept for the next such pass)
            if self._out_full is None or len(self._out_full) < n_full:
                self._out_full = np.empty((max(n_full, self.max_logit_rows), self.h.vocab_size), np.float32)
            out_full = self._out_full[:n_full]
        return self._pass(b, out_full)

    def _begin(self, rows: Rows, updates, copies) -> int:
        """Root: the control packet of a pass (tables applied here and sent to the workers) and the
        embedding rows in st.x; returns the row count."""
        b = len(rows.tokens)
        if not 0 < b <= self.max_batch:
            raise ValueError(f"a pass takes 1..{self.max_batch} rows, got {b}")
        st, c = self.st, self.st.ctrl
        toks = np.asarray(rows.tokens)
        if toks.min() < 0 or toks.max() >= self.h.vocab_size:
            self.check_tokens(rows.tokens)
        updates, copies = list(updates), list(copies)
        ring = [x for x in copies if x[0] == "ring"]   # (ring, src slot, dst slot): a fork's ring
        copies = [x for x in copies if x[0] != "ring"]
        while len(updates) > c.max_updates or len(copies) > c.MAX_COPIES or len(ring) > c.MAX_COPIES:
            self._send_tables(updates[:c.max_updates], copies[:c.MAX_COPIES], ring[:c.MAX_COPIES])
            updates, copies, ring = updates[c.max_updates:], copies[c.MAX_COPIES:], ring[c.MAX_COPIES:]
        n_logits = len(rows.logit_rows)
        n_masks = len(rows.masks[1]) if rows.masks is not None else 0
        c.header(C.CMD_FORWARD, b, n_logits, len(updates), len(copies), len(ring), n_masks)
        c.logit_mask[:n_logits] = rows.logit_masks if n_masks else -1
        self._pass_masks = rows.masks
        if ring:
            c.ring_copies[:len(ring)] = [(src, dst) for _, src, dst in ring]
        c.slot[:b], c.pos[:b] = rows.slots, rows.positions
        c.logit_row[:n_logits], c.logit_mode[:n_logits] = rows.logit_rows, rows.logit_modes
        c.logit_target[:n_logits] = rows.logit_targets if rows.logit_targets is not None else -1
        c.logit_inv_t[:n_logits] = rows.logit_inv_t if rows.logit_inv_t is not None else 1.0
        if rows.logit_topp is not None:
            sample = c.logit_mode[:n_logits] == LOGITS_SAMPLE
            c.logit_topp[:n_logits][sample] = np.asarray(rows.logit_topp, np.float32)[sample]
        if updates:
            c.updates[:len(updates)] = updates
        if copies:
            c.copies[:len(copies)] = copies
        self._apply_tables()
        ps = self.kv_plan.page_size
        if int(c.pos[:b].max()) >= self.max_seq_len:
            raise ConfigError(f"context is full: position {int(c.pos[:b].max())} needed, max_seq_len is {self.max_seq_len}")
        c.kvrow[:b] = st.tables[c.slot[:b], c.pos[:b] // ps] * ps + c.pos[:b] % ps
        R = self.kv_plan.ring_pages
        if R:
            c.kvring[:b] = (c.slot[:b] * R + (c.pos[:b] // ps) % R) * ps + c.pos[:b] % ps
        self.comm.send_control(c.buf)
        self.w.embed.lookup(np.ascontiguousarray(toks, np.int32), st.x[:b])
        if self.embed_scale is not None:
            lib.dl_scale(st.p_x, self.embed_scale, b * self.h.dim)
        return b

    def forward(self, tokens, pos: int, all_logits: bool = False, argmax: bool = False):
        """Root, one sequence (its pages in the root's KVCache): evaluate tokens at positions pos..
        (the cache keeps positions < pos from earlier calls) and return the logits of the last row
        ([vocab], reused by the next call), of every row ([n, vocab]) with all_logits, or the id of
        the last row's largest logit with argmax (each rank sends its best (value, id) instead of its
        vocabulary slice)."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("forward() needs at least one token")
        if pos + len(tokens) > self.max_seq_len:
            raise ConfigError(f"context is full: {pos + len(tokens)} positions needed, max_seq_len is {self.max_seq_len}")
        self.check_tokens(tokens)
        kv = self.kv
        if self._direct is None:
            self._direct = kv.admit([], 0)
            if self._direct is None:
                raise ConfigError("no free sequence slot in the KV cache")
        seq = self._direct
        if pos > len(seq.tokens):
            raise ValueError(f"forward at position {pos}, but the cache holds {len(seq.tokens)} rows")
        kv.truncate(seq, pos)
        if self.kv_plan.n_tokens < pos + len(tokens):
            raise ConfigError(f"the KV cache holds {self.kv_plan.n_tokens} tokens; {pos + len(tokens)} needed "
                              f"(raise --kv-memory)")
        out = np.zeros((len(tokens), self.h.vocab_size), np.float32) if all_logits else None
        mode = LOGITS_ARGMAX if argmax else LOGITS_FULL
        result = None
        for i in range(0, len(tokens), self.max_batch):
            chunk = tokens[i:i + self.max_batch]
            b = len(chunk)
            kv.ensure(seq, pos + i + b)
            want = list(range(b)) if all_logits else ([b - 1] if i + b == len(tokens) else [])
            rows = Rows(chunk, [seq.slot] * b, list(range(pos + i, pos + i + b)), want, [mode] * len(want))
            result = self.step(rows, *kv.take_commands(), out_full=out[i:i + b] if all_logits else None)
            kv.written(seq, chunk)
        if all_logits:
            return out
        return result[-1]

    def forget(self) -> None:
        """Root: end the sequence `forward` works on (its pages stay cached, its slot is free)."""
        if self._direct is not None:
            self.kv.release(self._direct)
            self._direct = None

    def check_tokens(self, tokens) -> None:
        """Before any worker starts a pass: a bad id must not leave them mid-pass."""
        v = self.h.vocab_size
        for t in tokens:
            if not 0 <= t < v:
                raise ConfigError(f"token id {t} is outside the vocabulary (size {v})")

    def stop_workers(self) -> None:
        if self.comm.is_root and self.comm.size > 1:
            self.st.ctrl.header(C.CMD_STOP)
            self.comm.send_control(self.st.ctrl.buf)

    def _send_tables(self, updates, copies, ring=()) -> None:
        c = self.st.ctrl
        c.header(C.CMD_TABLES, 0, 0, len(updates), len(copies), len(ring))
        if updates:
            c.updates[:len(updates)] = updates
        if copies:
            c.copies[:len(copies)] = copies
        if ring:
            c.ring_copies[:len(ring)] = [(src, dst) for _, src, dst in ring]
        self._apply_tables()
        self.comm.send_control(c.buf)

    # ---- per-rank counters (GET /metrics), collected between passes -------------------------

    RANK_STATS = ("compute_seconds", "wait_seconds", "forward_passes", "tokens")

    def rank_stats(self) -> np.ndarray:
        """This rank's counters, in RANK_STATS order: time in forward passes outside collectives,
        time waiting in collectives, passes, rows evaluated."""
        s = self.stats
        return np.array([s.seconds - s.sync_seconds, self.comm.wait_seconds, s.forward_calls, s.tokens],
                        np.float64)

    def gather_rank_stats(self) -> np.ndarray:
        """Root, between passes: every rank's rank_stats() as [size, len(RANK_STATS)] (one control
        packet, CMD_STATS, then a gather of a few floats; workers answer it in serve())."""
        if self.comm.size > 1:
            self.st.ctrl.header(C.CMD_STATS)
            self.comm.send_control(self.st.ctrl.buf)
        return self.world.gather_floats(self.rank_stats())

    # ---- the workers' loop -----------------------------------------------------------------

    def serve(self) -> None:
        """Worker: follow the root's passes until it says stop."""
        c = self.st.ctrl
        while True:
            self.comm.wait_control(c.buf)
            cmd = c.cmd
            if cmd == C.CMD_STOP:
                return
            if cmd == C.CMD_STATS:
                self.world.gather_floats(self.rank_stats())
                continue
            self._apply_tables()
            if cmd == C.CMD_FORWARD:
                self._pass(int(c.buf[1]), None)

    # ---- the pass itself ------------------------------------------------------------------

    def _apply_tables(self) -> None:
        """Page-table updates and page copies of the current control packet (every rank)."""
        st, c = self.st, self.st.ctrl
        n_up, n_cp = int(c.buf[4]), int(c.buf[5])
        if n_up:
            u = c.updates[:n_up]
            st.tables[u[:, 0], u[:, 1]] = u[:, 2]
        ps = self.kv_plan.page_size
        for src, dst in c.copies[:n_cp]:
            s0, d0 = int(src) * ps, int(dst) * ps
            st.key_cache[:, d0:d0 + ps] = st.key_cache[:, s0:s0 + ps]
            st.value_cache[:, d0:d0 + ps] = st.value_cache[:, s0:s0 + ps]
        n = self.kv_plan.ring_pages * ps   # rows of one slot's ring
        for src, dst in c.ring_copies[:int(c.buf[6])]:
            s0, d0 = int(src) * n, int(dst) * n
            st.key_ring[:, d0:d0 + n] = st.key_ring[:, s0:s0 + n]
            st.value_ring[:, d0:d0 + n] = st.value_ring[:, s0:s0 + n]

    def _pass(self, b: int, out_full):
        """One pass over the b rows of the control packet; then the logits it asks for."""
        t0 = time.perf_counter()
        w0 = self.comm.wait_seconds
        st = self.st
        self.comm.bcast_f32(st.x[:b])
        self._layers(b)
        result = self._logits(out_full)
        self.stats.forward_calls += 1
        self.stats.tokens += b
        self.stats.seconds += time.perf_counter() - t0
        self.stats.sync_seconds += self.comm.wait_seconds - w0
        return result

    def _layers(self, b: int) -> None:
        """Every layer this rank holds (all of them, or a pipeline stage's range) over st.x[:b]."""
        for l, layer in enumerate(self.w.layers):
            self._attention(l, layer, b)
            if layer.experts:
                self._moe(layer, b)
            else:
                self._ffn(layer, b)

    def _norm_quant(self, p_norm, b: int) -> None:
        """xb = rmsnorm(x); xq = q80(xb) when the weights are quantized."""
        st = self.st
        if self.quantized:
            lib.dl_rmsnorm_q80(st.p_xq, st.p_xb, st.p_x, p_norm, self.h.dim, self.eps, b)
        else:
            lib.dl_rmsnorm(st.p_xb, st.p_x, p_norm, self.h.dim, self.eps, b)

    def _attention(self, l: int, layer: Layer, b: int) -> None:
        st, hd = self.st, self.h.head_size
        self._norm_quant(layer.p_attn_norm, b)
        _matmuls(layer.qkv, (layer.wq, layer.wk, layer.wv), (st.p_q, st.p_k, st.p_v), st, b)
        if layer.q_bias is not None:    # Qwen2: this rank's slices of the biases, over every row
            np.add(st.q[:b], layer.q_bias, out=st.q[:b])
            np.add(st.k[:b], layer.k_bias, out=st.k[:b])
            np.add(st.v[:b], layer.v_bias, out=st.v[:b])
        n_q, n_kv = st.q_loc // hd, st.kv_loc // hd
        if layer.p_q_norm is not None:  # Qwen3, Gemma 3: per-head RMSNorm of q and k before rope
            lib.dl_rmsnorm(st.p_q, st.p_q, layer.p_q_norm, hd, self.eps, b * n_q)
            lib.dl_rmsnorm(st.p_k, st.p_k, layer.p_k_norm, hd, self.eps, b * n_kv)
        lib.dl_rope_qk(st.p_q, n_q, st.p_k, n_kv, hd, st.p_pos, b, self.rope_type, layer.p_freqs)
        p_key, p_value, p_rows, pages = st.layer_kv[l]   # the page pool, or a sliding window's ring
        lib.dl_scatter_kv(p_key, p_value, st.p_k, st.p_v, p_rows, b, st.kv_loc)
        lib.dl_attention(st.p_z, st.p_q, p_key, p_value, self.p_kv_of_q, n_q, n_kv, hd,
                         st.p_pos, st.p_slot, b, pages, layer.window, self.attn_scale_div)
        if self.quantized:
            lib.dl_quantize_q80(st.p_zq, st.p_z, b * st.q_loc)
        if isinstance(layer.wo, Pieces):
            self._piece_matmuls(layer.wo, st.z, st.zq, b)
        else:
            layer.wo.matmul(st.p_partial, st.p_zq, st.p_z, b)
        self._residual(layer.p_attn_post_norm, b)

    def _ffn(self, layer: Layer, b: int) -> None:
        st = self.st
        self._norm_quant(layer.p_ffn_norm, b)
        _matmuls(layer.w13, (layer.w1, layer.w3), (st.p_h1, st.p_h3), st, b)
        if self.gelu and self.quantized:   # GeGLU (Gemma 3; tanh-approximated GELU)
            lib.dl_gelu_mul_q80(st.p_hq, st.p_h1, st.p_h1, st.p_h3, b * st.ffn_loc)
        elif self.gelu:
            lib.dl_gelu_mul(st.p_h1, st.p_h1, st.p_h3, b * st.ffn_loc)
        elif self.quantized:
            lib.dl_silu_mul_q80(st.p_hq, st.p_h1, st.p_h1, st.p_h3, st.ffn_loc, b)
        else:
            lib.dl_silu_mul(st.p_h1, st.p_h1, st.p_h3, st.ffn_loc, b)
        if isinstance(layer.w2, Pieces):
            self._piece_matmuls(layer.w2, st.h1, st.hq, b)
        else:
            layer.w2.matmul(st.p_partial, st.p_hq, st.p_h1, b)
        self._residual(layer.p_ffn_post_norm, b)

    def _piece_matmuls(self, m: Pieces, xf: np.ndarray, xq: np.ndarray, b: int) -> None:
        """--as-nodes: wo / w2 times this rank's z / h (f32 [B, width] and its q80), each virtual
        node's columns into its own partial (piece i's b rows at st.partials[i * b * dim])."""
        st, dim = self.st, self.h.dim
        if b == 1:   # decoding: the calls were bound once (bind_pieces)
            for kernel, out, w, x, rows, cols in m.calls:
                getattr(lib, kernel)(out, w, x, rows, cols, 1)
            for i in m.empty:
                st.partials[i * dim:(i + 1) * dim] = 0.0
            return
        width = xf.shape[1]
        p_out = fptr(st.partials)
        for i, (part, (c0, c1)) in enumerate(zip(m.parts, m.cols)):
            if c1 == c0:    # a virtual node without heads / FFN columns adds its zero partial
                st.partials[i * b * dim:(i + 1) * b * dim] = 0.0
            elif part.spec.q80_input:
                rb, lo, hi = width // BLOCK * Q80_BYTES, c0 // BLOCK * Q80_BYTES, c1 // BLOCK * Q80_BYTES
                st.piece_xq[:b * (hi - lo)].reshape(b, hi - lo)[...] = xq[:b * rb].reshape(b, rb)[:, lo:hi]
                part.matmul(p_out + i * b * dim, st.p_piece_xq, None, b)
            else:
                st.piece_x[:b * (c1 - c0)].reshape(b, c1 - c0)[...] = xf[:b, c0:c1]
                part.matmul(p_out + i * b * dim, None, st.p_piece_x, b)

    def _bind_pieces(self) -> None:
        """The decode-row calls of every Pieces matrix (inputs at fixed offsets of z / h), bound once."""
        st, dim = self.st, self.h.dim
        for layer in self.w.layers:
            for m, xf, xq in ((layer.wo, st.z, st.zq), (layer.w2, st.h1, st.hq)):
                if not isinstance(m, Pieces):
                    continue
                m.calls, m.empty = [], []
                for i, (part, (c0, c1)) in enumerate(zip(m.parts, m.cols)):
                    if c1 == c0:
                        m.empty.append(i)
                        continue
                    x = qptr(xq) + c0 // BLOCK if part.spec.q80_input else fptr(xf) + c0
                    m.calls.append((part.spec.kernel, fptr(st.partials) + i * dim, part.ptr, x, part.rows, part.cols))

    def _residual(self, p_post_norm, b: int) -> None:
        """x += the sum over ranks of partial; with a post-norm (Gemma 3's sandwich norms) the sum is
        normed first, which needs the whole sum: it is reduced into a zeroed buffer, normed, added."""
        st = self.st
        if p_post_norm is None:
            self.sync(st.x, self.sync_src, b)
            return
        st.attn_out[:b].fill(0.0)
        self.sync(st.attn_out, self.sync_src, b)
        lib.dl_rmsnorm(st.p_attn_out, st.p_attn_out, p_post_norm, self.h.dim, self.eps, b)
        lib.dl_add(st.p_x, st.p_attn_out, b * self.h.dim)

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
                lib.dl_silu_mul(st.p_h1, st.p_h1, st.p_h3, st.ffn_loc, 1)
                if self.quantized:
                    lib.dl_quantize_q80(st.p_hq, st.p_h1, st.ffn_loc)
                w2.matmul(st.p_expert_out, st.p_hq, st.p_h1, 1)
                out += np.float32(we) * st.expert_out
        self.sync(st.x, st.partial, b)

    def _logits(self, out_full) -> list:
        """The logit rows of the control packet, max_logit_rows at a time: each rank its vocabulary
        slice of every row in one matmul; argmax rows reduce (value, id) pairs across ranks, stats and
        sampled rows combine per-rank summaries, full rows (and sampled rows the summaries do not
        decide) are gathered on the root."""
        c = self.st.ctrl
        n = int(c.buf[2])
        rows, modes = c.logit_row[:n], c.logit_mode[:n]
        result = [None] * n if self.comm.is_root else None
        masks = self._masks(int(c.buf[3])) if c.buf[3] else None
        done_full = 0
        for g in range(0, n, self.max_logit_rows):
            grp = slice(g, min(n, g + self.max_logit_rows))
            self._local_logits(rows[grp])
            if masks is not None:
                self._apply_masks(c.logit_mask[grp], masks)
            gm = modes[grp]
            am = np.flatnonzero(gm == LOGITS_ARGMAX)
            sm = np.flatnonzero(gm == LOGITS_STATS)
            whole = gm == LOGITS_FULL      # the rows gathered on the root ...
            sample = gm == LOGITS_SAMPLE
            if not self.summarises_samples:   # ... sampled rows too, where there are no summaries
                whole |= sample
                self.sampled_rows_whole += int(np.count_nonzero(sample))
            if am.size:
                ids = self._argmax(am)
                if result is not None:
                    for j, i in zip(am, ids):
                        result[g + j] = i
            if sm.size:
                stats = self._stats(sm, c.logit_target[grp][sm], c.logit_inv_t[grp][sm])
                if result is not None:
                    for j, x in zip(sm, stats):
                        result[g + j] = x
            pm = np.flatnonzero(sample) if self.summarises_samples else ()
            if len(pm):
                nucs = self._nuclei(pm, c.logit_inv_t[grp][pm], c.logit_topp[grp][pm])
                for j, x in zip(pm, nucs):
                    if x is None:   # ... and those the summaries do not decide
                        whole[j] = True
                    elif result is not None:
                        result[g + j] = x
            fm = np.flatnonzero(whole)
            if fm.size:
                full = self._gather(fm, None if out_full is None else out_full[done_full:done_full + fm.size])
                if result is not None:
                    for k, j in enumerate(fm):
                        result[g + j] = full[k]
                done_full += fm.size
        return result

    def _masks(self, n: int) -> np.ndarray:
        """The pass's n grammar masks on every rank of the group: the root waits for its mask
        computation (it ran beside the layers), then one broadcast (a mask is vocab/8 bytes)."""
        buf = self._root_masks(n) if self.comm.is_root else self.st.masks[:n]
        if self.comm.size > 1:
            self.comm.bcast_masks(buf)
        return buf

    def _root_masks(self, n: int) -> np.ndarray:
        wait, masks = self._pass_masks
        wait()
        return masks[:n]

    def _apply_masks(self, which, masks: np.ndarray) -> None:
        """Masked-out tokens of the constrained rows of logits_local become -inf (this rank's slice)."""
        st = self.st
        nv = st.logits_local.shape[1]
        for k, m in enumerate(which):
            if m >= 0 and nv:
                lib.dl_apply_token_mask(st.p_logits_local + k * nv, nv,
                                        ffi.cast("uint32_t *", masks[int(m)].ctypes.data), self.vocab0)

    def _local_logits(self, rows) -> None:
        """This rank's vocabulary slice of the logits of the given rows, into logits_local[:n]."""
        st, h, n = self.st, self.h, len(rows)
        np.take(st.x, rows, axis=0, out=st.xl[:n])
        lib.dl_rmsnorm(st.p_xl, st.p_xl, self.p_norm, h.dim, self.eps, n)
        if self.quantized:
            lib.dl_quantize_q80(st.p_xlq, st.p_xl, n * h.dim)
        self.w.wcls.matmul(st.p_logits_local, st.p_xlq, st.p_xl, n)

    def _argmax(self, which) -> list | None:
        """Greedy decoding needs one id per row, not the vocabulary: each rank sends its best
        (value, id) per row (16 bytes instead of 4·vocab/N), the root takes the largest value,
        lowest id on ties."""
        st = self.st
        n = len(which)
        best = st.best[:n]
        rows = np.ascontiguousarray(which, np.int32)
        nv = st.logits_local.shape[1]
        # per row (largest value, vocab0 + its first index) of this rank's slice, in C over the pool
        lib.dl_argmax_rows(ffi.cast("double *", best.ctypes.data), st.p_logits_local, nv,
                           ffi.cast("int32_t *", rows.ctypes.data), n, nv, self.vocab0)
        if self.comm.size == 1:
            return [int(x) for x in best[:, 1]]
        allb = st.all_best[:self.comm.size * n * 2] if self.comm.is_root else None
        self.comm.gather_f64(best.reshape(-1), allb)
        if not self.comm.is_root:
            return None
        allb = allb.reshape(self.comm.size, n, 2)
        top = allb[:, :, 0].max(axis=0)
        ids = np.where(allb[:, :, 0] == top, allb[:, :, 1], np.inf).min(axis=0)
        return [int(x) for x in ids]

    def _stats(self, which, targets, inv_t) -> list | None:
        """A distributed log-softmax: each rank summarises its vocabulary slice of each row (max,
        log-sum-exp, the target's logit, its top STATS_TOPK) in STATS_LEN numbers, the root combines
        them; nobody sends a vocabulary slice."""
        st, n = self.st, len(which)
        rec = st.stats[:n]
        p = ffi.cast("double *", rec.ctypes.data)
        v0, nv = self.vocab0, st.logits_local.shape[1]
        for k, (row, t, it) in enumerate(zip(which, targets, inv_t)):
            local_t = int(t) - v0 if t >= 0 else -1
            lib.dl_logit_stats(p + k * STATS_LEN, st.p_logits_local + int(row) * nv, nv, float(it), local_t,
                               STATS_TOPK)
        ids = rec[:, 4::2]
        ids[ids >= 0] += v0
        if self.comm.size == 1:
            return [_merge_stats(rec[k:k + 1], targets[k] >= 0) for k in range(n)]
        allr = st.all_stats[:self.comm.size * n * STATS_LEN] if self.comm.is_root else None
        self.comm.gather_f64(rec.reshape(-1), allr)
        if not self.comm.is_root:
            return None
        allr = allr.reshape(self.comm.size, n, STATS_LEN)
        return [_merge_stats(allr[:, k], targets[k] >= 0) for k in range(n)]

    def _nuclei(self, which, inv_t, topp) -> list:
        """Sampled rows without sending them: each rank summarises its vocabulary slice of each row
        (sampler.SAMPLE_LEN int64: exact weight buckets and its largest logits), one all-gather, and
        every rank merges them the same way (sampler.nucleus): per row its Nucleus, or None where the
        summaries do not decide it (every rank then takes part in gathering that row whole)."""
        st, n = self.st, len(which)
        rec = st.sample_recs[:n]
        rows = np.ascontiguousarray(which, np.int32)
        its = np.ascontiguousarray(inv_t, np.float32)
        nv = st.logits_local.shape[1]
        lib.dl_sample_summaries(ffi.cast("int64_t *", rec.ctypes.data), SAMPLE_LEN, st.p_logits_local, nv,
                                ffi.cast("int32_t *", rows.ctypes.data), fptr(its), n, nv, self.vocab0, SAMPLE_TOPK)
        allr = st.all_sample_recs[:self.comm.size * n * SAMPLE_LEN]
        self.comm.allgather(rec.reshape(-1), allr)
        allr = allr.reshape(self.comm.size, n, SAMPLE_LEN)
        out = [nucleus(allr[:, k], float(topp[k]), self.h.vocab_size, float(inv_t[k])) for k in range(n)]
        undecided = sum(x is None for x in out)
        self.sampled_rows_summarised += n - undecided
        self.sampled_rows_whole += undecided
        return out

    def _gather(self, which, out):
        """Full logits of the given rows on the root ([n, vocab]: a view of st.logits, or out)."""
        st = self.st
        n = len(which)
        dst = out if out is not None else (st.logits[:n] if self.comm.is_root else None)
        if self.comm.size == 1:
            np.take(st.logits_local, which, axis=0, out=dst)
            return dst
        send = np.ascontiguousarray(st.logits_local[which])
        recv = st.gathered[:n * self.h.vocab_size] if self.comm.is_root else None
        self.comm.gatherv_f32(send.reshape(-1), recv, self.vocab_counts * n, self.vocab_displs * n)
        if not self.comm.is_root:
            return None
        for r in range(self.comm.size):   # rank-major [rank][row][its slice] -> [row][vocab]
            d, k = int(self.vocab_displs[r]), int(self.vocab_counts[r])
            dst[:, d:d + k] = recv[n * d:n * (d + k)].reshape(n, k)
        return dst


def _merge_stats(recs: np.ndarray, has_target: bool) -> TokenStats:
    """TokenStats from the per-rank summaries of one row ([ranks, STATS_LEN])."""
    log_z = float(np.logaddexp.reduce(recs[:, 1]))
    pairs = recs[:, 3:].reshape(-1, 2)
    pairs = pairs[pairs[:, 1] >= 0]
    order = np.lexsort((pairs[:, 1], -pairs[:, 0]))[:STATS_TOPK]
    top = [(int(pairs[i, 1]), float(pairs[i, 0]) - log_z) for i in order]
    target = float(recs[:, 2].max()) - log_z if has_target else None
    return TokenStats(top[0][0] if top else 0, log_z, target, top)


def kv_row_bytes(h: ModelHeader, plan: ShardPlan, layers=None) -> int:
    """Bytes of K + V for one cache row on the rank that stores the most KV heads (f32), of the
    full-attention layers (of `layers`, default all); ring_row_bytes: the sliding-window ones."""
    layers = range(h.n_layers) if layers is None else layers
    n = sum(1 for l in layers if h.window_of_layer(l) == 0)
    return 2 * 4 * n * h.head_size * max(plan[r].n_kv_heads for r in range(plan.n_nodes))


def ring_row_bytes(h: ModelHeader, plan: ShardPlan, layers=None) -> int:
    layers = range(h.n_layers) if layers is None else layers
    n = sum(1 for l in layers if h.window_of_layer(l) > 0)
    return 2 * 4 * n * h.head_size * max(plan[r].n_kv_heads for r in range(plan.n_nodes))


def kv_ring(h: ModelHeader, max_batch: int, ring_bytes: int):
    """plan_kv's `ring` argument: (window, max_batch, ring row bytes), or None without such layers."""
    return (h.sliding_window, max_batch, ring_bytes) if ring_bytes and h.sliding_window else None


# ------------------------------------------------------------------------------------------------
# building an engine on every rank

BUFFER_TYPES = ("q80", "f32")


def check_options(h: ModelHeader, buffer_type: str) -> None:
    """Every weight type with a kernel (kernels.MATMUL; mixed per matrix too) runs with q80 or f32
    buffers: the block types always multiply q80-quantized activations, f32 / f16 / bf16 the f32
    activations; the buffer type is the format of the synchronised partial sums."""
    from .kernels import MATMUL

    for t in h.matrix_types:
        if t not in MATMUL:
            raise ConfigError(f"{float_type_name(t)} weights have no kernel (runtime_header converts them)")
    if buffer_type not in BUFFER_TYPES:
        raise ConfigError(f"--buffer-float-type {buffer_type} is not supported (supported: q80, f32)")
    if buffer_type == "q80" and h.dim % BLOCK:
        raise ConfigError(f"--buffer-float-type q80 needs dim % 32 == 0 (dim is {h.dim})")
