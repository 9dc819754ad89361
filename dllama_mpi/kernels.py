"""Loader of the C kernels (cffi module `dllama_mpi._kernels`) and numpy-level helpers.

`ffi`, `lib` are the cffi objects: the engine calls `lib.dl_*` directly on preallocated buffers with
pointers made once by `ptr()`. When the compiled module is missing (source checkout not installed)
or stale (kernel sources changed since it was built), it is built into
`$DLLAMA_MPI_CACHE` or `~/.cache/dllama-mpi/kernels-<hash>/` under a file lock, so that several MPI
ranks starting together build it once.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from dataclasses import dataclass

import numpy as np

from .formats import (BF16, F16, F32, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q40, Q80, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K,
                      Q6_K)

__all__ = [
    "ffi", "lib", "ptr", "Q40_BLOCK_BYTES", "Q80_BLOCK_BYTES", "QK", "q40_dtype", "q80_dtype",
    "ISA_SCALAR", "ISA_AVX2", "ISA_AVX512", "ISA_NEON", "ISA_NEON_DOTPROD", "ALL_ISAS", "set_threads", "n_threads", "isa_name",
    "set_isa", "get_isa", "isa_supported", "supported_isas", "f32_to_f16", "f16_to_f32",
    "quantize_q80", "dequantize_q80", "quantize_q40", "dequantize_q40", "matmul_q40_q80",
    "matmul_q80_q80", "matmul_f16_f32", "matmul_f32", "rmsnorm", "silu_mul", "add", "add_q80", "softmax", "rope",
    "attention", "attention_paged", "Matmul", "MATMUL", "MATMUL_PLAIN", "dequantize_rows", "fptr", "qptr",
    "random_blocks",
]

QK = 32
Q40_BLOCK_BYTES = 18
Q80_BLOCK_BYTES = 34
q40_dtype = np.dtype([("d", "<u2"), ("qs", "u1", 16)])
q80_dtype = np.dtype([("d", "<u2"), ("qs", "i1", 32)])
assert q40_dtype.itemsize == Q40_BLOCK_BYTES and q80_dtype.itemsize == Q80_BLOCK_BYTES


def _sources_present() -> bool:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.isfile(os.path.join(root, "kernels", "dllama.h"))


def _load_from(path: str):
    name = "dllama_mpi._kernels"
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


def _build_cached():
    import fcntl

    from . import _build_kernels as bk

    h = bk.source_hash()
    root = os.environ.get("DLLAMA_MPI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dllama-mpi")
    try:
        os.makedirs(root, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError(root)
    except OSError:  # e.g. another user's home: build in a per-user temporary folder instead
        import tempfile

        root = os.path.join(tempfile.gettempdir(), f"dllama-mpi-{os.getuid()}")
        os.makedirs(root, exist_ok=True)
    d = os.path.join(root, f"kernels-{h}")
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)

    def find():
        if os.path.isdir(d):
            for f in sorted(os.listdir(d)):
                if f.startswith("_kernels") and f.endswith(suffixes):
                    return os.path.join(d, f)
        return None

    with open(os.path.join(root, f"kernels-{h}.lock"), "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        try:
            path = find()
            if path is None:
                path = bk.build_into(d)
        finally:
            fcntl.flock(lk, fcntl.LOCK_UN)
    return _load_from(path)


def _load():
    mod = None
    try:
        mod = importlib.import_module("dllama_mpi._kernels")
    except ImportError:
        mod = None
    if mod is not None and _sources_present():
        try:
            from . import _build_kernels as bk
            if hasattr(mod.lib, "dl_kernels_build_hash"):
                stale = mod.ffi.string(mod.lib.dl_kernels_build_hash()).decode() != bk.source_hash()
            else:
                stale = True
        except Exception:  # builder unusable (no cffi build deps): keep what we have
            stale = False
        if stale:
            sys.modules.pop("dllama_mpi._kernels", None)
            mod = None
    if mod is None:
        mod = _build_cached()
    return mod


_mod = _load()
ffi = _mod.ffi
lib = _mod.lib

@dataclass(frozen=True)
class Matmul:
    """How the kernels multiply one weight type: `kernel` (out, w, x, rows, cols, batch); for the
    block types the slice is first repacked (`repack`, into `nbytes(rows, cols)` bytes) and several
    matrices with the same input run as one job (`fused`, the kernel's _n form); `q80_input`: x is
    the q80 activation buffer, else f32."""

    kernel: str
    repack: str | None = None
    nbytes: str | None = None
    fused: str | None = None
    q80_input: bool = True


def _rx(name: str) -> Matmul:
    return Matmul(f"dl_matmul_{name}r_q80", f"dl_repack_{name}", f"dl_{name}r_bytes", f"dl_matmul_{name}r_q80_n")


# the weight types a kernel multiplies as they are stored (formats.TYPE_BLOCK has more: those are
# converted to q80 at load)
MATMUL = {F32: Matmul("dl_matmul_f32", q80_input=False), F16: Matmul("dl_matmul_f16_f32", q80_input=False),
          BF16: Matmul("dl_matmul_bf16_f32", q80_input=False),
          Q40: Matmul("dl_matmul_q40r_q80", "dl_repack_q40", "dl_q40r_bytes", "dl_matmul_q40r_q80_n"),
          Q80: Matmul("dl_matmul_q80r_q80", "dl_repack_q80", "dl_q80r_bytes", "dl_matmul_q80r_q80_n"),
          Q4_1: _rx("q41"), Q5_0: _rx("q50"), Q5_1: _rx("q51"), Q2_K: _rx("q2k"), Q3_K: _rx("q3k"),
          Q4_K: _rx("q4k"), Q5_K: _rx("q5k"), Q6_K: _rx("q6k"), IQ4_NL: _rx("iq4nl"), IQ4_XS: _rx("iq4xs")}
# DLLAMA_REPACK=0: q40 / q80 in their plain blocks (the repacked layouts' reference)
MATMUL_PLAIN = {Q40: Matmul("dl_matmul_q40_q80"), Q80: Matmul("dl_matmul_q80_q80")}

ISA_SCALAR, ISA_AVX2, ISA_AVX512, ISA_NEON, ISA_NEON_DOTPROD = (
    lib.DL_ISA_SCALAR, lib.DL_ISA_AVX2, lib.DL_ISA_AVX512, lib.DL_ISA_NEON, lib.DL_ISA_NEON_DOTPROD)
ALL_ISAS = (ISA_SCALAR, ISA_AVX2, ISA_AVX512, ISA_NEON, ISA_NEON_DOTPROD)
ROPE_INTERLEAVED, ROPE_HALF = lib.DL_ROPE_INTERLEAVED, lib.DL_ROPE_HALF


# ---------------------------------------------------------------------------------------------
# runtime settings

def set_threads(n: int) -> None:
    """(Re)creates the persistent thread pool with n threads (1 = calling thread only)."""
    if lib.dl_pool_init(int(n)) != 0:
        raise RuntimeError(f"cannot start a pool of {n} threads")


def n_threads() -> int:
    return lib.dl_pool_nthreads()


def isa_name(isa: int | None = None) -> str:
    return ffi.string(lib.dl_isa_name(lib.dl_get_isa() if isa is None else isa)).decode()


def get_isa() -> int:
    return lib.dl_get_isa()


def isa_supported(isa: int) -> bool:
    return bool(lib.dl_isa_supported(isa))


def supported_isas() -> list[int]:
    return [i for i in ALL_ISAS if lib.dl_isa_supported(i)]


def set_isa(isa: int | str) -> None:
    if isinstance(isa, str):
        names = {isa_name(i): i for i in ALL_ISAS}
        if isa not in names:
            raise ValueError(f"unknown ISA {isa!r}")
        isa = names[isa]
    if not lib.dl_set_isa(int(isa)):
        raise ValueError(f"ISA {isa_name(isa)} is not supported on this CPU/build")


# ---------------------------------------------------------------------------------------------
# pointers

def ptr(arr: np.ndarray, ctype: str = "float"):
    """cffi pointer `ctype *` to the data of a C-contiguous numpy array (no copy, no check of the
    dtype: the caller keeps the array alive)."""
    return ffi.cast(ctype + " *", arr.ctypes.data)


# cffi pointers are made once per buffer (numpy's .ctypes costs microseconds); a token's kernel
# calls pass them, with cheap pointer arithmetic for offsets.
def fptr(a: np.ndarray):
    return ffi.cast("float *", a.ctypes.data)


def qptr(a: np.ndarray):
    return ffi.cast("dl_block_q80 *", a.ctypes.data)


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _u8(a) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(-1)


# ---------------------------------------------------------------------------------------------
# f16 and quantization (allocating convenience wrappers)

def f32_to_f16(x) -> np.ndarray:
    x = _f32(x).reshape(-1)
    return np.array([lib.dl_f32_to_f16(float(v)) for v in x], dtype=np.uint16)


def f16_to_f32(h) -> np.ndarray:
    h = np.ascontiguousarray(h, dtype=np.uint16).reshape(-1)
    return np.array([lib.dl_f16_to_f32(int(v)) for v in h], dtype=np.float32)


def quantize_q80(x) -> np.ndarray:
    x = _f32(x).reshape(-1)
    if x.size % QK:
        raise ValueError("quantize_q80: size must be a multiple of 32")
    out = np.empty(x.size // QK * Q80_BLOCK_BYTES, dtype=np.uint8)
    lib.dl_quantize_q80(ptr(out, "dl_block_q80"), ptr(x), x.size)
    return out


def dequantize_q80(buf, n: int) -> np.ndarray:
    b = _u8(buf)
    if b.size < n // QK * Q80_BLOCK_BYTES:
        raise ValueError("dequantize_q80: buffer too small")
    out = np.empty(n, dtype=np.float32)
    lib.dl_dequantize_q80(ptr(out), ptr(b, "dl_block_q80"), n)
    return out


def dequantize_rows(ftype: int, raw, rows: int, cols: int, ids=None) -> np.ndarray:
    """Rows of a [*, cols] matrix of any formats.TYPE_BLOCK type as float32 [n, cols] (all rows, or
    the rows `ids`): what the embedding lookup does per token."""
    b = _u8(raw)
    idx = None if ids is None else np.ascontiguousarray(ids, dtype=np.int32)
    n = rows if idx is None else idx.size
    out = np.empty((n, cols), dtype=np.float32)
    need = lib.dl_type_row_bytes(ftype, cols) * (rows if idx is None else int(idx.max(initial=-1)) + 1)
    if lib.dl_type_row_bytes(ftype, cols) == 0 or b.size < need:
        raise ValueError(f"dequantize_rows: type {ftype} cannot hold [{rows}, {cols}] in {b.size} bytes")
    lib.dl_dequantize_rows(ftype, ptr(out), ffi.cast("void *", b.ctypes.data),
                           ffi.NULL if idx is None else ptr(idx, "int32_t"), n, cols)
    return out


# where each block type keeps its f16 scales (byte offsets in a block): what random_blocks keeps finite
_F16_FIELDS = {"q40": (0,), "q80": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q2_k": (80, 82),
               "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "iq4_nl": (0,), "iq4_xs": (0,)}


def random_blocks(rng: np.random.Generator, ftype: int, rows: int, cols: int, scale: float = 0.01) -> np.ndarray:
    """A [rows, cols] matrix of weight type `ftype` (formats.TYPE_BLOCK) in its file layout: random
    codes and finite random f16 scales (normal, times `scale`), as uint8 [rows, row bytes]; f32 /
    f16 / bf16 from normal values. For tests and benchmarks of the kernels."""
    from .formats import TYPE_BLOCK, float_type_name

    name = float_type_name(ftype)
    values, nbytes = TYPE_BLOCK[ftype]
    if values == 1:
        v = rng.standard_normal((rows, cols)).astype(np.float32)
        if name == "f16":
            return v.astype(np.float16).view(np.uint8)
        if name == "bf16":
            return (v.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return v.view(np.uint8)
    nb = cols // values
    out = rng.integers(0, 256, size=(rows, nb, nbytes), dtype=np.uint8)
    for at in _F16_FIELDS[name]:
        d = (rng.standard_normal((rows, nb)) * scale).astype(np.float16)
        out[:, :, at:at + 2] = d.view(np.uint8).reshape(rows, nb, 2)
    return np.ascontiguousarray(out.reshape(rows, nb * nbytes))


def quantize_q40(x) -> np.ndarray:
    x = _f32(x).reshape(-1)
    if x.size % QK:
        raise ValueError("quantize_q40: size must be a multiple of 32")
    out = np.empty(x.size // QK * Q40_BLOCK_BYTES, dtype=np.uint8)
    lib.dl_quantize_q40(ptr(out, "dl_block_q40"), ptr(x), x.size)
    return out


def dequantize_q40(buf, n: int) -> np.ndarray:
    b = _u8(buf)
    if b.size < n // QK * Q40_BLOCK_BYTES:
        raise ValueError("dequantize_q40: buffer too small")
    out = np.empty(n, dtype=np.float32)
    lib.dl_dequantize_q40(ptr(out), ptr(b, "dl_block_q40"), n)
    return out


# ---------------------------------------------------------------------------------------------
# matmuls and ops (allocating convenience wrappers; inputs are not modified unless stated)

def _matmul_x_q80(name: str, w_block: str, w_block_bytes: int, w_bytes, x_q80_bytes, rows: int, cols: int,
                  batch: int) -> np.ndarray:
    """out[batch, rows] = W (blocks of `w_block` [rows, cols]) @ x (q80 [batch, cols]) by lib.dl_<name>."""
    w, x = _u8(w_bytes), _u8(x_q80_bytes)
    if cols % QK or w.size < rows * cols // QK * w_block_bytes or \
            x.size < batch * cols // QK * Q80_BLOCK_BYTES:
        raise ValueError(f"{name}: bad shapes")
    out = np.empty((batch, rows), dtype=np.float32)
    getattr(lib, f"dl_{name}")(ptr(out), ptr(w, w_block), ptr(x, "dl_block_q80"), rows, cols, batch)
    return out


def matmul_q40_q80(w_bytes, x_q80_bytes, rows: int, cols: int, batch: int = 1) -> np.ndarray:
    """out[batch, rows] = W (q40 [rows, cols]) @ x (q80 [batch, cols])."""
    return _matmul_x_q80("matmul_q40_q80", "dl_block_q40", Q40_BLOCK_BYTES, w_bytes, x_q80_bytes, rows, cols, batch)


def matmul_q80_q80(w_bytes, x_q80_bytes, rows: int, cols: int, batch: int = 1) -> np.ndarray:
    """out[batch, rows] = W (q80 [rows, cols]) @ x (q80 [batch, cols])."""
    return _matmul_x_q80("matmul_q80_q80", "dl_block_q80", Q80_BLOCK_BYTES, w_bytes, x_q80_bytes, rows, cols, batch)


def matmul_f16_f32(w_f16, x, rows: int, cols: int, batch: int = 1) -> np.ndarray:
    """out[batch, rows] = W (f16 bits [rows, cols]) @ x (f32 [batch, cols])."""
    w = np.ascontiguousarray(w_f16).view(np.uint16).reshape(-1)
    x = _f32(x).reshape(-1)
    if w.size < rows * cols or x.size < batch * cols:
        raise ValueError("matmul_f16_f32: bad shapes")
    out = np.empty((batch, rows), dtype=np.float32)
    lib.dl_matmul_f16_f32(ptr(out), ptr(w, "uint16_t"), ptr(x), rows, cols, batch)
    return out


def matmul_f32(w, x, rows: int | None = None, cols: int | None = None, batch: int | None = None) -> np.ndarray:
    w = _f32(w)
    x = _f32(x)
    rows = w.shape[0] if rows is None else rows
    cols = w.size // rows if cols is None else cols
    batch = x.size // cols if batch is None else batch
    out = np.empty((batch, rows), dtype=np.float32)
    lib.dl_matmul_f32(ptr(out), ptr(w), ptr(x), rows, cols, batch)
    return out


def rmsnorm(x, w, eps: float) -> np.ndarray:
    w = _f32(w)
    n = w.size
    x = _f32(x)
    batch = x.size // n
    out = np.empty_like(x)
    lib.dl_rmsnorm(ptr(out), ptr(x), ptr(w), n, eps, batch)
    return out


def silu_mul(gate, up, n: int | None = None) -> np.ndarray:
    """silu(gate) * up on rows of n values (default: one row)."""
    g, u = _f32(gate), _f32(up)
    n = g.size if n is None else n
    out = np.empty_like(g)
    lib.dl_silu_mul(ptr(out), ptr(g), ptr(u), n, g.size // n if n else 0)
    return out


def gelu_mul(gate, up) -> np.ndarray:
    """GeGLU: gelu_tanh(gate) * up."""
    g, u = _f32(gate), _f32(up)
    out = np.empty_like(g)
    lib.dl_gelu_mul(ptr(out), ptr(g), ptr(u), g.size)
    return out


def scale(x, s: float) -> np.ndarray:
    o = _f32(x).copy()
    lib.dl_scale(ptr(o), s, o.size)
    return o


def add(out, a) -> np.ndarray:
    o = _f32(out).copy()
    a = _f32(a)
    lib.dl_add(ptr(o), ptr(a), o.size)
    return o


def add_q80(out, parts_bytes, nparts: int) -> np.ndarray:
    o = _f32(out).copy()
    p = _u8(parts_bytes)
    lib.dl_add_q80(ptr(o), ptr(p, "dl_block_q80"), nparts, o.size)
    return o


def softmax(x) -> np.ndarray:
    o = _f32(x).copy()
    lib.dl_softmax(ptr(o), o.size)
    return o


def _positions(pos, batch: int) -> np.ndarray:
    """Per-row positions: an int is the first row's position (rows follow one another)."""
    if np.ndim(pos) == 0:
        return np.arange(int(pos), int(pos) + batch, dtype=np.int32)
    p = np.ascontiguousarray(pos, dtype=np.int32)
    if p.size != batch:
        raise ValueError(f"{p.size} positions for {batch} rows")
    return p


def rope(x, n_heads: int, head_dim: int, pos, rope_type: int, freqs) -> np.ndarray:
    """RoPE on rows of n_heads * head_dim; pos: the first row's position, or one per row."""
    o = _f32(x).copy()
    f = _f32(freqs)
    batch = o.size // (n_heads * head_dim)
    p = _positions(pos, batch)
    lib.dl_rope(ptr(o), n_heads, head_dim, ptr(p, "int32_t"), batch, rope_type, ptr(f))
    return o


def attention_paged(q, k_cache, v_cache, kv_of_q, n_q_heads: int, n_kv_heads: int, head_dim: int,
                    pos, slot, tables, page_size: int, ring_pages: int = 0, window: int = 0,
                    scale_div: float | None = None, per_row: bool = False) -> np.ndarray:
    """Attention of q's rows over a paged cache (see dl_attention in kernels/dllama.h); per_row:
    dl_attention_rows, its one-task-per-(row, head) reference."""
    q = _f32(q)
    k, v = _f32(k_cache), _f32(v_cache)
    m = np.ascontiguousarray(kv_of_q, dtype=np.int32)
    batch = q.size // (n_q_heads * head_dim)
    p = _positions(pos, batch)
    s = np.ascontiguousarray(np.broadcast_to(slot, (batch,)), dtype=np.int32)
    t = np.ascontiguousarray(tables, dtype=np.int32)
    t = t.reshape(1, -1) if t.ndim == 1 else t
    kv = ffi.new("dl_kv_pages *", {"tables": ptr(t, "int32_t"), "table_stride": t.shape[1],
                                  "page_size": page_size, "ring_pages": ring_pages})
    out = np.empty_like(q)
    fn = lib.dl_attention_rows if per_row else lib.dl_attention
    fn(ptr(out), ptr(q), ptr(k), ptr(v), ptr(m, "int32_t"), n_q_heads, n_kv_heads, head_dim,
       ptr(p, "int32_t"), ptr(s, "int32_t"), batch, kv, window,
       float(np.sqrt(np.float32(head_dim))) if scale_div is None else scale_div)
    return out


def attention(q, k_cache, v_cache, kv_of_q, n_q_heads: int, n_kv_heads: int, head_dim: int,
              pos0: int) -> np.ndarray:
    """Attention over a contiguous cache (rows = positions): one page holding every row."""
    rows = np.asarray(k_cache).size // (n_kv_heads * head_dim)
    return attention_paged(q, k_cache, v_cache, kv_of_q, n_q_heads, n_kv_heads, head_dim, pos0, 0,
                           np.zeros(1, np.int32), max(rows, 1))
