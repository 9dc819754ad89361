"""Pipeline stages x tensor parallelism, and splits weighted by each rank's speed (`--pp`, `--split`).

The layout, computed once and the same on every rank (a pure function of the header, the rank count,
`--pp` and the per-rank weights and free memory, which every rank has):

- the N ranks form S stages of contiguous ranks, as even as possible (`--pp S`; 4 ranks, --pp 2 =
  2 stages x 2-way tensor parallelism); a stage's first rank is its root;
- stage s holds a contiguous range of layers; layers go to stages in proportion to stage speed (the
  sum of its ranks' weights), the last stage's wcls counted as work (its bytes in layers), at least
  one each, never more than the stage's memory holds;
- inside a stage a tensor-parallel shard.ShardPlan over its ranks, whose heads / FFN blocks /
  vocabulary rows are shared in proportion to the ranks' weights, again capped by memory;
- weights: `--split even` (all 1), explicit `w0,w1,...` (one per rank: reproducible runs), or `auto`:
  every rank times a matmul of its own slice shape (the C kernels, q40 or f32 as the model, buffers
  larger than the caches, the best of 5 windows of 50 ms, all ranks at once since ranks on one
  host share its memory bus)
  and reads MemAvailable (shared by the ranks on its host).

Rank 0 is stage 0's root (embedding, tokenizer, sampling, the scheduler); the last stage holds the
final norm and wcls. Per pass (message flow, `StageEngine`):

    root:        control packet -> stage 0 (Ibcast), embed rows, stage 0's layers (collectives in
                 stage 0), then [control | residual rows] -> stage 1's root (Isend), and returns: the
                 scheduler may launch the next pass on other sequences at once
    stage s root: [control | rows] from stage s-1's root -> Ibcast of the control in stage s,
                 page-table updates / copies (every stage applies the same ones to its own pool,
                 which holds only its layers), its layers, then on to stage s+1's root
    last stage:  logits of the logit rows (distributed argmax or gathered rows inside the stage),
                 [ids | full rows] -> rank 0 (Isend), which collects the oldest pass when it needs it

A pass with grammar-constrained rows (grammar.py) also sends their masks from rank 0 straight to the
last stage's root (TAG_MASK, once stage 0's layers are done: the masks are computed beside them),
which broadcasts them in its stage before the logits.

Residual rows travel as f32, or q80 with `--buffer-float-type q80`. Every wait for a message between
stages polls (Test + sleep, MPI.md §4): a stage root waiting for its next input is idle; the root
waiting for results is under the --sync-timeout watchdog. With one stage (`--pp 1`) none of this
exists: startup.build_engine makes the plain Engine (with a weighted plan if --split says so).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from . import comm as C
from .comm import Comm
from .engine import FULL_MODES, LOGITS_ARGMAX, LOGITS_SAMPLE, LOGITS_STATS, STATS_TOPK, Engine, Rows, TokenStats
from .errors import ConfigError
from .formats import BLOCK, F32, Q40, Q80_BYTES, ModelHeader, tensor_layout
from .kernels import ffi, lib
from .kvcache import meminfo, plan_kv
from .shard import ShardPlan, even_split, fit_types, make_plan, weighted_split
from .weights import Matrix, Route, load_weights

TAG_FORWARD, TAG_RESULT = 21, 22     # [control | rows] between stage roots; [ids | stats | logits] to rank 0
TAG_MASK = 23                        # a pass's grammar masks, rank 0 -> the last stage's root
STATS_REC = 4 + 2 * STATS_TOPK       # a TokenStats in float64: argmax, log Z, target, n top, (id, logprob)s
MEMORY_USE = 0.9                     # share of a rank's free memory `auto` may fill with weights


# ------------------------------------------------------------------------------------------------
# the layout

@dataclass(frozen=True)
class Stage:
    index: int
    ranks: tuple[int, ...]       # world ranks; ranks[0] is the stage root
    layers: tuple[int, int]      # [l0, l1)
    plan: ShardPlan              # tensor parallelism over the stage's ranks
    weights: tuple[float, ...]   # per rank of the stage (its share of the rows)

    @property
    def root(self) -> int:
        return self.ranks[0]

    @property
    def n_layers(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class Layout:
    n_ranks: int
    stages: tuple[Stage, ...]
    speeds: tuple[float, ...] | None = None   # measured (auto), GB/s of weights per rank
    memory: tuple[float, ...] | None = None   # bytes free per rank (auto)

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    def stage_of_rank(self, rank: int) -> Stage:
        return next(s for s in self.stages if rank in s.ranks)

    def stage_of_layer(self, layer: int) -> Stage:
        return next(s for s in self.stages if s.layers[0] <= layer < s.layers[1])

    def share(self, rank: int) -> float:
        s = self.stage_of_rank(rank)
        w = s.weights[s.ranks.index(rank)]
        return w / sum(s.weights)


def parse_split(text: str | None, n_ranks: int):
    """'even' | 'auto' | a list of n_ranks weights >= 0 ('3,1')."""
    t = (text or "even").strip().lower()
    if t in ("even", "auto"):
        return t
    try:
        ws = [float(x) for x in t.split(",")]
    except ValueError:
        raise ConfigError(f"--split takes even, auto or one weight per rank (e.g. 3,1), got {text!r}") from None
    if len(ws) != n_ranks:
        raise ConfigError(f"--split {text}: {len(ws)} weights for {n_ranks} ranks (one per rank)")
    if min(ws) < 0 or not np.isfinite(ws).all() or sum(ws) <= 0:
        raise ConfigError(f"--split {text}: weights must be >= 0 with a positive sum")
    return ws


def _fill(total: float, weights, caps) -> list[float]:
    """Shares of `total` proportional to weights, none above its cap (water-filling), or
    ConfigError-worthy None when the caps cannot hold the total."""
    alloc = [0.0] * len(weights)
    free = [i for i, w in enumerate(weights) if w > 0]
    left = float(total)
    while free and left > 1e-9:
        wsum = sum(weights[i] for i in free)
        over = [i for i in free if left * weights[i] / wsum > caps[i]]
        if not over:
            for i in free:
                alloc[i] = left * weights[i] / wsum
            return alloc
        for i in over:
            alloc[i] = caps[i]
            left -= caps[i]
            free.remove(i)
    return alloc if left <= 1e-9 else None


def layer_bytes(h: ModelHeader) -> tuple[int, int, int]:
    """(bytes of one layer's tensors, of the embedding, of norm + wcls) in the model file."""
    per_layer = {}
    embed = head = 0
    for t in tensor_layout(h, 0):
        if t.name == "embed":
            embed += t.nbytes
        elif t.layer < 0:
            head += t.nbytes
        else:
            per_layer[t.layer] = per_layer.get(t.layer, 0) + t.nbytes
    return max(per_layer.values()), embed, head


def make_layout(h: ModelHeader, n_ranks: int, pp: int, weights=None, memory=None, speeds=None,
                as_nodes: int = 0) -> Layout:
    """The stages for n_ranks ranks and `pp` stages, layers and rows in proportion to `weights` (one
    per rank; None = even), never above `memory` (bytes free per rank; None = no cap); as_nodes:
    every stage's ranks compute that many virtual nodes (shard.make_plan)."""
    if pp < 1:
        raise ConfigError(f"--pp must be >= 1, got {pp}")
    if pp > n_ranks:
        raise ConfigError(f"--pp {pp} needs at least {pp} ranks (one per stage), the job has {n_ranks}")
    if pp > h.n_layers:
        raise ConfigError(f"--pp {pp}: the model has {h.n_layers} layers, fewer than the stages")
    weights = [1.0] * n_ranks if weights is None else [float(w) for w in weights]
    groups = [tuple(range(a, b)) for a, b in even_split(n_ranks, pp)]
    stage_w = [sum(weights[r] for r in g) for g in groups]
    for g, w in zip(groups, stage_w):
        if w <= 0:
            raise ConfigError(f"--split: every weight of the stage of ranks {g[0]}-{g[-1]} is 0")
    L, embed_bytes, head_bytes = layer_bytes(h)
    # work in layer-sized units: the last stage's wcls is read every decode token like a layer's
    # weights (1B shape: 4.3 layers' worth), so that stage gets fewer layers; the embedding costs
    # nothing (one row per token)
    total = h.n_layers + head_bytes / L
    want = [total * w / sum(stage_w) for w in stage_w]
    want[-1] = max(want[-1] - head_bytes / L, 1e-3)
    if memory is not None:
        # the root holds the embedding, the last stage norm + wcls (shared by its ranks)
        room = [MEMORY_USE * m for m in memory]
        room[0] -= embed_bytes
        caps = []
        for i, g in enumerate(groups):
            free = sum(max(room[r], 0.0) for r in g) - (head_bytes if i == pp - 1 else 0)
            caps.append(max(int(free // L), 0))
        counts = _fill(h.n_layers, want, caps)
        if counts is None:
            need = (h.n_layers * L + embed_bytes + head_bytes) / 2**30
            have = sum(max(m, 0.0) for m in memory) / 2**30
            raise ConfigError(f"the model does not fit: its weights need {need:.1f} GiB, the ranks have "
                              f"{have:.1f} GiB free (MemAvailable)")
    else:
        counts = want
    sizes = [b - a for a, b in weighted_split(h.n_layers, counts)]
    for i in range(pp):          # every stage gets a layer, taken from the stage with the most
        if sizes[i] == 0:
            j = max(range(pp), key=lambda k: sizes[k])
            sizes[j] -= 1
            sizes[i] += 1
    stages, l0 = [], 0
    for i, g in enumerate(groups):
        ws = [weights[r] for r in g]
        if memory is not None:
            stage_bytes = sizes[i] * L + (head_bytes if i == pp - 1 else 0)
            room = [MEMORY_USE * memory[r] - (embed_bytes if r == 0 else 0) for r in g]
            shares = _fill(1.0, ws, [max(x, 0.0) / stage_bytes for x in room])
            if shares is None:
                raise ConfigError(f"the layers of stage {i} ({stage_bytes / 2**30:.1f} GiB) do not fit "
                                  f"the free memory of its ranks {g[0]}-{g[-1]}")
            ws = shares
        plan = make_plan(h, len(g), None if len(set(ws)) == 1 else ws, as_nodes)
        stages.append(Stage(i, g, (l0, l0 + sizes[i]), plan, tuple(ws)))
        l0 += sizes[i]
    return Layout(n_ranks, tuple(stages), None if speeds is None else tuple(speeds),
                  None if memory is None else tuple(memory))


def kv_row_bytes(h: ModelHeader, layout: Layout) -> int:
    """Bytes of K + V per page-pool row on the rank that stores the most (its stage's full-attention
    layers, its KV heads)."""
    from .engine import kv_row_bytes as stage_bytes

    return max(stage_bytes(h, s.plan, range(*s.layers)) for s in layout.stages)


def ring_row_bytes(h: ModelHeader, layout: Layout) -> int:
    """The same for the sliding-window layers' rings."""
    from .engine import ring_row_bytes as stage_bytes

    return max(stage_bytes(h, s.plan, range(*s.layers)) for s in layout.stages)


def kv_bytes_per_token(h: ModelHeader, layout: Layout) -> list[int]:
    """KV bytes one more position costs on each rank (metrics: the page pool's layers)."""
    out = []
    for r in range(layout.n_ranks):
        s = layout.stage_of_rank(r)
        n = sum(1 for l in range(*s.layers) if h.window_of_layer(l) == 0)
        out.append(2 * 4 * n * s.plan[s.ranks.index(r)].n_kv_heads * h.head_size)
    return out


def describe(h: ModelHeader, layout: Layout, hosts: list[str]) -> list[str]:
    """The start-up lines: one per rank (host, measured speed, layers, share of rows, memory)."""
    L, embed_bytes, head_bytes = layer_bytes(h)
    lines = [f"pipeline: {layout.n_stages} stage(s) x " + "/".join(str(len(s.ranks)) for s in layout.stages)
             + " rank(s), layers " + ", ".join(f"{s.layers[0]}-{s.layers[1] - 1}" for s in layout.stages)]
    for r in range(layout.n_ranks):
        s = layout.stage_of_rank(r)
        k = s.ranks.index(r)
        share = s.weights[k] / sum(s.weights)
        sh = s.plan[k]
        weight_bytes = share * (s.n_layers * L + (head_bytes if s.index == layout.n_stages - 1 else 0)) \
            + (embed_bytes if r == 0 else 0)
        speed = f"{layout.speeds[r]:.2f} GB/s" if layout.speeds else "speed not measured"
        mem = f", {layout.memory[r] / 2**30:.1f} GiB free" if layout.memory else ""
        lines.append(f"rank {r} on {hosts[r]}: stage {s.index}, layers {s.layers[0]}-{s.layers[1] - 1}, {speed}, "
                     f"{100 * share:.0f}% of the rows (heads {sh.heads[0]}-{sh.heads[1]}, ffn {sh.ffn[0]}-{sh.ffn[1]}), "
                     f"weights {weight_bytes / 2**20:.0f} MiB{mem}")
    return lines


# ------------------------------------------------------------------------------------------------
# measuring a rank (--split auto)

def mem_available() -> float:
    """MemAvailable of this host in bytes (0 when unknown)."""
    return float(meminfo("MemAvailable", 0))


def measure_speed(h: ModelHeader, n_ranks: int, windows: int = 5, window_seconds: float = 0.05,
                  buffer_bytes: int = 48 << 20, ready=None) -> float:
    """GB/s of weights this rank multiplies: w1-shaped slices of an n_ranks-way split (rows ffn/N,
    cols dim; q40 repacked or f32 as the model), enough distinct ones to exceed the caches, cycled
    through single-row matmuls (decoding). The best of `windows` windows of `window_seconds` (as the
    benchmark's bandwidth is a best of 3): a CPU quota (10 ms periods) averages out inside a window,
    while a burst of someone else's load on a shared host slows some windows, not the best one.
    `ready()` (a barrier) runs between the set-up and the windows: the ranks of a host measure
    together, and none measures while a slower one still builds its buffers (copying 48 MB halved
    a fast rank's figure when a throttled rank was still at it)."""

    q40 = h.weights_float_type == Q40
    cols = max(h.dim // BLOCK * BLOCK, BLOCK)
    rows = max(16, (h.ffn_dim // n_ranks) // 16 * 16)
    one = rows * cols * 18 // BLOCK if q40 else rows * cols * 4
    count = max(1, min(64, buffer_bytes // one))
    rng = np.random.default_rng(1)
    if q40:
        blocks = np.empty(rows * cols // BLOCK, [("d", "<u2"), ("qs", "u1", 16)])
        blocks["d"] = 0x2E66                           # f16 0.1: a normal scale
        blocks["qs"] = np.frombuffer(rng.bytes(blocks.size * 16), np.uint8).reshape(-1, 16)
        one_raw = blocks.view(np.uint8).reshape(-1)
    else:
        one_raw = rng.standard_normal(rows * cols, dtype=np.float32).view(np.uint8)
    # distinct copies (the same values): together larger than the caches
    mats = [Matrix(one_raw.copy(), rows, cols, Q40 if q40 else F32) for _ in range(count)]
    x = rng.standard_normal(cols, dtype=np.float32)
    xq = np.zeros(cols // BLOCK * Q80_BYTES, np.uint8)
    out = np.zeros(rows, np.float32)
    px, pxq, pout = ffi.cast("float *", x.ctypes.data), ffi.cast("dl_block_q80 *", xq.ctypes.data), \
        ffi.cast("float *", out.ctypes.data)
    lib.dl_quantize_q80(pxq, px, cols)
    for m in mats:                                     # warm: page in every buffer once
        m.matmul(pout, pxq, px, 1)
    if ready is not None:
        ready()
    speeds, k = [], 0
    for _ in range(windows):
        done, t0 = 0, time.perf_counter()
        while True:
            mats[k].matmul(pout, pxq, px, 1)
            k = (k + 1) % count
            done += 1
            dt = time.perf_counter() - t0
            if dt >= window_seconds:
                break
        speeds.append(done * one / dt / 1e9)
    return float(max(speeds))


def gather_layout(world: Comm, h: ModelHeader, pp: int, split,
                  as_nodes: int = 0) -> tuple[Layout, list[str], ModelHeader, str | None]:
    """Collective: the layout (every rank computes the same one), every rank's host name, the header
    it needs (shard.fit_types: 256-value wo / w2 matrices it cannot cut become q80) and the note
    saying so (None if none)."""
    n = world.size
    hosts = world.comm.allgather(world.host()) if n > 1 else [world.host()]
    weights = memory = speeds = None
    if split == "auto":
        local = {hh: hosts.count(hh) for hh in hosts}
        # measure together (ranks on one host share its memory bus), once every rank is set up
        mine = [measure_speed(h, n, ready=world.barrier if n > 1 else None),
                mem_available() / local[hosts[world.rank]]]
        both = world.allgather_floats(mine) if n > 1 else np.array([mine])
        speeds, memory = [float(v) for v in both[:, 0]], [float(v) for v in both[:, 1]]
        weights = speeds
        if min(memory) <= 0:
            memory = None
    elif split != "even":
        weights = split
    h, layout, note = fit_types(h, lambda hh: make_layout(hh, n, pp, weights, memory, speeds, as_nodes))
    return layout, hosts, h, note


# ------------------------------------------------------------------------------------------------
# building the stages

def build_stages(world: Comm, h: ModelHeader, header_size: int, model, *, pp: int, split, seq: int,
                 buffer_type: str, sync: str, load: str, max_batch: int, progress, n_slots: int,
                 kv_memory: int | None, quiet: bool = False, as_nodes: int = 0) -> Engine:
    """Collective: the layout, the stage sub-groups, this rank's stage weights, its engine."""
    layout, hosts, h, note = gather_layout(world, h, pp, split, as_nodes)
    if world.is_root and not quiet:
        for line in describe(h, layout, hosts) + ([note] if note else []):
            print(line, file=__import__("sys").stderr, flush=True)
    from .engine import kv_ring

    kv = plan_kv(kv_row_bytes(h, layout), seq, n_slots, kv_memory, ring=kv_ring(h, max_batch, ring_row_bytes(h, layout)))
    me = layout.stage_of_rank(world.rank)
    if layout.n_stages == 1:      # weighted tensor parallelism alone: the plain engine
        weights = load_weights(world, h, header_size, me.plan, model, load, progress)
        return Engine(world, h, me.plan, weights, seq, max_batch, buffer_type, sync, kv)
    stage_comm = world.split(me.index, world.rank)
    # loading groups: stage 0's own group; rank 0 + the ranks of stage s > 0 (rank 0 only sends)
    load_comms = [stage_comm if me.index == 0 else None]
    for s in layout.stages[1:]:
        g = world.split(0 if (world.rank == 0 or world.rank in s.ranks) else None, world.rank)
        load_comms.append(g)

    def route(t):
        s = layout.stage_of_layer(t.layer) if t.layer >= 0 else layout.stages[-1]
        if load == "local":
            return Route(stage_comm, s.plan, list(range(len(s.ranks)))) if s is me else None
        g = load_comms[s.index]
        if g is None:
            return None
        members = list(range(g.size)) if s.index == 0 else [None] + list(range(g.size - 1))
        return Route(g, s.plan, members)

    weights = load_weights(world, h, header_size, me.plan, model, load, progress, route)
    link = world.dup()
    return StageEngine(world, link, stage_comm, layout, h, weights, seq, max_batch, buffer_type, sync, kv)


# ------------------------------------------------------------------------------------------------
# the engine of one stage

def _pack_stats(x: TokenStats, rec: np.ndarray) -> None:
    rec[:4] = (x.argmax, x.log_z, np.nan if x.target is None else x.target, len(x.top))
    if x.top:
        rec[4:4 + 2 * len(x.top)] = np.asarray(x.top, np.float64).reshape(-1)


def _unpack_stats(rec: np.ndarray) -> TokenStats:
    k = int(rec[3])
    top = [(int(rec[4 + 2 * i]), float(rec[5 + 2 * i])) for i in range(k)]
    return TokenStats(int(rec[0]), float(rec[1]), None if np.isnan(rec[2]) else float(rec[2]), top)


class _Progressing:
    """The residual sync of a one-rank stage makes no MPI call, so a root computing its layers would
    not move its outstanding transfers (MPICH progresses requests only inside MPI calls): poke them
    at every sync (a Test per request, ~1 us)."""

    def __init__(self, inner, pending):
        self.inner, self.pending = inner, pending

    def __call__(self, x, partial, batch):
        for r in self.pending():
            Comm.test(r)
        self.inner(x, partial, batch)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class StageEngine(Engine):
    """One rank's part of one pipeline stage: `comm` is the stage's group, the weights its layers.
    The root (rank 0, stage 0's root) has `launch` / `collect` for passes in flight, and `step`
    (launch + collect) like Engine; stage roots forward control and rows; stage workers serve their
    root like Engine's workers."""

    def __init__(self, world: Comm, link: Comm, stage_comm: Comm, layout: Layout, h: ModelHeader, weights,
                 max_seq_len: int, max_batch: int, buffer_type: str, sync: str, kv):
        self.layout = layout
        self.stage = layout.stage_of_rank(world.rank)
        super().__init__(stage_comm, h, self.stage.plan, weights, max_seq_len, max_batch, buffer_type, sync, kv)
        self.world, self.link = world, link
        self.summarises_samples = False   # rank 0 samples from whole rows (the result message's layout)
        s = self.stage
        self.depth = layout.n_stages
        self.first, self.last = s.index == 0, s.index == layout.n_stages - 1
        self.stage_root = stage_comm.rank == 0
        self.prev_root = None if self.first else layout.stages[s.index - 1].root
        self.next_root = None if self.last else layout.stages[s.index + 1].root
        if not world.is_root:
            self.kv = None            # the page books live on rank 0 only
        B, V = max_batch, h.vocab_size
        self.q80 = buffer_type == "q80"
        self.row_bytes = h.dim // BLOCK * Q80_BYTES if self.q80 else 4 * h.dim
        self.ctrl_bytes = self.st.ctrl.buf.nbytes
        self.result_bytes = (8 + 8 * STATS_REC + 4 * V) * B   # the largest result message
        self._sends: list = []      # (buffer, request) ring of this rank's outgoing messages
        self._send_i = 0
        self.inflight: deque = deque()
        if self.stage_root:
            size = self.result_bytes if self.last else self.ctrl_bytes + B * self.row_bytes
            # np.zeros: the OS commits a page only when a message first writes it
            self._sends = [[np.zeros(size, np.uint8), None] for _ in range(self.depth)]
            if not self.first:
                self._recv_buf = np.zeros(self.ctrl_bytes + B * self.row_bytes, np.uint8)
                self._recv_req = link.irecv(self._recv_buf, self.prev_root, TAG_FORWARD)
        if world.is_root:
            self._results = [np.zeros(self.result_bytes, np.uint8) for _ in range(self.depth)]
            self._result_i = 0
        if self.stage_root and stage_comm.size == 1:
            self.sync = _Progressing(self.sync, self._pending)

    def _pending(self):
        reqs = [r for _, r in self._sends if r is not None]
        if not self.first and self._recv_req is not None:
            reqs.append(self._recv_req)
        return reqs

    # ---- messages between stage roots -----------------------------------------------------

    def _wait(self, req) -> None:
        """A wait that is part of a pass (results, a send buffer still in use): under the watchdog,
        counted with the stage's collective waits (the token time split: compute / waiting)."""
        w = self.link.wait_seconds
        self.link.wait(req)
        self.comm.wait_seconds += self.link.wait_seconds - w

    def _slot(self):
        """The next outgoing buffer, once the message it held last has left."""
        slot = self._sends[self._send_i]
        self._send_i = (self._send_i + 1) % len(self._sends)
        if slot[1] is not None:
            self._wait(slot[1])
            slot[1] = None
        return slot

    def _isend(self, buf, dest: int, tag: int):
        self.comm.bytes_sent += buf.nbytes    # counted with the stage's collective traffic
        return self.link.isend(buf, dest, tag)

    def _send_next(self, b: int) -> None:
        """[control | b residual rows] to the next stage's root."""
        slot = self._slot()
        buf, n = slot[0], self.ctrl_bytes
        buf[:n] = self.st.ctrl.buf.view(np.uint8)
        if b:
            if self.q80:
                lib.dl_quantize_q80(ffi.cast("dl_block_q80 *", buf.ctypes.data + n), self.st.p_x, b * self.h.dim)
            else:
                buf[n:n + b * self.row_bytes] = self.st.x[:b].reshape(-1).view(np.uint8)
        slot[1] = self._isend(buf[:n + b * self.row_bytes], self.next_root, TAG_FORWARD)

    def _recv_prev(self) -> None:
        """Stage root: the next [control | rows] from the previous stage (idle wait), into st.ctrl and
        st.x; the receive for the one after is posted at once (after a stop, when serve() is called
        again: no receive may be left pending at exit)."""
        self.link.wait_idle(self._recv_req)
        buf, n, st = self._recv_buf, self.ctrl_bytes, self.st
        st.ctrl.buf.view(np.uint8)[:] = buf[:n]
        b = int(st.ctrl.buf[1]) if st.ctrl.cmd == C.CMD_FORWARD else 0
        if b:
            if self.q80:
                lib.dl_dequantize_q80(st.p_x, ffi.cast("dl_block_q80 *", buf.ctypes.data + n), b * self.h.dim)
            else:
                st.x[:b] = buf[n:n + b * self.row_bytes].view(np.float32).reshape(b, self.h.dim)
        self._recv_req = None if st.ctrl.cmd == C.CMD_STOP else \
            self.link.irecv(self._recv_buf, self.prev_root, TAG_FORWARD)

    def _flush(self) -> None:
        for slot in self._sends:
            if slot[1] is not None:
                self._wait(slot[1])
                slot[1] = None

    # ---- the root ---------------------------------------------------------------------------

    def launch(self, rows: Rows, updates=(), copies=()):
        """Root: start a pass (stage 0's layers run here, then the rows go on); its results come
        from `collect`, oldest pass first. At most `depth` passes in flight."""
        if len(self.inflight) >= self.depth:
            raise RuntimeError(f"{self.depth} passes in flight already")
        b = self._begin(rows, updates, copies)
        modes = list(rows.logit_modes)
        i = self._result_i
        self._result_i = (i + 1) % self.depth
        buf = self._results[i]
        req = self.link.irecv(buf[:self._result_size(modes)], self.layout.stages[-1].root, TAG_RESULT)
        self._pass(b, None)
        mask_req = None
        if rows.masks is not None:   # computed meanwhile; the buffer is the scheduler's, one per pass
            wait, masks = rows.masks
            wait()
            mask_req = self._isend(masks, self.layout.stages[-1].root, TAG_MASK)
        self.inflight.append((buf, req, modes, mask_req))

    def collect(self) -> list:
        """Root: the results of the oldest pass in flight, as Engine.step returns them (full rows are
        views reused `depth` passes later)."""
        buf, req, modes, mask_req = self.inflight.popleft()
        self._wait(req)
        if mask_req is not None:
            self._wait(mask_req)
        ids, stats, full = self._result_views(buf, modes)
        self.sampled_rows_whole += modes.count(LOGITS_SAMPLE)
        out, k, q = [], 0, 0
        for j, m in enumerate(modes):
            if m == LOGITS_ARGMAX:
                out.append(int(ids[j]))
            elif m == LOGITS_STATS:
                out.append(_unpack_stats(stats[q]))
                q += 1
            else:
                out.append(full[k])
                k += 1
        return out

    def step(self, rows: Rows, updates=(), copies=(), out_full=None) -> list:
        self.launch(rows, updates, copies)
        out = self.collect()
        if out_full is not None:
            k = 0
            for j, v in enumerate(out):
                if isinstance(v, np.ndarray):
                    out_full[k] = v
                    out[j] = out_full[k]
                    k += 1
        return out

    def _send_tables(self, updates, copies) -> None:
        super()._send_tables(updates, copies)
        self._send_next(0)

    def stop_workers(self) -> None:
        if not self.world.is_root:
            return
        while self.inflight:          # an error between launch and collect: let the stages finish
            self.collect()
        self.st.ctrl.header(C.CMD_STOP)
        if self.comm.size > 1:
            self.comm.send_control(self.st.ctrl.buf)
        self._send_next(0)
        self._flush()

    def gather_rank_stats(self) -> np.ndarray:
        self.st.ctrl.header(C.CMD_STATS)
        if self.comm.size > 1:
            self.comm.send_control(self.st.ctrl.buf)
        self._send_next(0)
        return self.world.gather_floats(self.rank_stats())

    # ---- every other rank -----------------------------------------------------------------

    def serve(self) -> None:
        if not self.stage_root:
            return super().serve()    # a stage's other ranks follow their root like Engine's workers
        c = self.st.ctrl
        if self._recv_req is None:
            self._recv_req = self.link.irecv(self._recv_buf, self.prev_root, TAG_FORWARD)
        while True:
            self._recv_prev()
            cmd = c.cmd
            if self.comm.size > 1:
                self.comm.send_control(c.buf)
            if cmd == C.CMD_STOP:
                if not self.last:
                    self._send_next(0)
                self._flush()
                return
            if cmd == C.CMD_STATS:
                if not self.last:
                    self._send_next(0)
                self.world.gather_floats(self.rank_stats())
                continue
            self._apply_tables()
            if cmd == C.CMD_FORWARD:
                self._pass(int(c.buf[1]), None)      # and on to the next stage or rank 0
            elif not self.last:
                self._send_next(0)

    def _pass(self, b: int, out_full):
        """A stage root's pass includes handing its output on: the rows to the next stage, or (last
        stage) the results to rank 0."""
        if not self.stage_root:
            return super()._pass(b, out_full)
        if self.last:
            return self._pass_to_rank0(b)
        super()._pass(b, None)
        self._send_next(b)
        return None

    def _pass_to_rank0(self, b: int):
        """Last stage's root: run the pass, logits straight into an outgoing buffer, send to rank 0."""
        slot = self._slot()
        buf = slot[0]
        c = self.st.ctrl
        modes = [int(m) for m in c.logit_mode[:int(c.buf[2])]]
        n_full = sum(m in FULL_MODES for m in modes)
        ids, stats, full = self._result_views(buf, modes)
        result = super()._pass(b, full[:n_full] if n_full else None)
        q = 0
        for j, v in enumerate(result):
            ids[j] = v if modes[j] == LOGITS_ARGMAX else -1
            if modes[j] == LOGITS_STATS:
                _pack_stats(v, stats[q])
                q += 1
        slot[1] = self._isend(buf[:self._result_size(modes)], 0, TAG_RESULT)
        return result

    def _result_size(self, modes) -> int:
        return 8 * len(modes) + 8 * STATS_REC * modes.count(LOGITS_STATS) + \
            4 * self.h.vocab_size * sum(m in FULL_MODES for m in modes)

    def _result_views(self, buf, modes):
        """A result message: per logit row its id (int64; -1 unless an argmax row), the TokenStats of
        the stats rows (float64 records), then the full rows (f32)."""
        n, n_stats = len(modes), modes.count(LOGITS_STATS)
        s0, f0 = 8 * n, 8 * n + 8 * STATS_REC * n_stats
        return (buf[:s0].view(np.int64), buf[s0:f0].view(np.float64).reshape(-1, STATS_REC),
                buf[f0:f0 + 4 * self.h.vocab_size * self.max_batch].view(np.float32).reshape(-1, self.h.vocab_size))

    def _logits(self, out_full) -> list:
        return super()._logits(out_full) if self.last else None

    def _root_masks(self, n: int) -> np.ndarray:
        """The last stage's root: the pass's masks from rank 0 (sent once stage 0 had run)."""
        buf = self.st.masks[:n]
        self._wait(self.link.irecv(buf, 0, TAG_MASK))
        return buf
