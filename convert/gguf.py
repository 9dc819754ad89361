"""GGUF file -> Distributed Llama `.m` model and `.t` tokenizer.

Every command runs a GGUF as it is (`--model FILE.gguf`, dllama_mpi/gguf.py, which this converter
reads it with: the same header, tokenizer and tensor checks). Converting is for users who want
Distributed Llama files: `--weights q40 | q80 | f16 | f32` writes one type; `auto` (the default)
keeps each matrix's quality in Distributed Llama's own types (AUTO_TYPES); `native` keeps every
tensor block for block in its GGUF type (dllama-mpi's type table extension, FORMATS-EXT.md "Weight
types": Distributed Llama cannot read such a file, dllama-mpi runs it exactly as the GGUF).
A tensor whose stored type is the written type is copied bit for bit; others are dequantized
(dl_dequantize_rows, else gguf-py) row chunk by row chunk and encoded (FORMATS §2). q40 from other
types: DL's exact encoder for float tensors; tensors that were already quantized get the
error-minimizing encoder (common.quantize_q40_rmse).

Q/K row order. llama.cpp's `convert_hf_to_gguf.py` permutes the rows of q_proj / k_proj of llama
models with `reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)` (n_head
= n_kv_heads for k) so that ggml's normal (adjacent-pair) rope reproduces HF's rotate_half rope. That
is exactly DL's permutation (FORMATS §1.5), and DL's LLAMA rope is the same adjacent-pair rope, so
`blk.N.attn_q` / `attn_k` of a llama GGUF are already in DL's order and are copied unchanged. Qwen3
and Gemma 3 GGUFs are not permuted (ggml uses NeoX rope for them), which is DL's FALCON rope: also
copied unchanged.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from dllama_mpi import gguf as G
from dllama_mpi.errors import ConvertError, DllamaError
from dllama_mpi.formats import (BF16, F16, F32, MATRIX_NAMES, Q40, Q80, TYPE_BLOCK, ModelHeader, float_type_name,
                                set_matrix_types, tensor_layout, write_tokenizer)

from .common import TensorSource, check_header_for_weights, parse_weights_type, summarize_stats, write_model

# `--weights auto`: the .m type that keeps each stored type's values. Q4_0 and Q8_0 are DL's q40 / q80
# blocks byte for byte (copied), F16 / F32 too; BF16 becomes f16 (same size, 3 more mantissa bits,
# narrower range); every other type (Q4_1, Q5_x, K-quants, IQ...) is dequantized and stored as q80,
# whose 8-bit codes per 32 values keep them to within the q80 rounding of the source values.
AUTO_TYPES = {F32: F32, F16: F16, BF16: F16, Q40: Q40, Q80: Q80}


class GGUFFile(G.GGUFFile):
    """The runtime's GGUF reader, with the converter's view of its tensors: TensorSources in .m order."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise ConvertError(f"{path}: file not found")
        super().__init__(path)
        self.arch = self.get("general.architecture")

    def header(self) -> ModelHeader:
        return G.header_from_gguf(self)

    def source(self, s: G.Source, t) -> TensorSource:
        """The TensorSource of one .m tensor stored at s (rows read as float32, or copied as stored)."""
        ggml_type, stored, rows, cols = s.tensor.ggml_type, s.ftype, s.rows, t.cols
        row_bytes = s.nbytes // rows
        name = s.tensor.name + (f"[{t.expert}]" if t.expert >= 0 else "")

        def raw(r0, r1):
            return bytes(self.data(s.tensor.part, s.offset + r0 * row_bytes, (r1 - r0) * row_bytes))

        def read(r0, r1):
            from dllama_mpi.weights import convert_rows

            data = self.data(s.tensor.part, s.offset + r0 * row_bytes, (r1 - r0) * row_bytes)
            try:
                out = convert_rows(data, stored, ggml_type, r1 - r0, cols, F32, f"{self.path}: tensor {name}")
            except DllamaError as e:
                raise ConvertError(str(e)) from None
            return out.view(np.float32).reshape(r1 - r0, cols)

        return TensorSource(name, rows, cols, read, quantized=stored not in (F32, F16, BF16), raw_ftype=stored,
                            raw=raw, source_type=s.tensor.type_name)


def gguf_sources(g: GGUFFile, h: ModelHeader, src: dict):
    """The GGUF tensors in .m order (formats.tensor_layout). No q/k permutation: see the module docstring."""
    for t in tensor_layout(h, 0):
        yield g.source(src[t.key], t)


def matrix_types(h: ModelHeader, src: dict, weights: str) -> tuple[list[int], int]:
    """(the .m type of every matrix, the embedding's type) for `weights` auto / native / one type."""
    types, embed = [], F32
    for t in tensor_layout(h, 0):
        stored = src[t.key].ftype
        if t.name == "embed" and weights == "native":
            embed = stored if stored is not None else Q80
        if t.name not in MATRIX_NAMES:
            continue
        if weights == "auto":
            types.append(AUTO_TYPES.get(stored, Q80))
        elif weights == "native":
            types.append(stored if stored in TYPE_BLOCK else Q80)
        else:
            types.append(parse_weights_type(weights))
    return types, embed


def convert_gguf_model(path: str | os.PathLike, out_path: str | os.PathLike, weights: str = "auto",
                       quiet: bool = False, g: GGUFFile | None = None, q40_method: str = "auto") -> ModelHeader:
    """Convert the model. `weights`: "auto" (default) keeps each matrix's quality in DL's types
    (AUTO_TYPES; a file whose matrices end up with different types gets the per-matrix type table,
    FORMATS-EXT.md), "native" every tensor's GGUF type, or one type for every matrix. A matrix
    already stored in its .m type is copied bit for bit. `q40_method` "auto" (default): tensors
    stored quantized in the GGUF (Q4_1, Q8_0, K-quants...) are re-quantized to q40 with the
    error-minimizing encoder (quantize_q40_rmse), because DL's max/-8 rule on top of an earlier
    quantization loses more; float tensors use DL's exact encoder. "dllama" / "rmse" force one."""
    g = g or GGUFFile(path)
    weights = weights.lower() if isinstance(weights, str) else float_type_name(weights)
    if weights not in ("auto", "native"):
        parse_weights_type(weights)
    h = g.header()
    src = G.sources(g, h)
    types, h.embed_type = matrix_types(h, src, weights)
    set_matrix_types(h, types)
    check_header_for_weights(h, g.path)
    stats: dict = {}
    write_model(out_path, h, gguf_sources(g, h, src), quiet=quiet, desc=os.path.basename(os.fspath(out_path)),
                q40_method=q40_method, stats=stats)
    if not quiet:
        for line in summarize_stats(stats):
            print(f"{os.path.basename(os.fspath(out_path))}: {line}", file=sys.stderr)
    return h


def gguf_tokenizer_data(g: GGUFFile):
    return G.tokenizer_data(g)


def convert_gguf_tokenizer(path, out_path, g: GGUFFile | None = None):
    g = g or GGUFFile(path)
    data = G.tokenizer_data(g)
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(out_path))), exist_ok=True)
    write_tokenizer(out_path, data)
    return data


def convert_gguf(path, out_model=None, out_tokenizer=None, weights: str = "auto", quiet: bool = False,
                 q40_method: str = "auto"):
    """Convert a GGUF file's model and/or tokenizer. Returns (header or None, tokenizer data or None)."""
    g = GGUFFile(path)
    try:
        h = t = None
        if out_tokenizer is not None:
            t = convert_gguf_tokenizer(path, out_tokenizer, g)
        if out_model is not None:
            h = convert_gguf_model(path, out_model, weights, quiet, g, q40_method=q40_method)
        return h, t
    finally:
        g.close()


__all__ = ["AUTO_TYPES", "GGUFFile", "convert_gguf", "convert_gguf_model", "convert_gguf_tokenizer",
           "gguf_sources", "gguf_tokenizer_data", "matrix_types"]
