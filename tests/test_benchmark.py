"""`dllama-mpi benchmark` (JSON document, per-rank split, --prompts, errors) and the synthetic
model generator (scripts/make_synthetic.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY

BIN = Path(sys.executable).parent
DLLAMA = [str(BIN / "dllama-mpi")] if (BIN / "dllama-mpi").exists() else [sys.executable, "-m", "dllama_mpi.cli"]
MPIEXEC = str(BIN / "mpiexec")
ROOT = Path(__file__).resolve().parent.parent
LLAMA_Q40 = str(TINY / "m" / "dllama_model_tiny_llama_q40.m")
MOE_Q40 = str(TINY / "m" / "dllama_model_tiny_qwen3_moe_q40.m")
TOK_LLAMA = str(TINY / "t" / "dllama_tokenizer_tiny_llama3.t")
TOK_QWEN = str(TINY / "t" / "dllama_tokenizer_tiny_qwen3.t")


def bench(args, n=1, timeout=120, env=None):
    cmd = ([MPIEXEC, "-n", str(n)] if n > 1 else []) + DLLAMA + ["benchmark"] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=None if env is None else {**os.environ, **env})


@pytest.mark.parametrize("n", [1, 2])
def test_benchmark_json(n):
    from dllama_mpi import kernels as K

    # 2 ranks: the kernels' ISA forced through the environment (every rank reports it)
    isa = K.isa_name() if n == 1 else "scalar"
    r = bench(["--model", LLAMA_Q40, "--tokenizer", TOK_LLAMA, "--synthetic", "5,9", "--steps", "4",
               "--repeat", "2", "--warmup", "1", "--bandwidth", "10", "--profile"], n=n,
              env=None if n == 1 else {"DLLAMA_ISA": "scalar"})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["schema"] == "dllama-mpi-benchmark/1"
    assert d["config"]["nodes"] == n and d["config"]["repack"] is True
    assert [x["prompt_tokens"] for x in d["runs"]] == [5, 9]
    for x in d["runs"]:
        assert x["decode_tok_s"]["n"] == 8 and x["decode_tok_s"]["median"] > 0
        assert x["prefill_tok_s"]["n"] == 2
    assert len(d["per_rank"]) == n
    for pr in d["per_rank"]:
        assert pr["decode_tokens"] == 16                 # timed runs only: warm-up excluded on every rank
        assert pr["c_ms"] > 0 and pr["python_ms"] >= 0 and pr["peak_rss_mb"] > 0
        assert pr["c_ms_by_function"]["dl_matmul_q40r_q80"] > 0
        assert pr["bytes_sent_per_token"] == pr["bytes_sent_per_token_model"]
        if n == 1:
            assert pr["bytes_sent_per_token"] == 0
    assert d["system"]["bandwidth_gbps"] == 10 and d["system"]["bandwidth_source"] == "option"
    assert sum(p["weight_bytes_per_token"] for p in d["per_rank"]) == d["model"]["weight_bytes_per_token"]
    assert "decode" in r.stderr and "rank" in r.stderr    # the human table
    assert [pr["kernel_isa"] for pr in d["per_rank"]] == [isa] * n and d["summary"]["kernel_isa"] == isa
    assert d["summary"]["pct_of_bandwidth_ceiling"] > 0 and f"({isa} kernels)" in r.stderr


def test_benchmark_samples_as_asked():
    """--temperature / --topp / --seed / --sampled-rows: the JSON names them; at 2 ranks the sampled rows
    come from the ranks' summaries, and with whole rows asked for none do (those rows are full rows,
    counted as neither kind of sampled row)."""
    for way in ("summaries", "whole"):
        r = bench(["--model", LLAMA_Q40, "--tokenizer", TOK_LLAMA, "--synthetic", "5", "--steps", "6", "--repeat", "1",
                   "--warmup", "0", "--bandwidth", "10", "--temperature", "0.8", "--topp", "0.95", "--seed", "3",
                   "--sampled-rows", way], n=2)
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        assert d["config"]["sampling"] == {"temperature": 0.8, "topp": 0.95, "seed": 3, "sampled_rows": way}
        s = d["summary"]
        assert (s["sampled_rows_summarised"] > 0) == (way == "summaries") and s["sampled_rows_whole"] == 0


def test_benchmark_prompts_file_moe(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "Hello there"}\n\nplain text line\n')
    r = bench(["--model", MOE_Q40, "--tokenizer", TOK_QWEN, "--prompts", str(p), "--steps", "3", "--repeat", "1",
               "--warmup", "0", "--bandwidth", "5"])
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [x["prompt"] for x in d["runs"]] == ["Hello there", "plain text line"]
    assert d["summary"]["tokens_per_pass"] == 1 and d["summary"]["message_rounds_per_pass"] == 0
    assert d["summary"]["pass_cost_ms"] is None   # no speculation


def test_benchmark_prompts_file_messages_use_the_chat_template(tmp_path):
    """{"messages": [...]} lines are rendered with the model's chat template (as `batch` renders them)."""
    p = tmp_path / "p.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "Hello there"}]}\n')
    r = bench(["--model", MOE_Q40, "--tokenizer", TOK_QWEN, "--prompts", str(p), "--steps", "2", "--repeat", "1",
               "--warmup", "0", "--bandwidth", "5"])
    assert r.returncode == 0, r.stderr
    prompt = json.loads(r.stdout)["runs"][0]["prompt"]
    assert "<|im_start|>user\nHello there<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n"), prompt
    p.write_text('{"messages": "not a list"}\n')
    r = bench(["--model", MOE_Q40, "--tokenizer", TOK_QWEN, "--prompts", str(p), "--bandwidth", "5"])
    assert r.returncode == 2 and 'without a "prompt" or "messages" key' in r.stderr.strip().splitlines()[-1]


def test_plot_draws_a_chart_from_saved_runs(tmp_path):
    r = bench(["--model", LLAMA_Q40, "--tokenizer", TOK_LLAMA, "--synthetic", "8", "--steps", "2", "--repeat", "1",
               "--warmup", "0", "--bandwidth", "5"])
    assert r.returncode == 0, r.stderr
    (tmp_path / "run.json").write_text(r.stdout)
    png = tmp_path / "chart.png"
    r = bench(["--plot", str(png), str(tmp_path / "run.json")])
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_errors(tmp_path):
    r = bench(["--model", LLAMA_Q40, "--tokenizer", TOK_LLAMA, "--synthetic", "abc"])
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --synthetic")
    r = bench(["--plot", str(tmp_path / "x.png")])
    assert r.returncode == 2 and "error:" in r.stderr


def test_make_synthetic_small(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_synthetic as ms
    finally:
        sys.path.pop(0)
    from dllama_mpi.formats import ModelHeader, Q40, open_model
    from dllama_mpi.tokenizer import Tokenizer
    from dllama_mpi.formats import write_tokenizer

    h = ModelHeader(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64,
                    weights_float_type=Q40)
    m = tmp_path / "s.m"
    ms.write_model(str(m), h, log=lambda *_: None)
    mf = open_model(str(m))
    assert mf.header.dim == 64
    d = np.frombuffer(mf.raw(mf.info("wq", 0)), np.uint8).reshape(-1, 18)[:, :2].copy().view(np.float16)
    assert 0.004 <= float(np.abs(d.astype(np.float32)).min()) and float(np.abs(d.astype(np.float32)).max()) <= 0.008
    mf.close()
    t = tmp_path / "s.t"
    write_tokenizer(str(t), ms.make_tokenizer(300, "llama3"))
    tok = Tokenizer.load(str(t))
    assert tok.vocab_size == 300 and tok.decode(tok.encode("abc xyz", add_bos=False)) == "abc xyz"
    r = bench(["--model", str(m), "--tokenizer", str(t), "--synthetic", "4", "--steps", "2", "--repeat", "1",
               "--bandwidth", "1"])
    assert r.returncode == 0, r.stderr
    assert set(ms.PRESETS) == {"llama3.2-1b", "llama3.1-8b", "qwen3-0.6b", "qwen3-30b-a3b-like"}


@pytest.mark.parametrize("n", [1, 2])
def test_benchmark_parallel_sweep(n):
    r = bench(["--model", LLAMA_Q40, "--tokenizer", TOK_LLAMA, "--synthetic", "9", "--steps", "6", "--repeat", "1",
               "--warmup", "0", "--bandwidth", "10", "--parallel", "1,3"], n=n)
    assert r.returncode == 0, r.stderr
    sweep = json.loads(r.stdout)["parallel"]
    assert [p["streams"] for p in sweep] == [1, 3]
    for p in sweep:
        assert p["aggregate_decode_tok_s"] > 0 and p["aggregate_tok_s"] > 0
        assert p["per_stream_decode_tok_s"]["n"] == p["streams"] and p["ttft_s"]["p99"] >= p["ttft_s"]["p50"] > 0
        # every stream holds ceil((9 + 6) / 16) = 1 page at most
        assert p["kv_pages_peak"] == p["streams"] and len(p["kv_bytes_peak_per_rank"]) == n
    assert "aggregate decode tok/s" in r.stderr


def test_benchmark_with_a_draft_model():
    """--spec draft (the tiny model drafting for itself, rank 0 of 2): greedy runs and a parallel sweep,
    the drafts accepted (--draft-fixed: the model drafting for itself never pays); the JSON names the draft
    model."""
    r = bench(["--model", LLAMA_Q40, "--tokenizer", TOK_LLAMA, "--synthetic", "9", "--steps", "12", "--repeat", "1",
               "--warmup", "0", "--bandwidth", "10", "--parallel", "1,2", "--spec", "draft", "--draft-model", LLAMA_Q40,
               "--draft-p-min", "0", "--draft-fixed"], n=2)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["config"]["spec"] == {"method": "draft", "draft_max": 16, "draft_min": 1, "draft_model": LLAMA_Q40,
                                   "draft_p_min": 0.0, "draft_fixed": True}
    assert d["runs"][0]["tokens_per_pass"] > 1.5 and d["runs"][0]["acceptance"] > 0.5
    assert all(p["tokens_per_pass"] > 1.5 for p in d["parallel"])
    for pr in d["per_rank"]:   # per token over every decode pass, verify passes included (each emits several)
        assert pr["decode_tokens"] == 12 and 12 / 17 <= pr["decode_passes"] < 12
        assert pr["c_ms"] > 0 and pr["c_calls_per_token"] > 0 and pr["ms_per_token_instrumented"] >= pr["c_ms"]
    assert f"draft model {LLAMA_Q40}" in r.stderr and "MiB on rank 0" in r.stderr
    # the scheduler's fitted cost of a pass and of each extra (verify) row, for scripts/spec_bound.py
    pc = d["summary"]["pass_cost_ms"]
    assert pc["one_row"] > 0 and 0 < pc["extra_row"] and 0.02 <= pc["extra_row_ratio"] <= 1   # (PassCost's clamp)
