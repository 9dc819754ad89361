"""Synthetic .m / .t files with real model shapes and random weights, for benchmarks.

No torch, no download: every tensor is generated with numpy and streamed to disk one at a time
(memory stays at one tensor). q40 tensors are written directly as random blocks: an f16 scale of a
realistic magnitude (|d| in [0.004, 0.008], like a q40 of N(0, 0.02) weights) and random nibbles.
The embedding (f32) is small uniform noise, norms are ones (so activations keep a sane scale).

    python scripts/make_synthetic.py llama3.2-1b [--out bench/] [--float-type q40]
    python scripts/make_synthetic.py all --out /tmp/synth

Presets: llama3.2-1b, llama3.1-8b, qwen3-0.6b, qwen3-30b-a3b-like (Qwen3-30B-A3B's layer shape:
dim 2048, 128 experts, 8 active, moe_hidden 768, but 8 layers instead of 48 so the file is
~2.8 GB instead of ~16 GB; --layers overrides any preset's layer count).

Writes <out>/<preset>-<ftype>.m and <out>/<preset>.t (a byte-level vocabulary of the right size:
256 byte tokens, then distinct lowercase strings whose every prefix is a token, so BPE merges
work, then the model family's special tokens at the end).
"""

from __future__ import annotations

import argparse
import itertools
import os
import string
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dllama_mpi.formats import (ARCH_LLAMA, ARCH_QWEN3, ARCH_QWEN3_MOE, F32, FLOAT_BY_NAME, Q40,  # noqa: E402
                                ROPE_FALCON, ROPE_LLAMA3_1, ModelHeader, TokenizerData, tensor_layout,
                                write_model_header, write_tokenizer)

PRESETS = {
    "llama3.2-1b": dict(arch_type=ARCH_LLAMA, dim=2048, hidden_dim=8192, n_layers=16, n_heads=32,
                        n_kv_heads=8, vocab_size=128256, max_seq_len=131072, rope_theta=500000,
                        rope_type=ROPE_LLAMA3_1, rope_scaling_factor=32, rope_scaling_low_freq_factor=1,
                        rope_scaling_high_freq_factor=4, rope_scaling_orig_max_seq_len=8192,
                        norm_epsilon=5, family="llama3"),
    "llama3.1-8b": dict(arch_type=ARCH_LLAMA, dim=4096, hidden_dim=14336, n_layers=32, n_heads=32,
                        n_kv_heads=8, vocab_size=128256, max_seq_len=131072, rope_theta=500000,
                        rope_type=ROPE_LLAMA3_1, rope_scaling_factor=8, rope_scaling_low_freq_factor=1,
                        rope_scaling_high_freq_factor=4, rope_scaling_orig_max_seq_len=8192,
                        norm_epsilon=5, family="llama3"),
    "qwen3-0.6b": dict(arch_type=ARCH_QWEN3, dim=1024, hidden_dim=3072, n_layers=28, n_heads=16,
                       n_kv_heads=8, head_dim=128, vocab_size=151936, max_seq_len=40960,
                       rope_theta=1000000, rope_type=ROPE_FALCON, norm_epsilon=6, family="qwen"),
    "qwen3-30b-a3b-like": dict(arch_type=ARCH_QWEN3_MOE, dim=2048, hidden_dim=6144, n_layers=8,
                               n_heads=32, n_kv_heads=4, head_dim=128, vocab_size=151936,
                               max_seq_len=40960, rope_theta=1000000, rope_type=ROPE_FALCON,
                               n_experts=128, n_active_experts=8, moe_hidden_dim=768, norm_epsilon=6,
                               family="qwen"),
}

SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>"],
    "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}

CHUNK = 1 << 24  # elements / blocks per generated piece


def header_for(preset: str, ftype: int, layers: int | None) -> ModelHeader:
    p = dict(PRESETS[preset])
    p.pop("family")
    if layers:
        p["n_layers"] = layers
    p["weights_float_type"] = ftype
    p["version"] = 0
    return ModelHeader(**p)


def q40_random(rng: np.random.Generator, nblocks: int) -> bytes:
    """nblocks random q40 blocks: f16 scale +-[0.004, 0.008] and 16 random nibble bytes."""
    blocks = np.empty((nblocks, 18), np.uint8)
    d = rng.uniform(0.004, 0.008, nblocks).astype(np.float16)
    d *= np.where(rng.integers(0, 2, nblocks, dtype=np.uint8) == 1, np.float16(1), np.float16(-1))
    blocks[:, :2] = d.view(np.uint8).reshape(nblocks, 2)
    blocks[:, 2:] = rng.integers(0, 256, (nblocks, 16), dtype=np.uint8)
    return blocks.tobytes()


def write_model(path: str, h: ModelHeader, seed: int = 0, log=print) -> int:
    rng = np.random.default_rng(seed)
    tmp = path + ".partial"
    t0 = time.perf_counter()
    with open(tmp, "wb") as f:
        write_model_header(f, h)
        header_size = f.tell()
        for t in tensor_layout(h, header_size):
            assert f.tell() == t.offset, (t, f.tell())
            if t.ftype == F32:
                n = t.rows * t.cols
                if t.name in ("attn_norm", "ffn_norm", "norm", "q_norm", "k_norm"):
                    f.write(np.ones(n, np.float32).tobytes())
                else:  # embed, router
                    scale = np.float32(0.05)
                    for i in range(0, n, CHUNK):
                        m = min(CHUNK, n - i)
                        f.write(((rng.random(m, dtype=np.float32) - np.float32(0.5)) * scale).tobytes())
            elif t.ftype == Q40:
                nb = t.rows * t.cols // 32
                for i in range(0, nb, CHUNK // 4):
                    f.write(q40_random(rng, min(CHUNK // 4, nb - i)))
            else:
                raise SystemExit(f"float type {t.ftype} not supported by this generator")
        size = f.tell()
    os.replace(tmp, path)
    log(f"{path}: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    return size


def make_tokenizer(vocab_size: int, family: str) -> TokenizerData:
    specials = [s.encode() for s in SPECIALS[family]]
    n_regular = vocab_size - len(specials)
    vocab = [bytes([i]) for i in range(256)]
    letters = string.ascii_lowercase
    for length in itertools.count(2):
        for tup in itertools.product(letters, repeat=length):
            if len(vocab) >= n_regular:
                break
            vocab.append("".join(tup).encode())
        if len(vocab) >= n_regular:
            break
    vocab += specials
    bos = n_regular
    if family == "llama3":
        eos = [n_regular + 1, n_regular + 4]
        template = None
    else:
        eos = [n_regular + 0, n_regular + 2]
        template = None
    scores = -np.arange(vocab_size, dtype=np.float32)
    return TokenizerData(vocab, scores, bos, eos, family == "llama3", template, max(len(v) for v in vocab))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=sorted(PRESETS) + ["all"])
    ap.add_argument("--out", default="bench", help="output folder (default: bench/, git-ignored)")
    ap.add_argument("--float-type", default="q40", choices=["q40", "f32"])
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rewrite files that already exist")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    ftype = FLOAT_BY_NAME[a.float_type]
    for preset in (sorted(PRESETS) if a.preset == "all" else [a.preset]):
        h = header_for(preset, ftype, a.layers)
        suffix = f"-{a.layers}l" if a.layers else ""
        m = os.path.join(a.out, f"{preset}{suffix}-{a.float_type}.m")
        t = os.path.join(a.out, f"{preset}.t")
        if a.force or not os.path.exists(m):
            write_model(m, h, a.seed)
        else:
            print(f"{m}: exists (use --force to rewrite)")
        if a.force or not os.path.exists(t):
            write_tokenizer(t, make_tokenizer(h.vocab_size, PRESETS[preset]["family"]))
            print(f"{t}: vocab {h.vocab_size}")
        print(m, t)


if __name__ == "__main__":
    main()
