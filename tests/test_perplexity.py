"""`dllama-mpi perplexity`: llama.cpp's method against an independent numpy float64 computation, at 1
and 2 ranks (real mpiexec), the KL-divergence base file and its statistics, bad input."""

import json
import math
import struct

import numpy as np
import pytest

from conftest import DATA, TINY
from reference_forward import ReferenceLlama
from test_cli import LLAMA_F32, TOK_LLAMA, run

from dllama_mpi.perplexity import KLD, encode_log_probs, nll_rows, nv_of
from dllama_mpi.tokenizer import Tokenizer

TEXT = DATA / "text" / "kjv_genesis_1-6.txt"
LLAMA_Q80 = str(TINY / "m" / "dllama_model_tiny_llama_q80.m")
CTX, CHUNKS = 256, 8          # 2048 tokens of the text


def numpy_perplexity(model, tokenizer, text, ctx, n_chunk):
    """llama.cpp's method written out independently: float64 forward pass (reference_forward.py),
    float64 log-softmax; returns (ppl, +/- error, running ppl)."""
    ref = ReferenceLlama(model)
    tok = Tokenizer.load(tokenizer)
    ids = tok.encode(text, parse_special=False)
    assert ids[0] == tok.bos_id                                  # tiny_llama3 adds BOS
    first = ctx // 2
    nll, running = [], []
    for i in range(n_chunk):
        chunk = ids[i * ctx:(i + 1) * ctx]
        chunk = [tok.bos_id] + chunk[1:]                         # BOS replaces the first token
        logits = ref.forward(chunk)                              # positions 0..ctx-1, float64
        for p in range(first, ctx - 1):
            l = logits[p]
            nll.append(np.log(np.exp(l - l.max()).sum()) + l.max() - l[chunk[p + 1]])
        running.append(math.exp(np.mean(nll)))
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    return ppl, ppl * math.sqrt(((nll ** 2).mean() - nll.mean() ** 2) / (len(nll) - 1)), running


@pytest.fixture(scope="module")
def reference():
    return numpy_perplexity(LLAMA_F32, TOK_LLAMA, TEXT.read_text(), CTX, CHUNKS)


@pytest.mark.parametrize("n", [1, 2])
def test_perplexity_equals_numpy_reference(n, reference):
    ppl, err, running = reference
    r = run(["perplexity", "--model", LLAMA_F32, "--tokenizer", TOK_LLAMA, "--file", str(TEXT),
             "--ctx", str(CTX), "--chunks", str(CHUNKS), "--json"], n=n, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["chunks"], out["scored"], out["nodes"], out["ctx"]) == (CHUNKS, CHUNKS * (CTX - 1 - CTX // 2), n, CTX)
    assert out["tokens"] > 2000
    assert abs(out["ppl"] / ppl - 1) < 1e-4, (out["ppl"], ppl)
    assert abs(out["ppl_unc"] / err - 1) < 1e-3, (out["ppl_unc"], err)
    np.testing.assert_allclose(out["running_ppl"], running, rtol=1e-4)
    # the human form (stderr with --json): llama.cpp's running [i]ppl and final line
    assert f"[{CHUNKS}]" in r.stderr and "Final estimate: PPL = " in r.stderr


def test_perplexity_text_output_on_stdout():
    r = run(["perplexity", "--model", LLAMA_F32, "--tokenizer", TOK_LLAMA, "--file", str(TEXT),
             "--ctx", "64", "--chunks", "2"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("[1]") and lines[0].count(",") == 2 and "[2]" in lines[0]
    assert lines[1].startswith("Final estimate: PPL = ") and " +/- " in lines[1]


def test_kl_divergence_base_and_compare(tmp_path):
    base = tmp_path / "f32.kld"
    r = run(["perplexity", "--model", LLAMA_F32, "--tokenizer", TOK_LLAMA, "--file", str(TEXT), "--ctx", "128",
             "--chunks", "4", "--kl-divergence-base", str(base), "--json"])
    assert r.returncode == 0, r.stderr
    f32_ppl = json.loads(r.stdout)["ppl"]
    # llama.cpp's layout: "_logits_", n_ctx, n_vocab, n_chunk, tokens, then 63 rows of nv uint16 per chunk
    data = base.read_bytes()
    assert data[:8] == b"_logits_" and struct.unpack("<3i", data[8:20]) == (128, 512, 4)
    assert len(data) == 20 + 4 * 128 * 4 + 2 * 63 * nv_of(512) * 4
    out = {}
    for model, n in ((LLAMA_F32, 1), (LLAMA_Q80, 2)):
        r = run(["perplexity", "--model", model, "--tokenizer", TOK_LLAMA, "--kl-divergence",
                 "--kl-divergence-base", str(base), "--json"], n=n)
        assert r.returncode == 0, r.stderr
        out[model] = json.loads(r.stdout)
        assert "Mean    KLD:" in r.stderr and "Same top p:" in r.stderr
    same, q80 = out[LLAMA_F32], out[LLAMA_Q80]
    assert same["tokens"] == 4 * 63 and same["same_top"] == 1.0 and same["kld"] < 1e-6
    assert abs(same["ppl"] / f32_ppl - 1) < 1e-6
    assert 1e-4 < q80["kld"] < 0.05 and 0.85 < q80["same_top"] < 1.0, q80


def test_log_prob_coding_and_kld_against_numpy():
    # the 16-bit coding keeps log-probs to within half a step (range max - 16 .. max); KLD of a
    # distribution with itself is 0 (up to the coding), and equals numpy's sum p log(p/q) otherwise
    r = np.random.default_rng(3)
    logits = (r.standard_normal((20, 300)) * 3).astype(np.float32)
    coded = encode_log_probs(logits)
    assert coded.shape == (20, nv_of(300))
    head = coded[:, :4].copy().view(np.float32)
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    dec = head[:, :1] * coded[:, 4:304] + head[:, 1:2]
    keep = logp > logp.max(1, keepdims=True) - 16
    assert np.all(np.abs(dec - logp)[keep] <= head[:, :1].repeat(300, 1)[keep] * 0.51 + 1e-6)
    other = logits + (r.standard_normal(logits.shape) * 0.3).astype(np.float32)
    targets = r.integers(0, 300, 20)
    k = KLD()
    k.add(other, coded, targets)
    logq = other - other.max(1, keepdims=True)
    logq = logq - np.log(np.exp(logq).sum(1, keepdims=True))
    want = (np.exp(dec) * (dec - logq)).sum(1).mean()
    assert abs(k.report()["kld"] - want) < 1e-5
    np.testing.assert_allclose(nll_rows(other, targets), -logq[np.arange(20), targets], rtol=1e-5)
    assert k.report()["same_top"] == np.mean(other.argmax(1) == logits.argmax(1))


@pytest.mark.parametrize("args,pattern", [
    (["--ctx", "2048"], r"--ctx 2048 is beyond the model's context \(1024\)"),
    (["--ctx", "64", "--file", "SHORT"], r"short\.txt tokenizes to only \d+ tokens; at least 128 are needed for --ctx 64"),
    (["--kl-divergence"], r"--kl-divergence needs --kl-divergence-base FILE"),
    ([], None),
])
def test_bad_input_one_line(tmp_path, args, pattern):
    if pattern is None:    # a base file that is not one
        junk = tmp_path / "junk.kld"
        junk.write_bytes(b"_logits_" + b"\0" * 4)
        args, pattern = ["--kl-divergence", "--kl-divergence-base", str(junk)], r"junk\.kld: not a file of base"
    if "SHORT" in args:
        (tmp_path / "short.txt").write_text("In the beginning God created the heaven and the earth.\n")
        args = [str(tmp_path / "short.txt") if a == "SHORT" else a for a in args]
    if "--file" not in args:
        args = ["--file", str(TEXT), *args]
    r = run(["perplexity", "--model", LLAMA_F32, "--tokenizer", TOK_LLAMA, *args])
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, r.stderr
    import re
    assert re.search(pattern, errors[0]), errors[0]
