"""Bad input, as a user meets it: every row of tests/BAD_INPUT.md is run as a real process, alone
and under `mpiexec -n 2`, and must give exactly one `error:` line naming the file / field / value,
exit code 2, no traceback, and no rank left behind.

The rows are `CASES` below (id, command, words the error line must hold); the table in
tests/BAD_INPUT.md is checked against them (same ids, same count)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from test_formats import _set_key

BIN = Path(sys.executable).parent
DLLAMA = [str(BIN / "dllama-mpi")] if (BIN / "dllama-mpi").exists() else [sys.executable, "-m", "dllama_mpi.cli"]
MPIEXEC = str(BIN / "mpiexec")
HF = TINY / "hf"
LLAMA_Q40 = TINY / "m" / "dllama_model_tiny_llama_q40.m"
LLAMA_F32 = TINY / "m" / "dllama_model_tiny_llama_f32.m"
QWEN_Q40 = TINY / "m" / "dllama_model_tiny_qwen3_q40.m"
TOK_LLAMA = TINY / "t" / "dllama_tokenizer_tiny_llama3.t"
TOK_QWEN = TINY / "t" / "dllama_tokenizer_tiny_qwen3.t"
PROMPT = "The quick brown fox"
TABLE = Path(__file__).with_name("BAD_INPUT.md")


# ------------------------------------------------------------------------------------------------
# damaged files


def _model_bytes(src=LLAMA_Q40) -> bytearray:
    return bytearray(Path(src).read_bytes())


def _tok_records(path=TOK_LLAMA):
    """(header bytes, body offset of the first token record) of a current-format .t file."""
    data = bytearray(Path(path).read_bytes())
    from dllama_mpi.formats import read_tokenizer

    t = read_tokenizer(path)
    first = len(data) - sum(8 + len(v) for v in t.vocab)
    return data, first, t


def _build_files(d: Path) -> dict[str, Path]:
    from dllama_mpi.formats import TokenizerData, write_tokenizer

    f: dict[str, Path] = {}

    def put(name, data):
        p = d / name
        p.write_bytes(bytes(data))
        f[name] = p

    m = _model_bytes()
    put("empty.m", b"")
    put("short.m", m[:6])
    put("magic.m", b"\x12\x34\x56\x78" + m[4:])
    put("old.m", struct.pack("<i", 0x00ABCD00) + m[4:])
    put("gguf.m", b"GGUF" + m[4:])
    put("hsize_odd.m", m[:4] + struct.pack("<i", 13) + m[8:])
    put("hsize_big.m", m[:4] + struct.pack("<i", 1 << 30) + m[8:])
    put("hsize_lie.m", m[:4] + struct.pack("<i", struct.unpack_from("<i", m, 4)[0] - 8) + m[8:])
    put("trunc_header.m", m[:100])
    put("trunc_data.m", m[:-1000])
    put("extra.m", m + b"\0" * 7)
    bad_key = bytearray(m)
    struct.pack_into("<i", bad_key, 8, 99)          # the first pair's key
    put("key99.m", bad_key)
    dup = bytearray(m)
    struct.pack_into("<i", dup, 16, struct.unpack_from("<i", dup, 8)[0])
    put("dupkey.m", dup)
    put("arch.m", _set_key(_model_bytes(), 1, 0x1234))
    put("rope.m", _set_key(_model_bytes(), 18, 9))
    put("ftype.m", _set_key(_model_bytes(), 13, 7))
    put("act.m", _set_key(_model_bytes(), 11, 5))
    put("eps.m", _set_key(_model_bytes(), 20, 4))
    put("version.m", _set_key(_model_bytes(), 0, 3))
    put("dim0.m", _set_key(_model_bytes(), 2, 0))
    put("kvheads.m", _set_key(_model_bytes(), 6, 3))
    window = _model_bytes()
    struct.pack_into("<ii", window, 8, 64, 512)      # the version pair becomes gemma3's sliding_window
    put("window.m", window)
    # the per-matrix type table (FORMATS-EXT.md, "Per-matrix float types") with 28 entries for tiny_llama's 29 matrices
    hsize = struct.unpack_from("<i", m, 4)[0]
    table = bytearray(m[:4] + struct.pack("<i", hsize + 8 + 32) + m[8:hsize] + struct.pack("<ii", 22, 28)
                      + bytes([2] * 28) + b"\0" * 4 + m[hsize:])
    put("types28.m", table)
    (d / "short.txt").write_text("In the beginning God created the heaven and the earth.\n")
    f["short.txt"] = d / "short.txt"
    (d / "list.json").write_text("[1, 2]\n")
    f["list.json"] = d / "list.json"

    # tokenizers
    data, first, t = _tok_records()
    put("empty.t", b"")
    put("magic.t", b"\x00\x00\x00\x00" + data[4:])
    put("trunc.t", data[: len(data) - 5])
    neg = bytearray(data)
    struct.pack_into("<i", neg, first + 4, -1)       # token 0's length
    put("neglen.t", neg)
    long_ = bytearray(data)
    _set_key(long_, 2, 1 << 20)                  # max_token_length: allow a long token...
    last = len(long_) - 8 - len(t.vocab[-1])
    struct.pack_into("<i", long_, last + 4, 100000)  # ...whose bytes run past the end of the file
    put("toolong.t", long_)
    unk = bytearray(data)
    struct.pack_into("<i", unk, 8, 42)
    put("key42.t", unk)
    put("vocabneg.t", _set_key(bytearray(data), 1, -5))
    put("bos.t", _set_key(bytearray(data), 3, 100000))
    put("tokversion.t", _set_key(bytearray(data), 0, 7))
    small = TokenizerData(t.vocab[:500], t.scores[:500], 496, [497], t.add_bos, t.chat_template)
    write_tokenizer(d / "small.t", small)
    f["small.t"] = d / "small.t"

    # unreadable (root reads anything: those rows run without root's DAC override, see _unreadable_prefix)
    for name, src in (("noperm.m", LLAMA_Q40), ("noperm.t", TOK_LLAMA)):
        shutil.copy(src, d / name)
        os.chmod(d / name, 0)
        f[name] = d / name
    (d / "adir.m").mkdir()
    f["adir.m"] = d / "adir.m"
    return f


def _build_convert_inputs(d: Path) -> dict[str, Path]:
    import gguf

    from test_convert import _copy_folder, _load_st, _save_st, write_q81_gguf, write_tiny_gguf

    f = {}
    p = d / "gpt2.gguf"
    wr = gguf.GGUFWriter(str(p), "gpt2")
    wr.add_block_count(1)
    wr.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    wr.write_header_to_file(); wr.write_kv_data_to_file(); wr.write_tensors_to_file(); wr.close()
    f["gpt2.gguf"] = p
    ok = write_tiny_gguf(HF / "tiny_llama", d / "ok.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    f["ok.gguf"] = ok
    f["q81.gguf"] = write_q81_gguf(ok, d / "q81.gguf")
    from gguf_models import write_tiny_qwen2_gguf

    f["qwen2.gguf"] = write_tiny_qwen2_gguf(d / "qwen2.gguf")   # 256 tokens (tiny_llama has 512)
    (d / "junk.gguf").write_bytes(b"not a gguf at all")
    f["junk.gguf"] = d / "junk.gguf"
    data = ok.read_bytes()
    last = max(gguf.GGUFReader(str(ok)).tensors, key=lambda t: t.data_offset)
    (d / "trunc.gguf").write_bytes(data[:last.data_offset + 100])                 # the last tensor cut short
    f["trunc.gguf"] = d / "trunc.gguf"
    (d / "huge.gguf").write_bytes(data[:8] + struct.pack("<Q", 1 << 60) + data[16:])   # 2^60 tensors claimed
    f["huge.gguf"] = d / "huge.gguf"
    key = b"llama.block_count"
    i = data.index(key) + len(key)   # u32 value type 4 (UINT32) -> 8 (STRING): the value's bytes become a length
    (d / "badmeta.gguf").write_bytes(data[:i] + struct.pack("<I", 8) + data[i + 4:])
    f["badmeta.gguf"] = d / "badmeta.gguf"
    nameless = data.replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_up.weighs")
    (d / "missing.gguf").write_bytes(nameless)
    f["missing.gguf"] = d / "missing.gguf"
    f.update(_broken_splits(d, ok))
    f["hf_noconfig"] = _copy_folder(HF / "tiny_qwen3", d / "hf_noconfig", skip={"config.json"})
    miss = _copy_folder(HF / "tiny_qwen3", d / "hf_missing", skip={"model.safetensors"})
    w = _load_st(HF / "tiny_qwen3" / "model.safetensors")
    del w["model.layers.2.mlp.down_proj.weight"]
    _save_st(w, miss / "model.safetensors")
    f["hf_missing"] = miss
    return f


def _broken_splits(d: Path, ok: Path) -> dict[str, list[Path]]:
    """ok.gguf split as gguf-split does, in 3 parts, each folder broken one way."""
    import gguf

    from gguf_models import split_gguf
    from test_convert import write_tiny_gguf

    per_part = -(-len(gguf.GGUFReader(str(ok)).tensors) // 3)
    f = {}
    for name, keys in (("split-missing", None), ("split-count", {1: {"split.count": 4}}),
                       ("split-no", {2: {"split.no": 1}}), ("split-other", None)):
        (d / name).mkdir()
        f[name] = split_gguf(ok, d / name / "ok", per_part, keys=keys)
    f["split-missing"][2].unlink()
    tied = write_tiny_gguf(HF / "tiny_llama", d / "tied.gguf", qtype=gguf.GGMLQuantizationType.Q8_0, tied=True)
    (d / "tied").mkdir()
    shutil.copy(split_gguf(tied, d / "tied" / "ok", per_part)[1], f["split-other"][1])   # one tensor fewer
    return f


# ------------------------------------------------------------------------------------------------
# the rows

def inf(model, tok=TOK_LLAMA, *extra, prompt=PROMPT):
    return ["inference", "--model", str(model), "--tokenizer", str(tok), "--prompt", prompt, "--steps", "4", *extra]


def gguf_inf(model, *extra):
    """inference on a GGUF model (its own tokenizer)"""
    return ["inference", "--model", str(model), "--prompt", PROMPT, "--steps", "4", *extra]


# (id, args(files, out_dir) -> argv, needles in the error line, how many ranks: "12" = alone and -n 2)
CASES = [
    ("model-missing", lambda f, o: inf(o / "missing.m"), ["missing.m", "model file not found"]),
    ("tokenizer-missing", lambda f, o: inf(LLAMA_Q40, o / "missing.t"), ["missing.t", "tokenizer file not found"]),
    ("tokenizer-option-missing", lambda f, o: ["inference", "--model", str(LLAMA_Q40), "--prompt", "x"],
     ["--tokenizer is required"]),
    ("model-unreadable", lambda f, o: inf(f["noperm.m"]), ["noperm.m", "model file is not readable"]),
    ("tokenizer-unreadable", lambda f, o: inf(LLAMA_Q40, f["noperm.t"]), ["noperm.t", "tokenizer file is not readable"]),
    ("model-is-directory", lambda f, o: inf(f["adir.m"]), ["adir.m", "model path is a directory"]),
    ("model-empty", lambda f, o: inf(f["empty.m"]), ["empty.m", "model file is empty"]),
    ("model-too-short", lambda f, o: inf(f["short.m"]), ["short.m", "6 bytes, too short"]),
    ("model-wrong-magic", lambda f, o: inf(f["magic.m"]), ["magic.m", "not a .m model file", "magic 0x78563412"]),
    ("model-old-magic", lambda f, o: inf(f["old.m"]), ["old.m", "old Distributed Llama model format", "0xabcd00"]),
    ("model-is-gguf", lambda f, o: inf(f["gguf.m"]), ["gguf.m", "GGUF version", "is not supported"]),
    ("header-size-not-pairs", lambda f, o: inf(f["hsize_odd.m"]), ["hsize_odd.m", "header_size 13"]),
    ("header-size-beyond-file", lambda f, o: inf(f["hsize_big.m"]), ["hsize_big.m", "header_size 1073741824", "larger"]),
    ("header-size-lies", lambda f, o: inf(f["hsize_lie.m"]), ["hsize_lie.m", "header describes", "bytes"]),
    ("header-truncated", lambda f, o: inf(f["trunc_header.m"]), ["trunc_header.m", "header_size 176 is larger than the file (100 bytes)"]),
    ("tensor-data-truncated", lambda f, o: inf(f["trunc_data.m"]), ["trunc_data.m", "1000 bytes missing"]),
    ("tensor-data-extra", lambda f, o: inf(f["extra.m"]), ["extra.m", "7 bytes extra"]),
    ("header-unknown-key", lambda f, o: inf(f["key99.m"]), ["key99.m", "unknown header key 99"]),
    ("header-duplicate-key", lambda f, o: inf(f["dupkey.m"]), ["dupkey.m", "appears twice"]),
    ("header-unknown-arch", lambda f, o: inf(f["arch.m"]), ["arch.m", "arch_type", "0x1234"]),
    ("header-unknown-rope", lambda f, o: inf(f["rope.m"]), ["rope.m", "rope_type", "unknown value 9"]),
    ("header-unknown-float-type", lambda f, o: inf(f["ftype.m"]), ["ftype.m", "weights_float_type", "unknown value 7"]),
    ("header-unknown-activation", lambda f, o: inf(f["act.m"]), ["act.m", "hidden_act", "unknown value 5"]),
    ("header-bad-epsilon", lambda f, o: inf(f["eps.m"]), ["eps.m", "norm_epsilon", "is 4"]),
    ("header-bad-version", lambda f, o: inf(f["version.m"]), ["version.m", "version", "is 3"]),
    ("header-zero-dim", lambda f, o: inf(f["dim0.m"]), ["dim0.m", "(dim) is 0"]),
    ("header-heads-not-multiple", lambda f, o: inf(f["kvheads.m"]), ["kvheads.m", "n_kv_heads 3"]),
    ("header-gemma3-key-on-llama", lambda f, o: inf(f["window.m"]), ["window.m", "key 64 (sliding_window)", "gemma3"]),
    ("tokenizer-empty", lambda f, o: inf(LLAMA_Q40, f["empty.t"]), ["empty.t", "magic", "truncated"]),
    ("tokenizer-wrong-magic", lambda f, o: inf(LLAMA_Q40, f["magic.t"]), ["magic.t", "not a .t tokenizer file"]),
    ("tokenizer-truncated", lambda f, o: inf(LLAMA_Q40, f["trunc.t"]), ["trunc.t", "token 511", "truncated"]),
    ("tokenizer-negative-length", lambda f, o: inf(LLAMA_Q40, f["neglen.t"]), ["neglen.t", "token 0 has length -1"]),
    ("tokenizer-token-past-eof", lambda f, o: inf(LLAMA_Q40, f["toolong.t"]),
     ["toolong.t", "token 511 bytes needs 100000 bytes"]),
    ("tokenizer-unknown-key", lambda f, o: inf(LLAMA_Q40, f["key42.t"]), ["key42.t", "unknown header key 42"]),
    ("tokenizer-negative-vocab", lambda f, o: inf(LLAMA_Q40, f["vocabneg.t"]), ["vocabneg.t", "vocab_size is -5"]),
    ("tokenizer-bos-outside", lambda f, o: inf(LLAMA_Q40, f["bos.t"]), ["bos.t", "bos_id 100000"]),
    ("tokenizer-bad-version", lambda f, o: inf(LLAMA_Q40, f["tokversion.t"]), ["tokversion.t", "version", "is 7"]),
    ("vocab-mismatch", lambda f, o: inf(LLAMA_Q40, f["small.t"]), ["small.t", "500 tokens", "vocab_size 512"]),
    ("max-seq-len-zero", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--max-seq-len", "0"), ["--max-seq-len", "got 0"]),
    ("max-seq-len-negative", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--max-seq-len", "-3"), ["--max-seq-len", "got -3"]),
    ("max-seq-len-beyond-model", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--max-seq-len", "5000"),
     ["--max-seq-len", "1..", "got 5000"]),
    ("prompt-longer-than-context", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--max-seq-len", "4"),
     ["prompt has", "tokens", "context (4)"]),
    ("steps-negative", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--steps", "-1"), ["--steps", "got -1"]),
    ("draft-max-zero", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--spec", "ngram", "--draft-max", "0"),
     ["--draft-max", "got 0"]),
    ("draft-min-above-max", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--draft-max", "4", "--draft-min", "5"),
     ["--draft-min", "0..--draft-max (4)", "got 5"]),
    # --spec draft: the draft model is checked on the root before any weight moves
    ("spec-draft-without-model", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--spec", "draft"),
     ["--spec draft needs --draft-model FILE"]),
    ("draft-p-min-out-of-range", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--spec", "draft", "--draft-model",
                                                  str(LLAMA_Q40), "--draft-p-min", "1.5"),
     ["--draft-p-min must be in 0..1, got 1.5"]),
    ("draft-model-missing", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--spec", "draft", "--draft-model",
                                             str(o / "missing.m")),
     ["--draft-model", "missing.m: draft model file not found"]),
    ("draft-model-other-vocab-size", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--spec", "draft", "--draft-model",
                                                      str(f["qwen2.gguf"])),
     ["--draft-model", "qwen2.gguf: its vocabulary has 256 tokens, the model's 512"]),
    ("draft-model-other-vocab-texts", lambda f, o: inf(QWEN_Q40, TOK_QWEN, "--spec", "draft", "--draft-model",
                                                       str(f["ok.gguf"])),
     ["--draft-model", "ok.gguf: its vocabulary differs from the model's at token"]),
    ("draft-model-unsupported-arch", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--spec", "draft", "--draft-model",
                                                      str(f["gpt2.gguf"])),
     ["--draft-model: ", "gpt2.gguf", "unsupported architecture 'gpt2'"]),
    ("json-schema-missing", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--json-schema", str(o / "none.json")),
     ["--json-schema", "none.json: cannot read"]),
    ("json-schema-not-an-object", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--json-schema", str(f["list.json"])),
     ["--json-schema", "list.json: a JSON schema must be a JSON object"]),
    ("nthreads-zero", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--nthreads", "0"), ["--nthreads", "got 0"]),
    ("batch-zero", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, "--batch", "0"), ["--batch", "got 0"]),
    ("prompt-invalid-utf8", lambda f, o: inf(LLAMA_Q40, TOK_LLAMA, prompt=b"ab\xffcd"),
     ["prompt is not valid UTF-8", "index 2"]),
    ("chat-template-raises", lambda f, o: ["chat", "--model", str(QWEN_Q40), "--tokenizer", str(TOK_QWEN),
                                           "--chat-template", "{{ raise_exception('boom here') }}"],
     ["chat template", "boom here"]),
    ("api-bad-port", lambda f, o: ["api", "--model", str(QWEN_Q40), "--tokenizer", str(TOK_QWEN), "--port", "0"],
     ["--port", "got 0"]),
    ("model-type-table-wrong-length", lambda f, o: inf(f["types28.m"]),
     ["types28.m", "header key 22 (n_tensor_types) is 28, the model has 29 matrices"]),
    ("perplexity-text-too-short", lambda f, o: ["perplexity", "--model", str(LLAMA_Q40), "--tokenizer", str(TOK_LLAMA),
                                                "--file", str(f["short.txt"]), "--ctx", "64"],
     ["short.txt tokenizes to only", "at least 128 are needed for --ctx 64"]),
    ("perplexity-kld-without-base", lambda f, o: ["perplexity", "--model", str(LLAMA_Q40), "--tokenizer",
                                                  str(TOK_LLAMA), "--kl-divergence"],
     ["--kl-divergence needs --kl-divergence-base FILE"]),
    ("tokenize-no-text", lambda f, o: ["tokenize", "--tokenizer", str(TOK_LLAMA)], ["give exactly one of --text and --file"]),
    # a GGUF as the model: the reader runs on every start (the header, metadata and tensor table
    # checked against the file before anything moves)
    ("gguf-model-truncated", lambda f, o: gguf_inf(f["trunc.gguf"]),
     ["trunc.gguf", "tensor output.weight", "ends past the end of the file", "truncated?"]),
    ("gguf-model-huge-count", lambda f, o: gguf_inf(f["huge.gguf"]),
     ["huge.gguf", "1152921504606846976 tensors", "more than"]),
    ("gguf-model-bad-metadata", lambda f, o: gguf_inf(f["badmeta.gguf"]), ["badmeta.gguf", "metadata llama.block_count"]),
    ("gguf-model-missing-tensor", lambda f, o: gguf_inf(f["missing.gguf"]),
     ["missing.gguf", "tensor blk.1.ffn_up.weight not found"]),
    ("gguf-model-unsupported-arch", lambda f, o: gguf_inf(f["gpt2.gguf"]), ["gpt2.gguf", "unsupported architecture 'gpt2'"]),
    ("gguf-model-unreadable-type", lambda f, o: gguf_inf(f["q81.gguf"]),
     ["q81.gguf", "tensor blk.1.ffn_up.weight is Q8_1, which neither dllama-mpi nor gguf can read"]),
    ("gguf-model-vocab-mismatch", lambda f, o: gguf_inf(f["ok.gguf"], "--tokenizer", str(f["small.t"])),
     ["small.t", "500 tokens", "vocab_size 512"]),
    # a split GGUF (llama.cpp's gguf-split) is one model: every part is found and checked
    ("gguf-model-split-part-missing", lambda f, o: gguf_inf(f["split-missing"][0]),
     ["split-missing/ok-00003-of-00003.gguf: part 3 of the 3-part GGUF", "split-missing/ok-00001-of-00003.gguf is missing"]),
    ("gguf-model-split-count-differs", lambda f, o: gguf_inf(f["split-count"][0]),
     ["split-count/ok-00002-of-00003.gguf: split.count is 4, but", "split-count/ok-00001-of-00003.gguf says 3"]),
    ("gguf-model-split-wrong-number", lambda f, o: gguf_inf(f["split-no"][1]),
     ["split-no/ok-00003-of-00003.gguf: split.no is 1, expected 2 (part 3 by its name)"]),
    ("gguf-model-split-other-model", lambda f, o: gguf_inf(f["split-other"][0]),
     ["split-other/ok-00002-of-00003.gguf: split.tensors.count is", "(a part of another model?)"]),
    ("gguf-missing", lambda f, o: ["convert", "gguf", str(o / "nope.gguf"), "--out-model", str(o / "o.m")],
     ["nope.gguf", "file not found"]),
    ("gguf-not-gguf", lambda f, o: ["convert", "gguf", str(f["junk.gguf"]), "--out-model", str(o / "o.m")],
     ["junk.gguf", "not a GGUF file"]),
    ("gguf-unsupported-arch", lambda f, o: ["convert", "gguf", str(f["gpt2.gguf"]), "--out-model", str(o / "o.m")],
     ["gpt2.gguf", "unsupported architecture 'gpt2'"]),
    ("gguf-unsupported-tensor-type", lambda f, o: ["convert", "gguf", str(f["q81.gguf"]), "--out-model", str(o / "o.m")],
     ["q81.gguf", "blk.1.ffn_up.weight", "is Q8_1, which neither dllama-mpi nor gguf can read"]),
    ("as-nodes-cannot-split", lambda f, o: inf(LLAMA_Q40) + ["--as-nodes", "3"],
     ["--as-nodes 3: cannot split the model over 3 nodes", "head_dim 16"]),
    ("benchmark-bad-sampling", lambda f, o: ["benchmark", "--model", str(LLAMA_Q40), "--tokenizer", str(TOK_LLAMA),
                                             "--steps", "2", "--temperature", "-1"],
     ["--temperature must be >= 0 and --topp in [0, 1], got -1.0 and 0.9"]),
    ("hf-no-config", lambda f, o: ["convert", "hf", str(f["hf_noconfig"]), "--out-model", str(o / "o.m")],
     ["config.json", "file not found"]),
    ("hf-missing-tensor", lambda f, o: ["convert", "hf", str(f["hf_missing"]), "--out-model", str(o / "o.m")],
     ["hf_missing", "model.layers.2.mlp.down_proj.weight not found"]),
]
# rows whose check is the node count itself (run at that count only)
SPLIT_CASES = [
    ("nodes-cannot-split", 3, lambda f, o: inf(LLAMA_Q40), ["cannot split the model over 3 nodes", "head_dim 16"]),
    ("nodes-cannot-split-4", 4, lambda f, o: inf(LLAMA_Q40), ["cannot split the model over 4 nodes"]),
    ("as-nodes-below-node-count", 2, lambda f, o: inf(LLAMA_Q40) + ["--as-nodes", "1"],
     ["--as-nodes 1 is below the node count 2"]),
]
# converters are not MPI programs: one process (under mpiexec -n 2 every rank would convert)
SINGLE_ONLY = {c[0] for c in CASES if c[0].startswith(("gguf-", "hf-")) and not c[0].startswith("gguf-model-")}
# mode 000 stops a reader only without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH
UNREADABLE_ROWS = {"model-unreadable", "tokenizer-unreadable"}


@pytest.fixture(scope="module")
def files():
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="dllama-bad-"))
    try:
        f = _build_files(d)
        f.update(_build_convert_inputs(d))
        yield f
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _unreadable_prefix():
    """As root, drop the capabilities that bypass file modes (still root, so the checkout and the
    venv stay reachable wherever they are; switching to `nobody` failed in a 0700 checkout)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


def _our_processes(tag: str, grace: float = 15.0) -> list[int]:
    """Live processes started with DLLAMA_TEST_TAG=tag, after waiting up to `grace` s for them to go
    (mpiexec may return a moment before hydra's proxies are reaped; on a 2-core CI host busy with
    the rest of the suite one once took longer than 5 s)."""
    deadline = time.time() + grace
    while True:
        left = _tagged(tag)
        if not left or time.time() > deadline:
            return left
        time.sleep(0.05)


def _describe(pid: int) -> str:
    """pid, state and command line, for a failure message"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        return f"{pid} [{stat}] {cmd[:200]}"
    except OSError:
        return f"{pid} (gone)"


def _tagged(tag: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if f"DLLAMA_TEST_TAG={tag}".encode() in (p / "environ").read_bytes():
                out.append(int(p.name))
        except OSError:
            pass
    return out


def run_case(argv, n, tmp, prefix=(), stdin=subprocess.DEVNULL, timeout=40):
    """Run argv (str or bytes items) on n ranks; returns (CompletedProcess with bytes, seconds)."""
    tag = uuid.uuid4().hex
    env = dict(os.environ, DLLAMA_TEST_TAG=tag, PYTHONDONTWRITEBYTECODE="1")
    cmd = ([MPIEXEC, "-n", str(n)] if n > 1 else []) + list(prefix) + DLLAMA + argv
    cmd = [c if isinstance(c, bytes) else os.fsencode(c) for c in cmd]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=stdin, env=env, cwd=tmp)
    dt = time.time() - t
    left = _our_processes(tag)
    assert not left, f"processes left behind: {[_describe(p) for p in left]}"
    return r, dt


def check_one_line(r, needles):
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _params():
    out = []
    for cid, argv, needles in CASES:
        for n in (1, 2):
            if n == 2 and cid in SINGLE_ONLY:
                continue
            out.append(pytest.param(cid, n, argv, needles, id=f"{cid}-n{n}"))
    for cid, n, argv, needles in SPLIT_CASES:
        out.append(pytest.param(cid, n, argv, needles, id=f"{cid}-n{n}"))
    return out


@pytest.mark.parametrize("cid,n,argv,needles", _params())
def test_bad_input(files, tmp_path, cid, n, argv, needles):
    prefix = _unreadable_prefix() if cid in UNREADABLE_ROWS else ()
    stdin = subprocess.PIPE if cid.startswith("chat-") else subprocess.DEVNULL
    args = argv(files, tmp_path)
    if cid.startswith("chat-"):
        tag = uuid.uuid4().hex
        env = dict(os.environ, DLLAMA_TEST_TAG=tag)
        cmd = ([MPIEXEC, "-n", str(n)] if n > 1 else []) + DLLAMA + args
        t = time.time()
        r = subprocess.run(cmd, input=b"hello\n", capture_output=True, timeout=40, env=env, cwd=tmp_path)
        dt = time.time() - t
        assert not _our_processes(tag)
    else:
        r, dt = run_case(args, n, tmp_path, prefix, stdin)
    line = check_one_line(r, needles)
    assert dt < 20, dt
    assert "\n" not in line
    if args[0] == "convert":
        assert not (tmp_path / "o.m").exists() and not (tmp_path / "o.m.partial").exists()


@pytest.mark.parametrize("n", [1, 2])
def test_q40_model_with_f32_buffers_runs(tmp_path, n):
    """Not an error: q40 weights with f32 activations are supported (and give text)."""
    r, _ = run_case(inf(QWEN_Q40, TOK_QWEN, "--buffer-float-type", "f32", "--temperature", "0", "--json"),
                    n, tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    import json

    out = json.loads(r.stdout)
    assert out["buffer_float_type"] == "f32" and out["generated_tokens"] == 4


def test_table_lists_every_case():
    """tests/BAD_INPUT.md holds one row per case id, and at least 40 of them."""
    text = TABLE.read_text()
    ids = re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M)
    expected = [c[0] for c in CASES] + [c[0] for c in SPLIT_CASES] + ["q40-with-f32-buffers"]
    assert sorted(ids) == sorted(expected)
    assert len([i for i in ids if i != "q40-with-f32-buffers"]) >= 40
