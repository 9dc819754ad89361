"""Split GGUFs (llama.cpp's gguf-split: NAME-00001-of-00003.gguf ...) are one model: `--model` may
name any part, every part is checked, and the model is the single file's, bit for bit. The parts
are made by tests/gguf_models.split_gguf, byte for byte what llama-gguf-split writes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from gguf_models import split_gguf, write_random_gguf
from test_cli import run

from dllama_mpi.comm import Comm
from dllama_mpi.errors import ModelFormatError
from dllama_mpi.formats import Q40, Q4_K, Q6_K, Q80
from dllama_mpi.gguf import GGUFFile, open_gguf_model, tokenizer_data

TYPES = {"attn_output": Q4_K, "ffn_down": Q6_K, "attn_q": Q40, "output": Q80}
IDS = [496, 12, 200, 7, 33, 41, 300, 2, 18, 99, 5, 401]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(the single file, its 3 parts of at most 8 of its 21 tensors)"""
    d = tmp_path_factory.mktemp("split")
    single = write_random_gguf(d / "m.gguf", TYPES)
    return single, split_gguf(single, d / "m", 8)


def _logits(path):
    from dllama_mpi.startup import build_engine

    engine = build_engine(Comm(MPI.COMM_SELF), str(path), quiet=True)
    return engine.forward(IDS, 0, all_logits=True)


def test_the_splitter_writes_gguf_splits_layout(model):
    single, parts = model
    assert [p.name for p in parts] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    g = [GGUFFile(single)] + [GGUFFile(p) for p in parts]
    assert [len(x.tensors) for x in g] == [21] * 4


@pytest.mark.parametrize("named", [0, 1, 2])
def test_any_part_opens_the_whole_model(model, named):
    """Whichever part --model names: the first part's metadata, every tensor's bytes from its own part,
    the same header and tokenizer as the single file."""
    single, parts = model
    one, split = GGUFFile(single), GGUFFile(parts[named])
    assert split.path == str(parts[0]) and split.paths == [str(p) for p in parts]
    assert {k: v for k, v in split.fields.items() if not k.startswith("split.")}.keys() == one.fields.keys()
    assert (split.fields["split.no"], split.fields["split.count"], split.fields["split.tensors.count"]) == (0, 3, 21)
    assert sorted({t.part for t in split.tensors.values()}) == [0, 1, 2]
    assert list(split.tensors) == list(one.tensors)
    for name, t in one.tensors.items():
        s = split.tensors[name]
        assert np.array_equal(split.data(s.part, s.offset, s.nbytes), one.data(t.part, t.offset, t.nbytes)), name
    assert open_gguf_model(parts[named]).header == open_gguf_model(single).header
    a, b = tokenizer_data(one), tokenizer_data(split)
    assert a.vocab == b.vocab and a.chat_template == b.chat_template


@pytest.mark.parametrize("named", [0, 2])
def test_split_logits_equal_the_single_file(model, named):
    single, parts = model
    assert np.array_equal(_logits(parts[named]).view(np.uint32), _logits(single).view(np.uint32))


def test_first_part_without_tensors(model, tmp_path):
    """gguf-split --no-tensor-first-split: part 1 is the metadata alone."""
    single, _ = model
    parts = split_gguf(single, tmp_path / "m", 10, empty_first=True)
    assert len(parts) == 4 and not GGUFFile(single).tensors.keys() - GGUFFile(parts[3]).tensors.keys()
    assert np.array_equal(_logits(parts[3]), _logits(single))


def test_commands_take_any_part(model, tmp_path):
    """inference and tokenize as processes, convert gguf in-process: part 2 or 3 named, the single
    file's tokens and .m bytes."""
    from dllama_mpi.convert.gguf import convert_gguf

    single, parts = model
    args = ["--prompt", "The quick brown fox", "--steps", "6", "--temperature", "0", "--ignore-eos", "--json"]
    want = run(["inference", "--model", str(single), *args])
    got = run(["inference", "--model", str(parts[1]), *args])
    assert want.returncode == 0 and got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["generated_ids"] == json.loads(want.stdout)["generated_ids"]
    tok = run(["tokenize", "--model", str(parts[2]), "--text", "Hello split world", "--ids"])
    assert tok.returncode == 0 and tok.stdout == run(["tokenize", "--model", str(single), "--text",
                                                      "Hello split world", "--ids"]).stdout
    convert_gguf(str(single), str(tmp_path / "a.m"), str(tmp_path / "a.t"), "native", quiet=True)
    convert_gguf(str(parts[2]), str(tmp_path / "b.m"), str(tmp_path / "b.t"), "native", quiet=True)
    for ext in ("m", "t"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes()


# ------------------------------------------------------------------------------------------------
# broken splits: one line naming the file and the problem (tests/BAD_INPUT.md has them as commands)

def _copy(parts, d: Path) -> list[Path]:
    d.mkdir()
    return [Path(shutil.copy(p, d / p.name)) for p in parts]


def _bad(path, *needles):
    with pytest.raises(ModelFormatError) as e:
        GGUFFile(path)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_missing_part(model, tmp_path):
    parts = _copy(model[1], tmp_path / "c")
    parts[2].unlink()
    _bad(parts[0], f"{parts[2]}: part 3 of the 3-part GGUF {parts[0]} is missing")
    _bad(parts[1], f"{parts[2]}: part 3 of the 3-part GGUF {parts[1]} is missing")


def test_part_with_another_count(model, tmp_path):
    parts = split_gguf(model[0], tmp_path / "m", 8, keys={1: {"split.count": 4}})
    _bad(parts[0], f"{parts[1]}: split.count is 4, but {parts[0]} says 3")
    _bad(parts[1], f"{parts[1]}: part 2 of a 4-part split GGUF must be named PREFIX-00002-of-00004.gguf")


def test_part_with_a_wrong_number(model, tmp_path):
    parts = split_gguf(model[0], tmp_path / "m", 8, keys={2: {"split.no": 1}})
    _bad(parts[0], f"{parts[2]}: split.no is 1, expected 2 (part 3 by its name)")


def test_part_of_another_model(model, tmp_path):
    """The part 2 of a tied model (20 tensors) among this model's parts (21)."""
    other = split_gguf(write_random_gguf(tmp_path / "tied.gguf", tied=True), tmp_path / "tied", 8)
    parts = _copy(model[1], tmp_path / "c")
    shutil.copy(other[1], parts[1])
    _bad(parts[0], f"{parts[1]}: split.tensors.count is 20, but {parts[0]} says 21 (a part of another model?)")


def test_parts_holding_other_than_the_count(model, tmp_path):
    parts = split_gguf(model[0], tmp_path / "m", 8, keys={i: {"split.tensors.count": 22} for i in range(3)})
    _bad(parts[1], f"{parts[0]}: the 3 parts hold 21 tensors, but split.tensors.count is 22")


def test_tensor_in_two_parts(model, tmp_path):
    parts = _copy(model[1], tmp_path / "c")
    data = parts[1].read_bytes()
    assert b"blk.1.attn_q.weight" in data
    parts[1].write_bytes(data.replace(b"blk.1.attn_q.weight", b"blk.0.attn_q.weight"))   # a name of part 1's
    _bad(parts[0], f"{parts[1]}: tensor blk.0.attn_q.weight is also in {parts[0]}")


def test_part_renamed(model, tmp_path):
    """A part's name is how the others are found: it must be gguf-split's."""
    renamed = tmp_path / "m.gguf"
    shutil.copy(model[1][1], renamed)
    _bad(renamed, f"{renamed}: part 2 of a 3-part split GGUF must be named PREFIX-00002-of-00003.gguf")


def test_api_model_id_drops_the_part():
    from dllama_mpi.api import _model_id

    assert _model_id("/x/Qwen3-8B-Q4_K_M-00001-of-00003.gguf") == "Qwen3-8B-Q4_K_M"
    assert _model_id("/x/m.gguf") == "m"
