"""Small GGUF files of any block type, written with gguf-py as llama.cpp lays them out (test-only).

`write_random_gguf` makes a llama-architecture model with random weights in the types asked for, per
tensor name (K types need 256-value rows: the default shape has dim 256, FFN 512), and the tiny
llama3 tokenizer of tests/data/tiny/hf/tiny_llama (512 tokens) in its metadata, so every command
runs it as `--model FILE.gguf`. The blocks are random codes with random finite scales
(kernels.random_blocks), the float tensors normal values: a model for checking mechanics and
numerics against a reference, not for its text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HF = Path(__file__).parent / "data" / "tiny" / "hf"


def add_bpe_tokenizer(wr, folder: Path) -> tuple[dict, int]:
    """A tiny HF folder's byte-level BPE tokenizer into a GGUFWriter as llama.cpp stores it (tokens,
    types: the 16 specials from id 496 are control tokens, merges); returns (tokenizer_config.json, the number of tokens)."""
    tj = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in tj["added_tokens"]})
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    wr.add_tokenizer_model("gpt2")
    wr.add_token_list(tokens)
    wr.add_token_types([3 if i >= 496 else 1 for i in range(len(tokens))])
    wr.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    return json.loads((folder / "tokenizer_config.json").read_text()), len(tokens)


def write_random_gguf(path: Path, types=None, *, dim=256, hidden=512, layers=2, heads=8, kv_heads=4,
                      seed=1, tied=False) -> Path:
    """types: {GGUF tensor name suffix (attn_q, ffn_down, output, token_embd...): formats weight type},
    default f32 for anything not named."""
    import gguf

    from dllama_mpi import kernels as K
    from dllama_mpi.formats import F32, TYPE_BLOCK, type_to_ggml

    types = types or {}
    rng = np.random.default_rng(seed)
    hd = dim // heads
    wr = gguf.GGUFWriter(str(path), "llama")
    wr.add_block_count(layers)
    wr.add_context_length(1024)
    wr.add_embedding_length(dim)
    wr.add_feed_forward_length(hidden)
    wr.add_head_count(heads)
    wr.add_head_count_kv(kv_heads)
    wr.add_rope_freq_base(10000.0)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_rope_dimension_count(hd)
    tc, n_vocab = add_bpe_tokenizer(wr, HF / "tiny_llama")
    wr.add_vocab_size(n_vocab)
    wr.add_bos_token_id(496)
    wr.add_eos_token_id(497)
    wr.add_add_bos_token(True)
    wr.add_chat_template(tc["chat_template"])

    def add(name, rows, cols, kind):
        t = types.get(kind, F32)
        if rows == 1:
            wr.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(cols)).astype(np.float32))
            return
        if TYPE_BLOCK[t][0] == 1:
            v = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
            if t == F32:
                wr.add_tensor(name, v)
            else:
                raw = K.random_blocks(rng, t, rows, cols)
                if type_to_ggml(t) == 1:   # f16 of the same normal values
                    raw = v.astype(np.float16).view(np.uint8)
                wr.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(type_to_ggml(t)))
            return
        raw = K.random_blocks(rng, t, rows, cols, scale=0.5 / np.sqrt(cols) / 16)
        wr.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(type_to_ggml(t)))

    add("token_embd.weight", n_vocab, dim, "token_embd")
    for l in range(layers):
        b = f"blk.{l}."
        add(b + "attn_q.weight", heads * hd, dim, "attn_q")
        add(b + "attn_k.weight", kv_heads * hd, dim, "attn_k")
        add(b + "attn_v.weight", kv_heads * hd, dim, "attn_v")
        add(b + "attn_output.weight", dim, heads * hd, "attn_output")
        add(b + "ffn_gate.weight", hidden, dim, "ffn_gate")
        add(b + "ffn_down.weight", dim, hidden, "ffn_down")
        add(b + "ffn_up.weight", hidden, dim, "ffn_up")
        add(b + "attn_norm.weight", 1, dim, "norm")
        add(b + "ffn_norm.weight", 1, dim, "norm")
    add("output_norm.weight", 1, dim, "norm")
    if not tied:
        add("output.weight", n_vocab, dim, "output")
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


def hf_bf16_tensors(folder: Path) -> dict[str, np.ndarray]:
    """A tiny HF checkpoint's bf16 tensors (model.safetensors) as float32, read from the bytes."""
    import struct

    raw = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", raw, 0)
    out = {}
    for name, info in json.loads(raw[8:8 + n]).items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "BF16", (name, info["dtype"])
        b0, b1 = info["data_offsets"]
        u16 = np.frombuffer(raw, dtype="<u2", count=(b1 - b0) // 2, offset=8 + n + b0)
        out[name] = (u16.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    return out


# Hugging Face Qwen2 names inside a layer -> GGUF names inside blk.N (llama.cpp's tensor mapping)
QWEN2_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                    "post_attention_layernorm": "ffn_norm"}


def write_tiny_qwen2_gguf(path: Path, dtype=np.float32, zero_biases: bool = False) -> Path:
    """tests/data/tiny/hf/tiny_qwen2 as llama.cpp's convert_hf_to_gguf.py writes a qwen2 GGUF: its
    keys, tensor names (blk.N.attn_q.bias ...), q/k rows not permuted (NeoX rope), tied output (no
    output.weight), matrices in `dtype` (float32 or float16), norms and biases float32. No
    tokenizer (the engine does not need one). zero_biases: the same model without its biases."""
    import gguf

    folder = HF / "tiny_qwen2"
    cfg = json.loads((folder / "config.json").read_text())
    wr = gguf.GGUFWriter(str(path), "qwen2")
    wr.add_context_length(cfg["max_position_embeddings"])
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_block_count(cfg["num_hidden_layers"])
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_head_count(cfg["num_attention_heads"])
    wr.add_head_count_kv(cfg["num_key_value_heads"])
    wr.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    for name, a in sorted(hf_bf16_tensors(folder).items()):
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            stem, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{QWEN2_GGUF_NAMES[stem]}.{kind}"
        if name.endswith(".bias") and zero_biases:
            a = np.zeros_like(a)
        wr.add_tensor(gname, a if a.ndim == 1 else a.astype(dtype))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path
