"""The .m / .t readers: every fixture reads, and every kind of damage gives one clear line."""

import struct

import numpy as np
import pytest

from dllama_mpi.errors import ModelFormatError, TokenizerFormatError
from dllama_mpi.formats import (ARCH_LLAMA, ARCH_QWEN3_MOE, FLOAT_BY_NAME, open_model, read_tokenizer,
                                write_model_header, write_tokenizer)

from conftest import TINY

MODELS = sorted((TINY / "m").glob("*.m"))


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_fixture_models_read(path):
    m = open_model(path)
    h = m.header
    last = m.tensors[-1]
    assert last.offset + last.nbytes == path.stat().st_size
    assert m.info("embed").offset == m.header_size
    assert h.weights_float_type == FLOAT_BY_NAME[path.stem.rsplit("_", 1)[1]] and not h.tensor_types
    m.close()


def test_worked_example_header():
    m = open_model(TINY / "m" / "dllama_model_tiny_llama_q40.m")
    h = m.header
    assert m.header_size == 176 and h.arch_type == ARCH_LLAMA
    assert (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size) == (64, 192, 4, 4, 2, 512)
    assert (h.rope_theta, h.rope_scaling_factor, h.rope_type, h.head_dim, h.eps) == (500000, 8, 2, 16, 1e-5)
    assert h.to_pairs()[:3] == [(0, 0), (1, 11259136), (11, 1)]
    moe = open_model(TINY / "m" / "dllama_model_tiny_qwen3_moe_q40.m")
    assert moe.header_size == 144 and moe.header.arch_type == ARCH_QWEN3_MOE
    assert (moe.header.n_experts, moe.header.n_active_experts, moe.header.ffn_dim, moe.header.q_dim) == (4, 2, 64, 128)


def test_header_round_trip(tmp_path):
    src = TINY / "m" / "dllama_model_tiny_qwen3_q40.m"
    m = open_model(src)
    out = tmp_path / "copy.m"
    with open(out, "wb") as f:
        write_model_header(f, m.header)
    assert out.read_bytes() == src.read_bytes()[:m.header_size]


def _damaged(tmp_path, data: bytes) -> str:
    p = tmp_path / "bad.m"
    p.write_bytes(data)
    return str(p)


def _good() -> bytearray:
    return bytearray((TINY / "m" / "dllama_model_tiny_llama_q40.m").read_bytes())


def _set_key(data: bytearray, key: int, value: int) -> bytearray:
    n = (struct.unpack_from("<i", data, 4)[0] - 8) // 8
    for i in range(n):
        k, _ = struct.unpack_from("<ii", data, 8 + 8 * i)
        if k == key:
            struct.pack_into("<ii", data, 8 + 8 * i, k, value)
            return data
    raise KeyError(key)


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:0], "empty"),
    (lambda d: d[:6], "too short"),
    (lambda d: struct.pack("<i", 0x00ABCD00) + d[4:], "old Distributed Llama model format"),
    (lambda d: b"GGUF" + d[4:], "not a .m model file"),
    (lambda d: d[:4] + struct.pack("<i", 13) + d[8:], "not 8 + 8 x pairs"),
    (lambda d: d[:4] + struct.pack("<i", 1 << 30) + d[8:], "larger than the file"),
    (lambda d: d[:-1], "1 bytes missing"),
    (lambda d: d[:200], "missing"),
    (lambda d: d + b"\0" * 7, "7 bytes extra"),
    (lambda d: _set_key(d, 1, 0x1234), "arch_type"),
    (lambda d: _set_key(d, 18, 9), "rope_type"),
    (lambda d: _set_key(d, 13, 7), "weights_float_type"),
    (lambda d: _set_key(d, 20, 4), "norm_epsilon"),
    (lambda d: _set_key(d, 5, 0), "n_heads"),
    (lambda d: _set_key(d, 6, 3), "not a multiple of n_kv_heads"),
    (lambda d: _set_key(d, 11, 5), "hidden_act"),
    (lambda d: _set_key(d, 0, 1), "version"),
    (lambda d: d[:8] + struct.pack("<ii", 99, 1) + d[16:], "unknown header key 99"),
    (lambda d: d[:8] + struct.pack("<ii", 1, ARCH_LLAMA) + d[16:], "appears twice"),
])
def test_bad_model_files(tmp_path, damage, message):
    path = _damaged(tmp_path, bytes(damage(_good())))
    with pytest.raises(ModelFormatError) as e:
        open_model(path)
    text = str(e.value)
    assert message in text and path in text and "\n" not in text


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelFormatError, match="cannot open"):
        open_model(tmp_path / "nope.m")


@pytest.mark.parametrize("path", sorted((TINY / "t").glob("*.t")), ids=lambda p: p.stem)
def test_tokenizer_round_trip(tmp_path, path):
    t = read_tokenizer(path)
    out = tmp_path / "copy.t"
    write_tokenizer(out, t)
    assert out.read_bytes() == path.read_bytes()


def test_real_tokenizers(real_tokenizers):
    l3 = read_tokenizer(real_tokenizers["llama3"])
    assert (l3.vocab_size, l3.bos_id, l3.eos_ids, l3.add_bos) == (128256, 128000, [128001, 128008, 128009], True)
    q = read_tokenizer(real_tokenizers["qwen2"])
    assert (q.vocab_size, q.bos_id, q.eos_ids, q.add_bos) == (151646, 151643, [151645], False)
    assert "<|im_start|>" in q.chat_template


def _tok_bytes() -> bytearray:
    return bytearray((TINY / "t" / "dllama_tokenizer_tiny_llama3.t").read_bytes())


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:2], "truncated"),
    (lambda d: struct.pack("<i", 0x1234) + d[4:], "not a .t tokenizer"),
    (lambda d: d[:-3], "truncated"),
    (lambda d: d + b"xyz", "unexpected bytes"),
    (lambda d: d[:8] + struct.pack("<ii", 42, 0) + d[16:], "unknown header key 42"),
    (lambda d: d[:16] + struct.pack("<ii", 0, 2) + d[24:], "version"),
    # first token record: length field -> negative / huge
    (lambda d: d[:64 + 3827 + 12 + 4] + struct.pack("<i", -1) + d[64 + 3827 + 12 + 8:], "token 0 has length"),
    (lambda d: d[:64 + 3827 + 12 + 4] + struct.pack("<I", 10 ** 6) + d[64 + 3827 + 12 + 8:], "token 0 has length"),
    (lambda d: d[:8] + struct.pack("<ii", 3, 9999) + d[16:], "bos_id 9999"),
])
def test_bad_tokenizer_files(tmp_path, damage, message):
    p = tmp_path / "bad.t"
    p.write_bytes(bytes(damage(_tok_bytes())))
    with pytest.raises(TokenizerFormatError) as e:
        read_tokenizer(p)
    assert message in str(e.value) and str(p) in str(e.value)


def test_f32_view_and_row_slices():
    m = open_model(TINY / "m" / "dllama_model_tiny_llama_f32.m")
    wq = m.info("wq", 0)
    full = m.raw(wq).view(np.float32).reshape(wq.rows, wq.cols)
    part = m.rows_raw(wq, 16, 32).view(np.float32).reshape(16, wq.cols)
    assert np.array_equal(full[16:32], part)
    assert m.f32(m.info("norm")).shape == (1, 64)
