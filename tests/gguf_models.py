"""Small GGUF files of any block type, written with gguf-py as llama.cpp lays them out (test-only).

`write_random_gguf` makes a llama-architecture model with random weights in the types asked for, per
tensor name (K types need 256-value rows: the default shape has dim 256, FFN 512), and the tiny
llama3 tokenizer of tests/data/tiny/hf/tiny_llama (512 tokens) in its metadata, so every command
runs it as `--model FILE.gguf`. The blocks are random codes with random finite scales
(kernels.random_blocks), the float tensors normal values: a model for checking mechanics and
numerics against a reference, not for its text. A GGML type formats has no code for (a
gguf.GGMLQuantizationType such as TQ2_0) is gguf-py's quantization of normal values; `dequantized`
writes the same model with every block tensor as F32, gguf-py's dequantization of its blocks.
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
                      seed=1, tied=False, dequantized=False) -> Path:
    """types: {GGUF tensor name suffix (attn_q, ffn_down, output, token_embd...): formats weight type
    or a gguf.GGMLQuantizationType}, default f32 for anything not named."""
    import gguf
    from gguf.quants import dequantize, quantize

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

    def add_blocks(name, raw, qtype):
        if dequantized:
            wr.add_tensor(name, np.asarray(dequantize(raw, qtype), np.float32))
        else:
            wr.add_tensor(name, raw, raw_dtype=qtype)

    def add(name, rows, cols, kind):
        t = types.get(kind, F32)
        if isinstance(t, gguf.GGMLQuantizationType):
            add_blocks(name, quantize((rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32), t), t)
            return
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
        add_blocks(name, raw, gguf.GGMLQuantizationType(type_to_ggml(t)))

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


def split_gguf(src: Path, prefix: Path, max_tensors: int, *, empty_first=False, keys=None) -> list[Path]:
    """Split a GGUF as llama.cpp's `gguf-split --split-max-tensors N` does (tools/gguf-split): part i of
    n is PREFIX-{i+1:05d}-of-{n:05d}.gguf, a whole GGUF (the source's version) with the next N tensors in
    file order (`empty_first`: none in part 1, as --no-tensor-first-split), each tensor's bytes copied
    and padded to 32; part 1 holds all the source's metadata, every part then split.no (u16),
    split.tensors.count (i32) and split.count (u16). Byte for byte llama-gguf-split's output. `keys` {part index: {split key: value}} overrides
    those values, to make broken splits. Returns the parts' paths."""
    import struct

    import gguf

    r = gguf.GGUFReader(str(src))
    data = np.memmap(src, dtype=np.uint8, mode="r")
    meta = [b"".join(bytes(p) for p in f.parts) for name, f in r.fields.items()
            if not name.startswith(("GGUF.", "split."))]
    align = int(r.fields["general.alignment"].parts[-1][0]) if "general.alignment" in r.fields else 32
    tensors = list(r.tensors)
    shares = ([[]] if empty_first else []) + [tensors[i:i + max_tensors] for i in range(0, len(tensors), max_tensors)]
    n_parts = len(shares)

    def kv(key: str, vtype: int, fmt: str, value) -> bytes:
        k = key.encode()
        return struct.pack("<Q", len(k)) + k + struct.pack("<I" + fmt, vtype, value)

    paths = []
    for i, share in enumerate(shares):
        split = {"split.no": i, "split.count": n_parts, "split.tensors.count": len(tensors), **(keys or {}).get(i, {})}
        # gguf-split's order: split.count is set last (its final value once the parts are known)
        pairs = (meta if i == 0 else []) + [kv("split.no", 2, "H", split["split.no"]),
                                            kv("split.tensors.count", 5, "i", split["split.tensors.count"]),
                                            kv("split.count", 2, "H", split["split.count"])]
        infos, blobs, offset = [], [], 0
        for t in share:
            name = t.name.encode()
            dims = [int(d) for d in t.shape]       # gguf-py's shape: GGUF order, the row length first
            infos.append(struct.pack("<Q", len(name)) + name + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims,
                                                                            int(t.tensor_type), offset))
            blob = data[t.data_offset:t.data_offset + t.n_bytes].tobytes()
            blobs.append(blob + b"\0" * (-len(blob) % 32))
            offset += len(blobs[-1])
        head = b"GGUF" + struct.pack("<IQQ", r.fields["GGUF.version"].parts[-1][0], len(share), len(pairs))
        head += b"".join(pairs) + b"".join(infos)
        part_align = align if i == 0 else 32       # the later parts have no general.alignment of their own
        path = Path(f"{prefix}-{i + 1:05d}-of-{n_parts:05d}.gguf")
        path.write_bytes(head + b"\0" * (-len(head) % part_align) + b"".join(blobs))
        paths.append(path)
    return paths


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


def add_hf_shape(wr, cfg: dict) -> None:
    """The shape keys convert_hf_to_gguf.py writes from an HF config.json (every arch we test)."""
    wr.add_context_length(cfg["max_position_embeddings"])
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_block_count(cfg["num_hidden_layers"])
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_head_count(cfg["num_attention_heads"])
    wr.add_head_count_kv(cfg["num_key_value_heads"])


def write_tiny_qwen2_gguf(path: Path, dtype=np.float32, zero_biases: bool = False) -> Path:
    """tests/data/tiny/hf/tiny_qwen2 as llama.cpp's convert_hf_to_gguf.py writes a qwen2 GGUF: its
    keys, tensor names (blk.N.attn_q.bias ...), q/k rows not permuted (NeoX rope), tied output (no
    output.weight), matrices in `dtype` (float32 or float16), norms and biases float32. No
    tokenizer (the engine does not need one). zero_biases: the same model without its biases."""
    import gguf

    folder = HF / "tiny_qwen2"
    cfg = json.loads((folder / "config.json").read_text())
    wr = gguf.GGUFWriter(str(path), "qwen2")
    add_hf_shape(wr, cfg)
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
