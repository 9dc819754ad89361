"""The weights every rank holds, and how they get there.

- `open_model_file(path)`: a Distributed Llama `.m` file (formats.ModelFile) or a GGUF file
  (gguf.GGUFModel): a header, and the bytes of each tensor as stored (`stored_rows`).
- `runtime_header(model)`: the types the ranks run. Every matrix keeps its stored block type where a
  kernel multiplies it (kernels.MATMUL), else it becomes q80 (one log line per type); the token
  embedding keeps any type the kernels dequantize. The root decides once, then broadcasts the header:
  every rank derives the same tensor layout from it (formats.tensor_layout).
- `load_weights`: every rank's slices of every tensor in those types, Scatterv'd from the root (which
  maps the file) or mapped by each rank (`--load local`). A slice keeps its file bytes; the block
  types are then repacked into their kernels' 16-row layouts (the copy replaces the slice).
- `Matrix`, `Embedding`, `Layer`, `Weights`: the plain structs the forward pass (engine.py) reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .comm import Comm
from .errors import ModelFormatError
from .formats import (F32, MATRIX_NAMES, Q80, ModelHeader, TensorInfo, block_shape, float_type_name, set_matrix_types,
                      tensor_layout, tensor_nbytes)
from .kernels import MATMUL, MATMUL_PLAIN, ffi, fptr, lib
from .shard import ROW_SPLIT, ShardPlan

REPACK = os.environ.get("DLLAMA_REPACK", "1") != "0"   # DLLAMA_REPACK=0: keep the plain q40 / q80 layouts


# ------------------------------------------------------------------------------------------------
# model files and the types the ranks run

def open_model_file(path: str | os.PathLike):
    """A .m or GGUF model file (told apart by the GGUF magic), or one ModelFormatError line."""
    from .formats import open_model
    from .gguf import is_gguf, open_gguf_model

    return open_gguf_model(path) if is_gguf(path) else open_model(path)


def runtime_header(model) -> tuple[ModelHeader, list[str]]:
    """(the header the ranks run, one line per type converted at load): a matrix without a kernel for
    its type becomes q80 (model.notes: what the reader itself could not keep)."""
    import copy

    h = copy.copy(model.header)
    types = h.matrix_type_list()
    missing = sorted({t for t in types if t not in MATMUL})
    lines = list(model.notes)
    for t in missing:
        n = types.count(t)
        lines.append(f"{float_type_name(t)}: no kernel multiplies it yet, {n} matri{'x' if n == 1 else 'ces'} "
                     f"converted to q80 at load")
    if missing:
        set_matrix_types(h, [Q80 if t in missing else t for t in types])
    return h, lines


def convert_rows(raw: np.ndarray, stored: int | None, ggml_type: int | None, rows: int, cols: int, to: int,
                 where: str) -> np.ndarray:
    """Rows stored in one type, in another (q80 for a matrix without its kernel, f32 for a norm):
    dequantized by the C kernels where they know the type (dl_dequantize_rows), else by gguf-py,
    chunk by chunk, then quantized."""
    out = np.empty(tensor_nbytes(to, rows, cols), np.uint8)
    if rows == 0:
        return out
    row_in, row_out = raw.size // rows, out.size // rows
    chunk = max(1, (1 << 20) // cols)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        part = np.ascontiguousarray(raw[r0 * row_in:r1 * row_in])
        if stored is not None:
            vals = np.empty((r1 - r0) * cols, np.float32)
            lib.dl_dequantize_rows(stored, fptr(vals), ffi.cast("void *", part.ctypes.data), ffi.NULL, r1 - r0, cols)
        else:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            from .gguf import ggml_name

            try:
                vals = np.asarray(dequantize(part.reshape(r1 - r0, row_in), GGMLQuantizationType(ggml_type)),
                                  np.float32).reshape(-1)
            except (NotImplementedError, ValueError, TypeError) as e:
                raise ModelFormatError(f"{where} is {ggml_name(ggml_type)}, which neither dllama-mpi nor gguf "
                                       f"can read ({e})") from None
        dst = out[r0 * row_out:r1 * row_out]
        if to == Q80:
            lib.dl_quantize_q80(ffi.cast("dl_block_q80 *", dst.ctypes.data), fptr(vals), vals.size)
        elif to == F32:
            dst.view(np.float32)[:] = vals
        else:
            raise ValueError(f"cannot convert to {float_type_name(to)}")
    return out


def tensor_rows(model, t: TensorInfo, r0: int = 0, r1: int | None = None) -> np.ndarray:
    """Rows [r0, r1) of tensor t (an entry of the runtime layout) in its runtime type t.ftype: a view
    of the file, or the stored rows converted."""
    r1 = t.rows if r1 is None else r1
    raw, stored, ggml_type = model.stored_rows(t.key, r0, r1)
    if stored == t.ftype:
        return raw
    where = f"{model.path}: tensor {t.name}" + (f" of layer {t.layer}" if t.layer >= 0 else "")
    return convert_rows(raw, stored, ggml_type, r1 - r0, t.cols, t.ftype, where)


# ------------------------------------------------------------------------------------------------
# the structs the forward pass reads

def _aligned_empty(nbytes: int) -> np.ndarray:
    """uint8 buffer whose data starts on a 64-byte boundary (SIMD loads, no false sharing)."""
    buf = np.empty(nbytes + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + nbytes]


@dataclass
class Matrix:
    """One rank's slice of a weight matrix [rows, cols] and the kernel that multiplies it
    (kernels.MATMUL): f32 / f16 / bf16 row-major times the f32 activations; the block types (q40,
    q80 and the GGUF ones) repacked once at load into their kernel's 16-row layout (the repacked
    buffer replaces the raw slice, so memory does not double) times the q80 activations.
    DLLAMA_REPACK=0 keeps q40 / q80 in plain blocks."""

    data: np.ndarray   # the raw bytes of the slice, or the repacked buffer
    rows: int
    cols: int
    ftype: int
    ptr: object = field(init=False, repr=False)
    repacked: bool = field(init=False, default=False)

    def __post_init__(self):
        spec = MATMUL[self.ftype] if REPACK or self.ftype not in MATMUL_PLAIN else MATMUL_PLAIN[self.ftype]
        self.spec = spec
        if spec.repack is not None:
            src = self.data
            self.data = _aligned_empty(getattr(lib, spec.nbytes)(self.rows, self.cols))
            self.repacked = True
            if src is not None:
                self.fill(0, src, self.rows)
        self.ptr = ffi.cast("void *", self.data.ctypes.data)

    @classmethod
    def filled_by_rows(cls, rows: int, cols: int, ftype: int) -> "Matrix":
        """A repacked matrix whose rows come later, in chunks (`fill`): a slice then never needs its
        raw bytes and its repacked copy in memory at once."""
        return cls(None, rows, cols, ftype)

    def fill(self, r0: int, src: np.ndarray, n: int) -> None:
        """Repack rows [r0, r0 + n) from their stored blocks (r0: a multiple of the 16-row groups)."""
        dst = self.data[getattr(lib, self.spec.nbytes)(r0, self.cols) if r0 else 0:]
        getattr(lib, self.spec.repack)(ffi.cast("void *", dst.ctypes.data), ffi.cast("void *", src.ctypes.data),
                                       n, self.cols)

    @property
    def nbytes(self) -> int:
        """Bytes of weights read by one matmul (the payload, without repacking padding)."""
        return tensor_nbytes(self.ftype, self.rows, self.cols)

    def matmul(self, out, xq, xf, batch: int) -> None:
        """out[batch, rows] = x[batch, cols] · selfᵀ (cffi pointers); the block types take the q80
        input xq, f32 / f16 / bf16 the f32 input xf."""
        # looked up per call: the benchmark's profiler replaces the module's `lib` with a timing proxy
        getattr(lib, self.spec.kernel)(out, self.ptr, xq if self.spec.q80_input else xf, self.rows, self.cols, batch)


@dataclass
class Pieces:
    """A column-split matrix (wo, w2) kept as the column slices of this rank's virtual nodes
    (--as-nodes): each multiplies its own columns of the input into its own partial sum, which the
    sync adds in virtual-node order. cols: each part's columns within this rank's slice."""

    parts: list
    cols: list
    calls: list = field(default_factory=list)   # decode-row kernel calls, bound by the engine
    empty: list = field(default_factory=list)   # parts without columns (their partial is zero)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.parts)

    @property
    def held(self) -> int:
        return sum(m.data.nbytes for m in self.parts)


def _cut_cols(raw: np.ndarray, rows: int, ftype: int, c0: int, c1: int) -> np.ndarray:
    """The bytes of columns [c0, c1) of a [rows, cols] matrix stored in `ftype` (whole blocks), packed."""
    unit, unit_bytes = block_shape(ftype)
    by_row = raw.view(np.uint8).reshape(rows, -1)
    return np.ascontiguousarray(by_row[:, c0 // unit * unit_bytes: c1 // unit * unit_bytes]).reshape(-1)


def _cut_pieces(data: np.ndarray, rows: int, ftype: int, cols: list) -> Pieces:
    """Pieces of a rank's column slice `data` (its stored bytes, [rows, slice cols]) at `cols`."""
    parts = []
    for c0, c1 in cols:
        part = _cut_cols(data, rows, ftype, c0, c1)
        parts.append(Matrix(part.view(np.float32) if ftype == F32 else part, rows, c1 - c0, ftype))
    return Pieces(parts, cols)


@dataclass
class Embedding:
    """The token embedding on the root, in its stored type (a view of the mapped file, never an f32
    copy): `lookup` dequantizes the rows of a pass's tokens."""

    data: np.ndarray
    rows: int
    cols: int
    ftype: int

    def lookup(self, tokens: np.ndarray, out: np.ndarray) -> None:
        """out[i] = row tokens[i] (tokens: int32, checked to be in range by the caller)."""
        lib.dl_dequantize_rows(self.ftype, fptr(out), ffi.cast("void *", self.data.ctypes.data),
                               ffi.cast("int32_t *", tokens.ctypes.data), tokens.size, self.cols)

    @property
    def nbytes(self) -> int:
        return self.data.size


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
    attn_post_norm: np.ndarray | None = None         # gemma3: sandwich norms of the attention and FFN
    ffn_post_norm: np.ndarray | None = None          # outputs, before they join the residual
    q_bias: np.ndarray | None = None                 # qwen2: this rank's slices of the q, k, v biases
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    index: int = 0                                   # the layer's number in the model
    qkv: tuple | None = None                         # set by the Engine: the fused q/k/v call (engine._fused)
    w13: tuple | None = None                         # ... and the fused gate/up call

    def __post_init__(self):
        p = lambda a: None if a is None else fptr(a)  # noqa: E731
        self.p_attn_norm, self.p_ffn_norm = p(self.attn_norm), p(self.ffn_norm)
        self.p_q_norm, self.p_k_norm, self.p_router = p(self.q_norm), p(self.k_norm), p(self.router)
        self.p_attn_post_norm, self.p_ffn_post_norm = p(self.attn_post_norm), p(self.ffn_post_norm)


@dataclass
class Weights:
    embed: Embedding | None   # root only
    layers: list[Layer]
    norm: np.ndarray
    wcls: Matrix
    share: int = 0            # bytes of this rank's share of the model's tensors, in their types

    def nbytes(self) -> int:
        """Bytes of weights this rank holds (slices as repacked, the embedding as mapped)."""
        total = self.embed.nbytes if self.embed is not None else 0
        total += self.norm.nbytes if self.norm is not None else 0
        total += self.wcls.data.nbytes if self.wcls is not None else 0
        for layer in self.layers:
            for m in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w1, layer.w2, layer.w3,
                      *(m for e in layer.experts for m in e)):
                total += 0 if m is None else m.held if isinstance(m, Pieces) else m.data.nbytes
            for v in (layer.attn_norm, layer.ffn_norm, layer.q_norm, layer.k_norm, layer.router,
                      layer.attn_post_norm, layer.ffn_post_norm, layer.q_bias, layer.k_bias, layer.v_bias):
                total += v.nbytes if v is not None else 0
        return total


# ------------------------------------------------------------------------------------------------
# loading

# qwen2's biases: each rank keeps the entries of its rows of the matrix the bias follows
BIAS_OF = {"q_bias": "wq", "k_bias": "wk", "v_bias": "wv"}

def _slice_bytes(model, t: TensorInfo, plan: ShardPlan, rank: int, whole: np.ndarray | None = None) -> np.ndarray:
    """The bytes of rank's slice of a matrix: a view for row ranges, a packed copy for columns (cut
    from `whole`, the tensor in its runtime type, when the caller has it: a stored type converted at
    load is then converted once for all ranks)."""
    if t.name in ROW_SPLIT:
        r0, r1 = plan.rows(t.name, rank)
        return tensor_rows(model, t, r0, r1)
    raw = whole if whole is not None else tensor_rows(model, t)
    c0, c1 = plan.cols(t.name, rank)
    if (c0, c1) == (0, t.cols):
        return raw
    return _cut_cols(raw, t.rows, t.ftype, c0, c1)


def _slice_shape(t: TensorInfo, plan: ShardPlan, rank: int) -> tuple[int, int]:
    if t.name in ROW_SPLIT:
        r0, r1 = plan.rows(t.name, rank)
        return r1 - r0, t.cols
    c0, c1 = plan.cols(t.name, rank)
    return t.rows, c1 - c0


def _row_displacements(t: TensorInfo, plan: ShardPlan, members: list) -> list[int] | None:
    """Byte offsets of each member's rows in the tensor when the row slices tile it in rank order
    (no overlap: MPI forbids reading a Scatterv byte twice), else None. A member that receives
    nothing (None) gets offset 0."""
    if t.name not in ROW_SPLIT:
        return None
    ranges = [plan.rows(t.name, m) for m in members if m is not None]
    if ranges[0][0] != 0 or ranges[-1][1] != t.rows or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        return None
    row_bytes = t.nbytes // t.rows
    return [0 if m is None else plan.rows(t.name, m)[0] * row_bytes for m in members]


CHUNK_BYTES = 16 << 20   # row slices above this arrive in chunks of about this size (scatter loading)


def _chunked(t: TensorInfo, plan: ShardPlan, members: list) -> bool:
    """Whether a tensor goes out in row chunks: a row-split matrix of a repacked type whose row
    slices tile it and whose largest slice is above CHUNK_BYTES (the vocabulary matrices, mostly)."""
    spec = MATMUL.get(t.ftype)
    if t.name not in ROW_SPLIT or spec is None or spec.repack is None or not REPACK:
        return False
    if _row_displacements(t, plan, members) is None:
        return False
    row = t.nbytes // t.rows
    return max((b - a) * row for a, b in (plan.rows(t.name, m) for m in members if m is not None)) > CHUNK_BYTES


def _scatter_rows_chunked(g: Comm, model, t: TensorInfo, plan: ShardPlan, members: list) -> Matrix | None:
    """A row-split matrix scattered in chunks of whole 16-row groups, each repacked into its place as
    it arrives: a rank holds its repacked slice plus one chunk, never the slice twice (the root
    sends straight from the file's map). Returns this rank's Matrix (None: it only sends)."""
    row = t.nbytes // t.rows
    step = max(16, CHUNK_BYTES // row // 16 * 16)
    ranges = [None if m is None else plan.rows(t.name, m) for m in members]
    n_chunks = max(-(-(b - a) // step) for a, b in (x for x in ranges if x is not None))
    me = members[g.rank]
    mine = ranges[g.rank]
    value = Matrix.filled_by_rows(mine[1] - mine[0], t.cols, t.ftype) if me is not None else None
    send = tensor_rows(model, t) if g.is_root else None
    for i in range(n_chunks):
        part = [(0, 0) if x is None else (min(x[0] + i * step, x[1]), min(x[0] + (i + 1) * step, x[1])) for x in ranges]
        counts = [(b - a) * row for a, b in part]
        displs = [a * row for a, _ in part]
        buf = np.empty(counts[g.rank], np.uint8)
        g.scatterv(send, counts, buf, displs)
        if value is not None and counts[g.rank]:
            value.fill(i * step, buf, part[g.rank][1] - part[g.rank][0])
    return value


@dataclass
class Route:
    """Who moves one tensor: the group that takes part, the shard plan its slices come from, and per
    rank of the group the plan rank it loads as (None: it only sends, as the root does for a
    pipeline stage it is not in)."""

    comm: Comm
    plan: ShardPlan
    members: list


def load_weights(comm: Comm, header: ModelHeader, header_size: int, plan: ShardPlan,
                 model=None, load: str = "scatter", progress=None, route=None) -> Weights:
    """Give every rank its slices of the tensors `header` lays out (the runtime types: the root
    reads them from `model`, converting where a stored type differs). `scatter`: only the root reads
    the file and Scatterv's each tensor (one tensor of extra memory at a time); `local`: every rank
    maps the file itself. `route(t)` (pipeline stages) says which group loads a tensor (None: this
    rank has no part in it); by default every rank of comm, with plan."""
    everyone = Route(comm, plan, list(range(comm.size)))
    layers: dict[int, dict] = {}
    embed = norm = wcls = None
    share = 0
    for t in tensor_layout(header, header_size):
        if progress is not None:
            progress(t)
        if t.name == "embed":
            if comm.is_root:
                embed = Embedding(tensor_rows(model, t), t.rows, t.cols, t.ftype)
                share += t.nbytes
            continue
        r = everyone if route is None else route(t)
        if r is None:
            continue
        g, tplan, me = r.comm, r.plan, r.members[r.comm.rank]
        if t.name not in MATRIX_NAMES:
            # small vectors (norms, biases) and the MoE router: copy (aligned) and broadcast
            arr = np.empty((t.rows, t.cols), np.float32)
            if g.is_root or load == "local":
                arr[...] = tensor_rows(model, t).view(np.float32).reshape(t.rows, t.cols)
            if load != "local" and g.size > 1:
                g.bcast_array(arr)
            if me is None:
                continue   # the root sent another pipeline stage's vector
            value = arr if t.rows > 1 else arr.reshape(-1)
            if t.name in BIAS_OF:   # the whole bias is a few KB: sent whole, kept in part
                r0, r1 = tplan.rows(BIAS_OF[t.name], me)
                value = value[r0:r1].copy()
            share += value.nbytes
        else:
            if g.size == 1:
                data = tensor_rows(model, t)
            elif load == "local":
                data = np.array(_slice_bytes(model, t, tplan, me))
            elif _chunked(t, tplan, r.members):
                value = _scatter_rows_chunked(g, model, t, tplan, r.members)
                share += tensor_nbytes(t.ftype, value.rows, value.cols) if value is not None else 0
                if value is None:
                    model.drop(t.key)   # the root sent another stage's slices: not its memory
                    continue
                if model is not None:
                    model.drop(t.key)
                data = None
            else:
                counts = [0 if m is None else tensor_nbytes(t.ftype, *_slice_shape(t, tplan, m)) for m in r.members]
                displs = _row_displacements(t, tplan, r.members)
                send = None
                if g.is_root:
                    # row slices that tile the tensor go straight from the map; column slices (and
                    # replicated KV rows) are packed into one tensor-sized buffer first
                    whole = tensor_rows(model, t) if displs is not None or t.name not in ROW_SPLIT else None
                    send = whole if displs is not None else \
                        np.concatenate([_slice_bytes(model, t, tplan, m, whole) for m in r.members if m is not None])
                    del whole
                data = np.empty(counts[g.rank], np.uint8)
                g.scatterv(send, counts, data, displs)
                del send
            if data is not None:
                if me is None:
                    model.drop(t.key)   # the root sent another stage's slices: not its memory
                    continue
                rows, cols = _slice_shape(t, tplan, me)
                share += tensor_nbytes(t.ftype, rows, cols)
                if t.name not in ROW_SPLIT and tplan[me].pieces:
                    c0 = tplan.cols(t.name, me)[0]
                    layers.setdefault(t.layer, {"experts": {}})[t.name] = _cut_pieces(
                        data, rows, t.ftype, [(a - c0, b - c0) for a, b in tplan.piece_cols(t.name, me)])
                    del data
                    if model is not None:
                        model.drop(t.key)
                    continue
                if t.ftype == F32:
                    data = data.view(np.float32) if data.ctypes.data % 4 == 0 else np.array(data).view(np.float32)
                value = Matrix(data, rows, cols, t.ftype)
                if value.repacked and model is not None:
                    del data
                    model.drop(t.key)
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
    for l in sorted(layers):   # every layer, or a pipeline stage's range
        d = layers[l]
        experts = [(e["w1"], e["w2"], e["w3"]) for _, e in sorted(d.pop("experts").items())]
        out.append(Layer(experts=experts, index=l, **d))
    return Weights(embed, out, norm, wcls, share)


__all__ = ["Embedding", "Layer", "Matrix", "Pieces", "REPACK", "Route", "Weights", "convert_rows", "load_weights",
           "open_model_file", "runtime_header", "tensor_rows"]
