"""The shard plan: which part of every tensor each rank of the tensor-parallel group owns.

Computed once from the header and the group size; the loader, the forward pass and the sync all read
their ranges from here (FORMATS.md §7), so no slicing arithmetic is scattered around:

- query heads are split as evenly as possible (whole heads per rank), or in proportion to per-rank
  weights (`--split`, pipeline.py); each rank holds the KV heads
  its query heads use, so with more ranks than KV heads (or uneven splits) a KV head is replicated
  on the ranks that share it (Distributed Llama refuses N > n_kv_heads);
- FFN rows (w1/w3, and the matching w2 columns) are split on the block boundaries of w2's type (32
  values, 256 for the GGUF K types and IQ4_XS), the heads likewise on whole blocks of wo's columns;
- vocabulary rows (wcls) are split evenly; the residual `dim` is cut into per-rank chunks of whole
  q80 blocks for the reduce-scatter of the `ring` sync.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from .errors import ConfigError
from .formats import BLOCK, Q80, TYPE_BLOCK, ModelHeader, float_type_name, set_matrix_types


def even_split(n: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """Split range(n) into `parts` contiguous ranges whose bounds are multiples of `unit`
    (sizes differ by at most one unit; earlier parts get the extra units)."""
    units = n // unit
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + units // parts + (1 if i < units % parts else 0))
    return [(a * unit, b * unit) for a, b in zip(bounds, bounds[1:])]


def weighted_split(n: int, weights, unit: int = 1) -> list[tuple[int, int]]:
    """Split range(n) into contiguous ranges of whole `unit`s, part i getting a share of the units
    proportional to weights[i] (largest remainder; ties go to earlier parts, so equal weights give
    exactly even_split). A zero weight gets nothing."""
    units = n // unit
    total = float(sum(weights))
    if total <= 0 or min(weights) < 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    quota = [units * float(w) / total for w in weights]
    sizes = [int(q) for q in quota]
    order = sorted(range(len(weights)), key=lambda i: (-(quota[i] - sizes[i]), i))
    for i in order[:units - sum(sizes)]:
        sizes[i] += 1
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return [(a * unit, b * unit) for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class RankShard:
    """Everything one rank owns, in element (not byte) units."""

    rank: int
    heads: tuple[int, int]        # query heads [h0, h1)
    kv_heads: tuple[int, int]     # KV heads [k0, k1) this rank stores (may overlap other ranks)
    ffn: tuple[int, int]          # FFN rows of w1/w3 = columns of w2 (dense hidden or per expert)
    vocab: tuple[int, int]        # wcls rows
    dim_chunk: tuple[int, int]    # residual elements this rank reduces in the ring sync
    # --as-nodes: the (heads, ffn) ranges of the virtual nodes this rank computes, in order; their
    # wo / w2 partial sums stay apart until the sync adds all of them in virtual-node order
    pieces: tuple = ()

    @property
    def n_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def n_ffn(self) -> int:
        return self.ffn[1] - self.ffn[0]

    @property
    def n_vocab(self) -> int:
        return self.vocab[1] - self.vocab[0]


@dataclass(frozen=True)
class ShardPlan:
    header: ModelHeader
    n_nodes: int
    shards: tuple[RankShard, ...]
    as_nodes: int = 0             # --as-nodes S (0: off): every rank computes whole virtual nodes of S

    def piece_cols(self, name: str, rank: int) -> list[tuple[int, int]]:
        """Column ranges (absolute) of wo or w2 of each of rank's pieces: its virtual nodes under
        --as-nodes, else its one slice."""
        s, hd = self.shards[rank], self.header.head_size
        if not s.pieces:
            return [self.cols(name, rank)]
        if name == "wo":
            return [(a * hd, b * hd) for (a, b), _ in s.pieces]
        if name == "w2":
            return [ffn for _, ffn in s.pieces]
        raise KeyError(name)

    def __getitem__(self, rank: int) -> RankShard:
        return self.shards[rank]

    @property
    def group_per_kv(self) -> int:
        return self.header.n_heads // self.header.n_kv_heads

    def kv_of_q(self, rank: int) -> list[int]:
        """For each local query head, the index of its KV head among the rank's local KV heads."""
        s = self.shards[rank]
        g = self.group_per_kv
        return [h // g - s.kv_heads[0] for h in range(*s.heads)]

    def rows(self, name: str, rank: int) -> tuple[int, int]:
        """Row range of a row-split matrix (wq, wk, wv, w1, w3, wcls) for a rank."""
        s, hd = self.shards[rank], self.header.head_size
        if name == "wq":
            return s.heads[0] * hd, s.heads[1] * hd
        if name in ("wk", "wv"):
            return s.kv_heads[0] * hd, s.kv_heads[1] * hd
        if name in ("w1", "w3"):
            return s.ffn
        if name == "wcls":
            return s.vocab
        raise KeyError(name)

    def cols(self, name: str, rank: int) -> tuple[int, int]:
        """Column range of a column-split matrix (wo, w2) for a rank."""
        s, hd = self.shards[rank], self.header.head_size
        if name == "wo":
            return s.heads[0] * hd, s.heads[1] * hd
        if name == "w2":
            return s.ffn
        raise KeyError(name)


ROW_SPLIT = ("wq", "wk", "wv", "w1", "w3", "wcls")
COL_SPLIT = ("wo", "w2")


def column_unit(h: ModelHeader, name: str) -> int:
    """Columns of a column-split matrix (wo, w2) come in whole blocks of its types: 32 values for q40,
    q80 and the 32-value GGUF types, 256 for the K types and IQ4_XS; with any block-type matrix the q80
    activations they multiply need whole 32-value blocks too (1: all f32 / f16)."""
    unit = BLOCK if h.quantized else 1
    for t in h.types_of(name):
        unit = math.lcm(unit, TYPE_BLOCK[t][0])
    return unit


def make_plan(h: ModelHeader, n_nodes: int, weights=None, as_nodes: int = 0) -> ShardPlan:
    """The plan for `n_nodes` ranks, or a ConfigError saying why the model cannot be split so.

    Slices may be uneven, and a rank may own no head or no FFN column of a small model (it then
    adds a zero partial sum): what must hold is that every column slice of wo and w2 is made of
    whole blocks of their types (column_unit: 32 or 256 values), so the head and FFN boundaries
    move to the nearest block. `weights` (one per rank, e.g. measured speeds) share heads, FFN rows
    and vocabulary rows in proportion instead of evenly; the residual chunks of the ring sync stay
    even. fit_types turns the 256-value matrices that no split can cut into q80 ones.

    `as_nodes` S (--as-nodes): the slices are those of S virtual nodes (an even plan for S), each
    rank computing a contiguous run of them (evenly, or by `weights`); RankShard.pieces keeps their
    ranges so that the wo / w2 partial sums are the same sums, added in the same order, on any node
    count up to S: the outputs are bit for bit those of one node run with the same S."""
    if n_nodes < 1:
        raise ConfigError(f"node count must be >= 1, got {n_nodes}")
    if weights is not None and len(weights) != n_nodes:
        raise ConfigError(f"{len(weights)} split weights for {n_nodes} nodes")
    split = even_split if weights is None else (lambda n, parts, unit=1: weighted_split(n, weights, unit))
    if as_nodes:
        head_ranges, ffn_ranges, pieces = _virtual_ranges(h, n_nodes, weights, split, as_nodes)
    else:
        head_ranges, ffn_ranges = _ranges(h, n_nodes, weights, split)
        pieces = [()] * n_nodes
    vocab_ranges = split(h.vocab_size, n_nodes)
    dim_unit = BLOCK if h.dim % BLOCK == 0 else 1
    dim_ranges = even_split(h.dim, n_nodes, dim_unit)
    g = h.n_heads // h.n_kv_heads
    shards = []
    for r in range(n_nodes):
        h0, h1 = head_ranges[r]
        kv = (h0 // g, (h1 - 1) // g + 1) if h1 > h0 else (0, 0)
        shards.append(RankShard(r, (h0, h1), kv, ffn_ranges[r], vocab_ranges[r], dim_ranges[r], pieces[r]))
    return ShardPlan(h, n_nodes, tuple(shards), as_nodes)


def _ranges(h: ModelHeader, n_nodes: int, weights, split) -> tuple[list, list]:
    """Each rank's query heads and FFN rows: whole blocks of wo's and w2's column types."""
    unit, ffn_unit = column_unit(h, "wo"), column_unit(h, "w2")
    hd = h.head_size
    heads_unit = unit // math.gcd(unit, hd)   # heads per indivisible group (whole wo blocks)
    if h.n_heads % heads_unit:
        raise ConfigError(
            f"cannot split the model: head_dim {hd} x {h.n_heads} heads cannot be cut into slices "
            f"of whole {unit}-value {'/'.join(float_type_name(t) for t in sorted(h.types_of('wo')))} blocks")
    busy = n_nodes if weights is None else sum(1 for w in weights if w > 0)
    if busy > h.n_heads // heads_unit:
        raise ConfigError(
            f"cannot split the model over {n_nodes} nodes: its {h.n_heads} attention heads (head_dim {hd}) "
            f"give at most {h.n_heads // heads_unit} slices of wo columns that are a multiple of {unit}")
    head_ranges = [(a // heads_unit * heads_unit, b // heads_unit * heads_unit)
                   for a, b in split(h.n_heads, n_nodes, heads_unit)]
    if h.ffn_dim % ffn_unit:
        raise ConfigError(f"FFN size {h.ffn_dim} is not a multiple of {ffn_unit}")
    return head_ranges, split(h.ffn_dim, n_nodes, ffn_unit)


def _virtual_ranges(h: ModelHeader, n_nodes: int, weights, split, as_nodes: int) -> tuple[list, list, list]:
    """--as-nodes: each rank's heads and FFN rows are a contiguous run of the even plan's for
    `as_nodes` virtual nodes, and its pieces those virtual nodes' (heads, ffn) ranges."""
    if as_nodes < n_nodes:
        raise ConfigError(f"--as-nodes {as_nodes} is below the node count {n_nodes}: every rank computes "
                          f"at least one virtual node")
    if h.is_moe:
        raise ConfigError("--as-nodes: mixture-of-experts models are not supported (their expert sums are per rank)")
    try:
        virtual = make_plan(h, as_nodes)
    except ConfigError as e:
        raise ConfigError(f"--as-nodes {as_nodes}: {e}") from None
    groups = split(as_nodes, n_nodes)
    if any(b == a for a, b in groups):
        raise ConfigError(f"--as-nodes {as_nodes}: split weights {list(weights)} leave a rank without a virtual node")
    runs = [virtual.shards[a:b] for a, b in groups]
    return ([(vs[0].heads[0], vs[-1].heads[1]) for vs in runs], [(vs[0].ffn[0], vs[-1].ffn[1]) for vs in runs],
            [tuple((v.heads, v.ffn) for v in vs) for vs in runs])


def fit_types(h: ModelHeader, make):
    """(header, make(header), note): `make` (a plan or a pipeline layout of h) as it is, or, when it
    cannot cut the wo (then wo and w2) matrices of a 256-value block type (more ranks than their
    blocks allow slices), make() of the header with those matrices converted to q80 at load
    (32-value blocks); the note says so (None when nothing changed). Deterministic: every rank
    computes the same."""
    try:
        return h, make(h), None
    except ConfigError as e:
        error = e
    for names in (("wo",), COL_SPLIT):
        wide = [(n, t) for n, t in zip(h.matrix_names(), h.matrix_type_list()) if n in names and TYPE_BLOCK[t][0] > BLOCK]
        if not wide:
            continue
        h2 = copy.copy(h)
        set_matrix_types(h2, [Q80 if n in names and TYPE_BLOCK[t][0] > BLOCK else t
                              for n, t in zip(h.matrix_names(), h.matrix_type_list())])
        try:
            result = make(h2)
        except ConfigError:
            continue
        kinds = sorted({float_type_name(t) for _, t in wide})
        return h2, result, (f"the {len(wide)} {' / '.join(names)} matrices of {'/'.join(kinds)} (256-value blocks) "
                            f"cannot be cut into this many column slices: converted to q80 at load")
    raise error
