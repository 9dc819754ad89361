"""Shared pieces of the converters: DL's q40 encoder, the row-chunked tensor writer, atomic output.

A converter describes each tensor as a `TensorSource` (shape + a function that returns rows
[r0, r1) as float32), and `ModelWriter` quantizes/writes it chunk by chunk, so at most one chunk of
one tensor (plus whatever the source itself holds) is in memory at a time.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dllama_mpi.errors import ConvertError
# byte-level BPE vocabularies: shared with the GGUF reader
from dllama_mpi.gguf import byte_level_token_bytes, gpt2_unicode_to_bytes  # noqa: F401
from dllama_mpi.formats import (BLOCK, F16, F32, FLOAT_NAMES, Q40, Q80, ModelHeader, float_type_name,
                                tensor_layout, write_model_header)

# about 16 MiB of float32 per chunk
CHUNK_ELEMENTS = 4 * 1024 * 1024

WEIGHT_TYPES = {"q40": Q40, "q80": Q80, "f16": F16, "f32": F32}


def parse_weights_type(name: str) -> int:
    try:
        return WEIGHT_TYPES[name.lower()]
    except KeyError:
        raise ConvertError(f"unsupported weights type {name!r} (expected one of: {', '.join(WEIGHT_TYPES)})") from None


# ---------------------------------------------------------------------------------------------
# Q40 (FORMATS §2.1), exactly DL's numpy rule, computed in float32

def quantize_q40(x: np.ndarray) -> np.ndarray:
    """Quantize float32 values (any shape, size a multiple of 32) to Q40 blocks: uint8 [n/32, 18].

    Bit-exact with DL's converter: m = max if max >= -min else min; d = m / -8 (f32, stored as
    f16 round-to-nearest-even); codes = trunc(min(x * (1/d) + 8.5, 15)) with the f32 d.
    """
    g = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, BLOCK)
    gmax = g.max(axis=1)
    gmin = g.min(axis=1)
    deltas = np.divide(np.where(-gmin > gmax, gmin, gmax), np.float32(-8)).astype(np.float32, copy=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(deltas != 0, np.float32(1.0) / deltas, np.float32(0)).astype(np.float32, copy=False)
    v = g * inv[:, None]
    v += np.float32(8.5)
    np.minimum(v, np.float32(15), out=v)     # DL: where(v < 15, v, 15)
    np.maximum(v, np.float32(0), out=v)      # int() truncates toward zero: (-1, 0) -> 0 as well
    codes = v.astype(np.uint8)               # truncation of non-negative values
    out = np.empty((g.shape[0], 18), dtype=np.uint8)
    out[:, 0:2] = deltas.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = codes[:, :16] | (codes[:, 16:] << 4)
    return out


# Error-minimizing q40 (same block format, different choice of scale and codes). Used for sources
# that are already quantized (GGUF): re-quantizing their values with DL's max/-8 rule compounds two
# roundings and loses too much (SmolLM2-135M Q4_1 -> q40 stops answering simple questions).
#
# Per block, like llama.cpp's make_qx_quants: try scales d = m / L for a grid of target levels L on both
# sides (m = the value of largest magnitude mapped to about -8 or about +7), round the codes to the
# nearest level in [-8, 7], refit d by weighted least squares for those codes, and keep the (f16) d
# with the smallest weighted squared error. DL's own d = m / -8 is one of the candidates.

RMSE_LEVELS = tuple(np.round(np.concatenate([-8 - np.arange(-9, 10) * 0.1, 7 + np.arange(-9, 10) * 0.1]), 2))
RMSE_CHUNK_BLOCKS = 1 << 16


def _q40_codes(g: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Nearest codes in [-8, 7] (as float32) for scales d (float32 [n])."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0)).astype(np.float32, copy=False)
    q = np.rint(g * inv[:, None])
    np.clip(q, -8, 7, out=q)
    return q


def _f16_round(d: np.ndarray) -> np.ndarray:
    return d.astype(np.float16).astype(np.float32)


def _sq_err(g, q, d, w):
    e = g - q * d[:, None]
    e *= e
    if w is not None:
        e *= w
    return e.sum(axis=1)


def _dot(a, b, w):
    return np.einsum("ij,ij->i", a, b) if w is None else np.einsum("ij,ij,ij->i", a, b, w)


def _rmse_chunk(g: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best (f16-exact) scales and codes for float32 blocks g [n, 32], error weighted by w [n, 32]."""
    n = g.shape[0]
    idx = np.abs(g).argmax(axis=1)
    m = g[np.arange(n), idx]
    best_d = _f16_round(m / np.float32(-8))          # DL's rule first
    best_q = _q40_codes(g, best_d)
    best_e = _sq_err(g, best_q, best_d, w)
    for level in RMSE_LEVELS:
        d = _f16_round((m / np.float32(level)).astype(np.float32))
        q = _q40_codes(g, d)
        qq = _dot(q, q, w)                           # least-squares refit of d for these codes
        with np.errstate(divide="ignore", invalid="ignore"):
            d = _f16_round(np.where(qq > 0, _dot(g, q, w) / qq, d).astype(np.float32))
        e = _sq_err(g, q, d, w)
        better = e < best_e
        if better.any():
            best_e = np.where(better, e, best_e)
            best_d = np.where(better, d, best_d)
            best_q[better] = q[better]
    # codes nearest to the chosen d (never worse for an unweighted error; checked when weighted)
    q = _q40_codes(g, best_d)
    e = _sq_err(g, q, best_d, w)
    better = e < best_e
    best_q[better] = q[better]
    return best_d, best_q


def quantize_q40_rmse(x: np.ndarray, col_weights: np.ndarray | None = None) -> np.ndarray:
    """Q40 blocks (uint8 [n/32, 18], FORMATS §2.1 layout) with per-block scales chosen to minimize a
    weighted squared error instead of DL's d = max / -8 rule. Decodes with the same (code - 8) * d.

    The error of value x in a block is weighted by s² + x² (s² = the block's mean square), as
    llama.cpp does without an importance matrix: plain squared error gives up the few large weights
    for the many small ones and measurably hurts the model more than DL's rule does.
    `col_weights` (optional, [cols] for x of shape [rows, cols]): an extra per-column importance,
    e.g. the mean square of the inputs the matrix multiplies."""
    x = np.asarray(x, dtype=np.float32)
    g_all = np.ascontiguousarray(x).reshape(-1, BLOCK)
    cw_all = None
    if col_weights is not None:
        cw = np.asarray(col_weights, dtype=np.float32).reshape(-1)
        cw_all = np.broadcast_to(cw, (x.size // cw.size, cw.size)).reshape(-1, BLOCK)
    out = np.empty((g_all.shape[0], 18), dtype=np.uint8)
    for b0 in range(0, g_all.shape[0], RMSE_CHUNK_BLOCKS):
        g = g_all[b0:b0 + RMSE_CHUNK_BLOCKS]
        w = g * g
        w += w.mean(axis=1, keepdims=True)
        if cw_all is not None:
            w *= cw_all[b0:b0 + RMSE_CHUNK_BLOCKS]
        d, q = _rmse_chunk(g, w)
        out[b0:b0 + g.shape[0]] = pack_q40(d, q)
    return out


def pack_q40(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """f16-exact scales d [n] and codes q in [-8, 7] ([n, 32]) -> Q40 blocks uint8 [n, 18]."""
    codes = (np.asarray(q) + 8).astype(np.uint8)
    out = np.empty((codes.shape[0], 18), dtype=np.uint8)
    out[:, 0:2] = np.asarray(d, dtype=np.float32).astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = codes[:, :16] | (codes[:, 16:] << 4)
    return out


Q40_METHODS = {"dllama": quantize_q40, "rmse": quantize_q40_rmse}


def dequantize_q40(blocks: np.ndarray) -> np.ndarray:
    """Inverse of quantize_q40 (for tests): uint8 [n, 18] -> float32 [n * 32]."""
    b = np.asarray(blocks, dtype=np.uint8).reshape(-1, 18)
    d = b[:, 0:2].copy().view("<f2").astype(np.float32)
    qs = b[:, 2:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32) - 8
    return (codes * d).reshape(-1)


def quantize_q80(x: np.ndarray) -> np.ndarray:
    """Q80 blocks (FORMATS §2.2, half to even): uint8 [n/32, 34]."""
    g = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, BLOCK)
    d = (np.abs(g).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0)).astype(np.float32)
    q = np.rint(g * inv[:, None]).astype(np.int8)
    out = np.empty((g.shape[0], 34), dtype=np.uint8)
    out[:, 0:2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out


def parse_q40_method(name: str):
    if name == "auto":
        return None
    try:
        return Q40_METHODS[name.lower()]
    except KeyError:
        raise ConvertError(f"unknown q40 method {name!r} (expected one of: auto, {', '.join(Q40_METHODS)})") from None


def encode_rows(x: np.ndarray, ftype: int, q40_method: str = "dllama") -> bytes:
    if ftype == F32:
        return np.ascontiguousarray(x, dtype="<f4").tobytes()
    if ftype == F16:
        return np.ascontiguousarray(x, dtype="<f2").tobytes()
    if ftype == Q40:
        return parse_q40_method(q40_method)(x).tobytes()
    if ftype == Q80:
        return quantize_q80(x).tobytes()
    raise ConvertError(f"cannot write weights of type {float_type_name(ftype)}")


# ---------------------------------------------------------------------------------------------
# tensor sources

@dataclass
class TensorSource:
    """A 2-D tensor, readable by row ranges as float32. 1-D tensors are [1, n]."""

    name: str                                   # for messages
    rows: int
    cols: int
    read: Callable[[int, int], np.ndarray]      # (r0, r1) -> float32 [r1 - r0, cols]
    row_align: int = 1                          # chunks must start/end on multiples of this
    quantized: bool = False                     # the stored values are already quantized (GGUF Q*/K types)
    raw_ftype: int | None = None                # the stored bytes are already this .m float type ...
    raw: Callable[[int, int], bytes] | None = None   # ... and raw(r0, r1) returns them (copied as is)
    source_type: str = "F32"                    # the stored type's name, for the conversion summary

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)


def permute_rows_source(src: TensorSource, n_heads: int) -> TensorSource:
    """DL's LLAMA q/k permutation (FORMATS §1.5) applied lazily, head by head.

    reshape [n, 2, hd/2, dim] -> swap axes 1, 2 -> [n, hd/2, 2, dim]: stored row h*hd + 2i + j is
    source row h*hd + j*hd/2 + i.
    """
    if n_heads <= 0 or src.rows % n_heads or (src.rows // n_heads) % 2:
        raise ConvertError(f"{src.name}: {src.rows} rows cannot be split into {n_heads} heads of even size")
    hd = src.rows // n_heads

    def read(r0, r1):
        x = src.read(r0, r1)
        n = (r1 - r0) // hd
        return x.reshape(n, 2, hd // 2, src.cols).swapaxes(1, 2).reshape(r1 - r0, src.cols)

    return TensorSource(src.name, src.rows, src.cols, read, row_align=_lcm(hd, src.row_align))


def _lcm(a, b):
    import math
    return a * b // math.gcd(a, b)


def array_source(name: str, a: np.ndarray) -> TensorSource:
    a = np.asarray(a)
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2:
        raise ConvertError(f"{name}: expected a 1-D or 2-D tensor, got shape {tuple(a.shape)}")
    return TensorSource(name, a.shape[0], a.shape[1], lambda r0, r1: np.asarray(a[r0:r1], dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# output

def progress(total: int, desc: str, quiet: bool):
    """A tqdm bar on stderr (bytes), disabled when quiet or stderr is not a terminal."""
    from tqdm import tqdm

    disable = quiet or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                disable=disable, leave=False)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb"):
    """Write to `<path>.partial`; rename over `path` only when the block finishes without error."""
    path = os.fspath(path)
    tmp = path + ".partial"
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    f = open(tmp, mode)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_header_for_weights(h: ModelHeader, where: str) -> None:
    for t in h.matrix_types:
        if t not in (Q40, Q80):
            continue
        for name, n in (("dim", h.dim), ("q_dim", h.q_dim), ("hidden_dim", h.hidden_dim),
                        ("moe_hidden_dim", h.moe_hidden_dim)):
            if n % BLOCK:
                raise ConvertError(f"{where}: {name} {n} is not a multiple of {BLOCK}, required for "
                                   f"{FLOAT_NAMES[t]} weights (use f32 or f16)")


def summarize_stats(stats: dict) -> list[str]:
    """One line per (source type -> .m type): how many tensors and what was done."""
    return [f"{src} -> {float_type_name(dst)}: {n} tensor{'s' if n != 1 else ''} {what}"
            for (src, dst, what), n in sorted(stats.items(), key=lambda kv: (kv[0][0], kv[0][1]))]


def write_model(path: str | os.PathLike, header: ModelHeader, sources: list[TensorSource | None],
                quiet: bool = False, desc: str = "converting", q40_method: str = "dllama",
                stats: dict | None = None) -> int:
    """Write header + tensors (in tensor_layout order) atomically; returns the file size.

    A source whose stored bytes already are the tensor's .m type (`raw_ftype`, e.g. GGUF Q8_0 for
    q80) is copied unchanged. `stats`, if given, counts tensors per (source type, .m type, what
    was done: copied / quantized / converted).

    `q40_method`: "dllama" (DL's exact encoder, the default), "rmse" (quantize_q40_rmse), or "auto":
    rmse for sources marked `quantized` (re-quantization), DL's encoder for float sources.

    `sources` may be a lazy iterable; each item must match the next entry of tensor_layout(header).
    """
    parse_q40_method(q40_method)
    header_size = header.header_nbytes()
    layout = tensor_layout(header, header_size)
    total = layout[-1].offset + layout[-1].nbytes
    with atomic_output(path) as f, progress(total, desc, quiet) as bar:
        write_model_header(f, header)
        bar.update(header_size)
        it = iter(sources)
        for info in layout:
            try:
                src = next(it)
            except StopIteration:
                raise ConvertError(f"internal: fewer tensors than the layout needs (stopped at {info.name})") from None
            if (src.rows, src.cols) != (info.rows, info.cols):
                raise ConvertError(f"{src.name}: shape {src.shape} does not match the header "
                                   f"(expected [{info.rows}, {info.cols}] for {info.name}, layer {info.layer})")
            if info.ftype in (Q40, Q80) and src.cols % BLOCK:
                raise ConvertError(f"{src.name}: {src.cols} columns is not a multiple of {BLOCK}, "
                                   f"required for {float_type_name(info.ftype)} weights (use f32)")
            written = 0
            copy = src.raw is not None and src.raw_ftype == info.ftype   # bit-exact, no re-encoding
            if stats is not None:
                key = (src.source_type, info.ftype, "copied" if copy else
                       ("converted" if info.ftype in (F16, F32) else "quantized"))
                stats[key] = stats.get(key, 0) + 1
            step = max(1, CHUNK_ELEMENTS // max(1, src.cols))
            if src.row_align > 1:
                step = max(src.row_align, step // src.row_align * src.row_align)
            method = q40_method if q40_method != "auto" else ("rmse" if src.quantized else "dllama")
            for r0 in range(0, src.rows, step):
                r1 = min(src.rows, r0 + step)
                if copy:
                    data = src.raw(r0, r1)
                elif method == "dllama":
                    data = encode_rows(src.read(r0, r1), info.ftype)
                else:
                    data = encode_rows(src.read(r0, r1), info.ftype, method)
                f.write(data)
                written += len(data)
                bar.update(len(data))
            if written != info.nbytes:
                raise ConvertError(f"internal: {src.name} wrote {written} bytes, expected {info.nbytes}")
        if f.tell() != total:
            raise ConvertError(f"internal: wrote {f.tell()} bytes, expected {total}")
    return total


# ---------------------------------------------------------------------------------------------
# tokenizer helpers

def sentencepiece_vocab(tokens: list[str], types, where: str):
    """dllama_mpi.gguf.sentencepiece_vocab, with ConvertError for a converter's input."""
    from dllama_mpi.gguf import sentencepiece_vocab as vocab

    return vocab(tokens, types, where, ConvertError)


def sentencepiece_token_bytes(token: str) -> bytes:
    """A SentencePiece piece -> bytes: `<0xNN>` is that byte, `▁` is a space."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace("\u2581", " ").encode("utf-8")
