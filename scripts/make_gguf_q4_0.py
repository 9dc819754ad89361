#!/usr/bin/env python3
"""Write a random-weight Q4_0 GGUF (arch "llama") for speed comparisons with llama.cpp.

Default shape = Llama-3.2-1B, the same as bench/llama3.2-1b-q40.m: dim 2048, hidden 8192,
16 layers, 32 heads, 8 kv heads, vocab 128256, tied embedding (no output.weight).
Q4_0 blocks (f16 scale + 16 bytes of nibbles) are generated directly and streamed to
the file tensor by tensor, so memory stays at about one tensor.  The tokenizer is a
dummy "gpt2" (byte-level) vocabulary: enough for llama.cpp to load the model and for
llama-bench, which feeds random tokens; it cannot tokenize real text meaningfully.

    .venv/bin/python scripts/make_gguf_q4_0.py /tmp/llama3.2-1b-q4_0-random.gguf

`--type f16` writes F16 matrices instead (N(0, 0.02) values): the source for `llama-quantize ... Q8_0`,
whose output `dllama-mpi convert gguf` turns into a q80 .m with the very same Q8_0 blocks (the q80 vs
llama.cpp Q8_0 decode comparison, scripts/bench_q80.sh). `--type bf16` writes the same values as BF16:
the source `llama-quantize` turns into any quant type (scripts/bench_gguf.sh: Q4_K_M, Q6_K ...).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import gguf

QK = 32            # Q4_0 block: 32 weights
BLOCK_BYTES = 18   # f16 scale + 16 bytes of packed nibbles


def bytes_to_unicode() -> list[str]:
    """GPT-2 byte-level alphabet: one printable character per byte value (the GGUF reader's table,
    inverted)."""
    from dllama_mpi.gguf import gpt2_unicode_to_bytes

    by_byte = {b: c for c, b in gpt2_unicode_to_bytes().items()}
    return [by_byte[b] for b in range(256)]


def q4_0_random(rows: int, cols: int, rng: np.random.Generator,
                lo: float = 0.01, hi: float = 0.05) -> np.ndarray:
    """Random Q4_0 data for a (rows, cols) matrix, as uint8 (rows, cols/32*18)."""
    assert cols % QK == 0
    nb = cols // QK
    blocks = rng.integers(0, 256, size=(rows, nb, BLOCK_BYTES), dtype=np.uint8)
    scales = rng.uniform(lo, hi, size=(rows, nb)).astype(np.float16)
    blocks[:, :, 0:2] = scales.view(np.uint8).reshape(rows, nb, 2)
    return blocks.reshape(rows, nb * BLOCK_BYTES)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--type", choices=["q4_0", "f16", "bf16"], default="q4_0", help="type of the matrices")
    a = ap.parse_args()
    f16 = a.type in ("f16", "bf16")

    rng = np.random.default_rng(a.seed)
    head_dim = a.dim // a.heads
    kv_dim = head_dim * a.kv_heads

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name(f"random-llama3.2-1b-{a.type}")
    w.add_context_length(a.ctx)
    w.add_embedding_length(a.dim)
    w.add_feed_forward_length(a.hidden)
    w.add_block_count(a.layers)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(a.vocab)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[a.type])

    # Minimal byte-level BPE vocabulary.
    byte_toks = bytes_to_unicode()
    bos, eos = a.vocab - 256, a.vocab - 255   # like Llama 3: 128000 / 128001
    tokens: list[str] = []
    types: list[int] = []
    for i in range(a.vocab):
        if i < 256:
            tokens.append(byte_toks[i])
            types.append(gguf.TokenType.NORMAL)
        elif i >= a.vocab - 256:
            tokens.append(f"<|special_{i}|>")
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(f"t{i}")
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["t 1"])  # llama.cpp requires the key; one merge is enough
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)

    # Tensor directory: (name, numpy shape = (rows, cols), kind)
    Q4 = gguf.GGMLQuantizationType.Q4_0
    plan: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (a.vocab, a.dim), "q")]
    for l in range(a.layers):
        p = f"blk.{l}."
        plan += [
            (p + "attn_norm.weight", (a.dim,), "n"),
            (p + "attn_q.weight", (a.dim, a.dim), "q"),
            (p + "attn_k.weight", (kv_dim, a.dim), "q"),
            (p + "attn_v.weight", (kv_dim, a.dim), "q"),
            (p + "attn_output.weight", (a.dim, a.dim), "q"),
            (p + "ffn_norm.weight", (a.dim,), "n"),
            (p + "ffn_gate.weight", (a.hidden, a.dim), "q"),
            (p + "ffn_up.weight", (a.hidden, a.dim), "q"),
            (p + "ffn_down.weight", (a.dim, a.hidden), "q"),
        ]
    plan.append(("output_norm.weight", (a.dim,), "n"))  # tied: no output.weight

    for name, shape, kind in plan:
        if kind == "q" and a.type == "bf16":
            w.add_tensor_info(name, shape, np.dtype(np.uint16), shape[0] * shape[1] * 2,
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif kind == "q" and f16:
            w.add_tensor_info(name, shape, np.dtype(np.float16), shape[0] * shape[1] * 2)
        elif kind == "q":
            rows, cols = shape
            nbytes = rows * (cols // QK) * BLOCK_BYTES
            # byte shape + uint8 dtype -> writer converts to the element shape
            w.add_tensor_info(name, (rows, cols // QK * BLOCK_BYTES), np.dtype(np.uint8),
                              nbytes, raw_dtype=Q4)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = 0
    for name, shape, kind in plan:
        if kind == "q" and f16:
            t = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
            # bf16: round to nearest even of the top 16 bits (gguf-py's rule)
            t = gguf.quants.quantize(t, gguf.GGMLQuantizationType.BF16).view(np.uint16) if a.type == "bf16" \
                else t.astype(np.float16)
        elif kind == "q":
            t = q4_0_random(shape[0], shape[1], rng)
        else:
            t = rng.uniform(0.8, 1.2, size=shape).astype(np.float32)
        w.write_tensor_data(t)
        total += t.nbytes
    w.close()
    print(f"wrote {a.out}: {len(plan)} tensors, {total / 1e6:.1f} MB of tensor data", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
