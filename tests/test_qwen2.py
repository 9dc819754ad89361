"""Qwen2 (Qwen2ForCausalLM: Qwen2 / Qwen2.5, QwQ, DeepSeek-R1-Distill-Qwen) on one rank: the .m
extension (FORMATS-EXT.md "Qwen2": arch id, the q/k/v bias tensors), `convert hf` and `convert gguf`,
GGUF files run as they are, and the engine against transformers' own logits of a tiny random
checkpoint (tests/data/tiny/hf/tiny_qwen2, qwen2_hf_reference.npz, tiny/record_qwen2.py). The same
checks split over ranks and pipeline stages are in tests/test_mpi.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from dllama_mpi.errors import ConvertError, ModelFormatError
from dllama_mpi.formats import ACT_SILU, ARCH_QWEN2, F16, F32, Q40, ROPE_FALCON, open_model
from gguf_models import hf_bf16_tensors, write_tiny_qwen2_gguf

TINY_HF = TINY / "hf" / "tiny_qwen2"
HF_REF = TINY / "qwen2_hf_reference.npz"
TOL = 1e-3      # as Gemma 3's tiny model: float32 engine vs float32 transformers (~1e-4 measured)


@pytest.fixture(scope="module")
def tiny_m(tmp_path_factory) -> Path:
    from dllama_mpi.convert.hf import convert_hf_model

    out = tmp_path_factory.mktemp("qwen2") / "tiny_qwen2_f32.m"
    convert_hf_model(TINY_HF, out, "f32", quiet=True)
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """The tiny checkpoint as f32 and f16 GGUFs, and the f32 one without its biases."""
    d = tmp_path_factory.mktemp("qwen2_gguf")
    return {"f32": write_tiny_qwen2_gguf(d / "f32.gguf"), "f16": write_tiny_qwen2_gguf(d / "f16.gguf", np.float16),
            "no_bias": write_tiny_qwen2_gguf(d / "no_bias.gguf", zero_biases=True)}


def _engine_logits(path, ids, **kw) -> np.ndarray:
    from mpi4py import MPI

    from dllama_mpi.comm import Comm
    from dllama_mpi.startup import build_engine

    engine = build_engine(Comm(MPI.COMM_SELF), str(path), quiet=True, **kw)
    return engine.forward(list(ids), 0, all_logits=True)


# ---------------------------------------------------------------------------------------------
# format and converters

def test_hf_header_and_layout(tiny_m):
    m = open_model(tiny_m)
    try:
        h = m.header
        assert (h.arch_type, h.arch_name, h.hidden_act, h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads,
                h.head_size, h.vocab_size, h.rope_theta, h.norm_epsilon) == \
            (ARCH_QWEN2, "qwen2", ACT_SILU, 32, 64, 2, 4, 2, 8, 256, 1000000, 6)
        assert h.has_qkv_bias and not h.has_qk_norm and h.effective_rope_type == ROPE_FALCON
        names = [(t.name, t.rows, t.cols, t.ftype) for t in m.tensors if t.layer == 1]
        assert [n[0] for n in names] == ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "attn_norm", "ffn_norm",
                                         "q_bias", "k_bias", "v_bias"]
        assert names[-3:] == [("q_bias", 1, 32, F32), ("k_bias", 1, 16, F32), ("v_bias", 1, 16, F32)]
        hf = hf_bf16_tensors(TINY_HF)
        for ours, theirs in (("q_bias", "q_proj"), ("k_bias", "k_proj"), ("v_bias", "v_proj")):
            assert np.array_equal(m.f32(m.info(ours, 1))[0], hf[f"model.layers.1.self_attn.{theirs}.bias"]), ours
        assert np.array_equal(m.f32(m.info("wq", 0)), hf["model.layers.0.self_attn.q_proj.weight"])  # not permuted
        assert np.array_equal(m.f32(m.info("wcls")), hf["model.embed_tokens.weight"])                # tied
    finally:
        m.close()


def test_gguf_and_hf_converters_agree(tmp_path, tiny_m, tiny_gguf):
    """`convert gguf` of llama.cpp's layout of the checkpoint is `convert hf`'s file byte for byte."""
    from dllama_mpi.convert.gguf import convert_gguf_model

    convert_gguf_model(tiny_gguf["f32"], tmp_path / "from_gguf.m", "f32", quiet=True)
    assert (tmp_path / "from_gguf.m").read_bytes() == Path(tiny_m).read_bytes()


def test_hf_q40(tmp_path):
    from dllama_mpi.convert.hf import convert_hf_model

    convert_hf_model(TINY_HF, tmp_path / "q40.m", "q40", quiet=True)
    m = open_model(tmp_path / "q40.m")
    try:
        assert m.info("wq", 0).ftype == Q40 and m.info("q_bias", 0).ftype == F32
    finally:
        m.close()
    ref = np.load(HF_REF)
    got = _engine_logits(tmp_path / "q40.m", ref["ids"])
    assert np.mean(got.argmax(1) == ref["logits"].argmax(1)) > 0.75   # 4-bit random weights: close, not equal


def test_hf_sliding_window_config_is_refused(tmp_path):
    from dllama_mpi.convert.hf import load_header

    cfg = json.loads((TINY_HF / "config.json").read_text())
    cfg["use_sliding_window"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="use_sliding_window"):
        load_header(str(tmp_path), "f32")


def _with_pair(data: bytes, key: int, value: int) -> bytes:
    """A .m file with header key `key` set to `value` (the pair added if the file has none)."""
    size = struct.unpack_from("<i", data, 4)[0]
    for pos in range(8, size, 8):
        if struct.unpack_from("<i", data, pos)[0] == key:
            return data[:pos] + struct.pack("<ii", key, value) + data[pos + 8:]
    return data[:4] + struct.pack("<i", size + 8) + data[8:size] + struct.pack("<ii", key, value) + data[size:]


@pytest.mark.parametrize("key, value, message", [
    (7, 4, "qwen2 model with n_experts 4 (key 7); qwen2 is dense"),
    (14, 8, "qwen2 model with llama3 rope scaling (key 14 is 8)"),
])
def test_bad_qwen2_headers(tmp_path, tiny_m, key, value, message):
    p = tmp_path / "bad.m"
    p.write_bytes(_with_pair(Path(tiny_m).read_bytes(), key, value))
    with pytest.raises(ModelFormatError) as e:
        open_model(p)
    assert message in str(e.value) and str(p) in str(e.value)


def test_gguf_bias_rules(tmp_path, tiny_gguf):
    """A qwen2 GGUF needs its three biases; any other arch (and qwen2's o_proj) has none."""
    import gguf

    from dllama_mpi.gguf import GGUFFile, open_gguf_model

    src = GGUFFile(tiny_gguf["f32"])

    def rewrite(path, arch, drop=(), add=()):
        wr = gguf.GGUFWriter(str(path), arch)
        for k, f in src.fields.items():
            if k.startswith("qwen2."):
                getattr(wr, {"context_length": "add_context_length", "embedding_length": "add_embedding_length",
                             "block_count": "add_block_count", "feed_forward_length": "add_feed_forward_length",
                             "attention.head_count": "add_head_count", "attention.head_count_kv": "add_head_count_kv",
                             "rope.freq_base": "add_rope_freq_base",
                             "attention.layer_norm_rms_epsilon": "add_layer_norm_rms_eps"}[k[6:]])(f)
        for name, t in src.tensors.items():
            if name not in drop:
                a = src.data(t.part, t.offset, t.nbytes).view(np.float32).reshape(tuple(reversed(t.dims)))
                wr.add_tensor(name, a.reshape(-1) if len(t.dims) == 1 else a)
        for name, n in add:
            wr.add_tensor(name, np.zeros(n, np.float32))
        wr.write_header_to_file(); wr.write_kv_data_to_file(); wr.write_tensors_to_file(); wr.close()
        return path

    try:
        p = rewrite(tmp_path / "no_k_bias.gguf", "qwen2", drop=("blk.1.attn_k.bias",))
        with pytest.raises(ModelFormatError, match=r"no_k_bias.gguf: tensor blk.1.attn_k.bias not found"):
            open_gguf_model(p)
        p = rewrite(tmp_path / "o_bias.gguf", "qwen2", add=(("blk.0.attn_output.bias", 32),))
        with pytest.raises(ModelFormatError, match=r"blk.0.attn_output.bias \(attention bias\) is not supported "
                                                   r"for architecture qwen2"):
            open_gguf_model(p)
    finally:
        src.close()


# ---------------------------------------------------------------------------------------------
# the engine against transformers

@pytest.mark.parametrize("batch", [40, 7, 1])
def test_engine_from_hf_equals_transformers(tiny_m, batch):
    """The bias adds (over every row of a pass), NeoX rope with theta 1e6, GQA, tied output: transformers'
    logits, in passes of 40, 7 and 1 rows."""
    ref = np.load(HF_REF)
    got = _engine_logits(tiny_m, ref["ids"], max_batch=batch)
    assert np.abs(got - ref["logits"]).max() < TOL
    assert np.array_equal(got.argmax(1), ref["logits"].argmax(1))


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_engine_from_gguf_equals_transformers(tiny_gguf, kind):
    """The GGUF as it is (f16: the bf16 weights of this checkpoint are exact in f16, and the f16
    kernels multiply the f32 activations)."""
    ref = np.load(HF_REF)
    got = _engine_logits(tiny_gguf[kind], ref["ids"], max_batch=16)
    assert np.abs(got - ref["logits"]).max() < TOL
    assert np.array_equal(got.argmax(1), ref["logits"].argmax(1))


def test_biases_matter(tiny_gguf):
    """Without its biases the model is far from transformers' logits (so the matches above check them)."""
    ref = np.load(HF_REF)
    got = _engine_logits(tiny_gguf["no_bias"], ref["ids"])
    assert np.abs(got - ref["logits"]).max() > 1.0   # 16 measured


def test_rows_of_many_sequences_are_batch_invariant(tiny_m):
    from mpi4py import MPI

    from dllama_mpi.comm import Comm
    from dllama_mpi.startup import build_engine
    from goldens import SEQS, rows_logits

    engine = build_engine(Comm(MPI.COMM_SELF), str(tiny_m), n_slots=len(SEQS), quiet=True)
    seqs = [[t % 256 for t in s] for s in SEQS]
    alone = rows_logits(engine, seqs, [[(s, p) for p in range(i, min(i + 32, len(t)))]
                                       for s, t in enumerate(seqs) for i in range(0, len(t), 32)])
    order = [(s, p) for p in range(max(map(len, seqs))) for s in range(len(seqs)) if p < len(seqs[s])]
    mixed = rows_logits(engine, seqs, [order[i:i + 32] for i in range(0, len(order), 32)])
    assert all(np.array_equal(alone[k], mixed[k]) for k in alone)


def test_f16_conversion_runs_with_f16_kernels(tmp_path, tiny_gguf):
    """`convert gguf` keeps the f16 GGUF's matrices f16; the .m and the GGUF give the same logits."""
    from dllama_mpi.convert.gguf import convert_gguf_model

    convert_gguf_model(tiny_gguf["f16"], tmp_path / "f16.m", "auto", quiet=True)
    m = open_model(tmp_path / "f16.m")
    try:
        assert m.info("wq", 0).ftype == F16 and m.info("v_bias", 1).ftype == F32
    finally:
        m.close()
    ids = np.load(HF_REF)["ids"]
    a = _engine_logits(tmp_path / "f16.m", ids)
    b = _engine_logits(tiny_gguf["f16"], ids)
    assert np.array_equal(a, b)
