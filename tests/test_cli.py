"""The command line as a user meets it: real processes, real mpiexec, one-line errors, no hangs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY
from procs import alive, descendants, environ

BIN = Path(sys.executable).parent
DLLAMA = [str(BIN / "dllama-mpi")] if (BIN / "dllama-mpi").exists() else [sys.executable, "-m", "dllama_mpi.cli"]
MPIEXEC = str(BIN / "mpiexec")
LLAMA_Q40 = str(TINY / "m" / "dllama_model_tiny_llama_q40.m")
LLAMA_F32 = str(TINY / "m" / "dllama_model_tiny_llama_f32.m")
QWEN_Q40 = str(TINY / "m" / "dllama_model_tiny_qwen3_q40.m")
TOK_LLAMA = str(TINY / "t" / "dllama_tokenizer_tiny_llama3.t")
TOK_QWEN = str(TINY / "t" / "dllama_tokenizer_tiny_qwen3.t")
PROMPT = "The quick brown fox jumps over the lazy dog."


def run(args, n=1, timeout=60, **kw):
    cmd = ([MPIEXEC, "-n", str(n)] if n > 1 else []) + DLLAMA + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def inference(model=LLAMA_F32, tok=TOK_LLAMA, *extra):
    return ["inference", "--model", model, "--tokenizer", tok, "--prompt", PROMPT, *extra]


@pytest.mark.parametrize("n", [1, 2])
def test_inference_json_equals_golden(n):
    gold = json.loads((TINY / "golden" / "tiny_llama_f32_n1.json").read_text())
    r = run(inference(LLAMA_F32, TOK_LLAMA, "--steps", "32", "--temperature", "0", "--ignore-eos", "--json"), n=n)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_ids"] == gold["prompt_ids"]
    assert out["generated_ids"] == gold["generated_ids"]
    assert out["nodes"] == n and out["generated_tokens"] == 32
    for key in ("prompt_tokens_per_s", "generation_tokens_per_s", "ms_per_token_compute", "ms_per_token_sync"):
        assert out[key] >= 0


def test_inference_streams_text_and_summary_on_stderr():
    r = run(inference(LLAMA_F32, TOK_LLAMA, "--steps", "8", "--temperature", "0", "--ignore-eos"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "tok/s" in r.stderr and "sync" in r.stderr


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("n", [1, 2])
def test_bad_inputs_give_one_line_and_exit_2(tmp_path, n):
    bad = tmp_path / "bad.m"
    bad.write_bytes(b"\x00" * 64)
    cases = [
        (inference(str(tmp_path / "missing.m")), ["missing.m", "not found"]),
        (inference(str(bad)), ["bad.m", "magic"]),
        (inference(LLAMA_Q40, TOK_LLAMA, "--steps", "-1"), ["--steps"]),
        (inference(LLAMA_Q40, TOK_LLAMA, "--max-seq-len", "0"), ["--max-seq-len"]),
        (inference(LLAMA_Q40, TOK_LLAMA, "--max-seq-len", "5000"), ["--max-seq-len"]),
        (inference(LLAMA_Q40, TOK_LLAMA, "--max-seq-len", "4"), ["prompt has", "context"]),
        (inference(LLAMA_Q40, TOK_LLAMA, "--nthreads", "0"), ["--nthreads"]),
    ]
    for args, needles in cases:
        t = time.time()
        r = run(args, n=n, timeout=30)
        one_line_error(r, *needles)
        assert time.time() - t < 20


def test_vocab_mismatch(tmp_path):
    from dllama_mpi.formats import TokenizerData, read_tokenizer, write_tokenizer

    t = read_tokenizer(TOK_LLAMA)
    small = TokenizerData(t.vocab[:500], t.scores[:500], t.bos_id, [497], t.add_bos, t.chat_template)
    small.bos_id = 496
    p = tmp_path / "small.t"
    write_tokenizer(p, small)
    one_line_error(run(inference(LLAMA_Q40, str(p))), "500 tokens", "vocab_size 512")


def test_impossible_node_count_fails_before_loading():
    # tiny_llama q40: head_dim 16, so 4 nodes would give 16 columns of wo each (not a q40 block)
    r = run(inference(LLAMA_Q40, TOK_LLAMA), n=4, timeout=60)
    one_line_error(r, "4 nodes", "multiple of 32")


def test_killed_worker_ends_the_job_quickly():
    """SIGKILL one worker during generation: every rank is gone within 5 s, exit status non-zero."""
    cmd = [MPIEXEC, "-n", "2"] + DLLAMA + inference(QWEN_Q40, TOK_QWEN, "--steps", "100000", "--ignore-eos",
                                                    "--temperature", "0", "--max-seq-len", "1024")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # wait until tokens flow, then find the worker (rank 1) among mpiexec's grandchildren
        deadline = time.time() + 30
        while time.time() < deadline and not p.stdout.read(1):
            pass
        workers = [pid for pid in descendants(p.pid) if environ(pid).get("PMI_RANK") == "1"]
        assert workers, "no rank-1 process found"
        os.kill(workers[0], signal.SIGKILL)
        t = time.time()
        p.wait(timeout=10)
        assert time.time() - t < 5.0
        assert p.returncode != 0
        ranks = [pid for pid in descendants(p.pid) if alive(pid)]
        assert not ranks
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_command_modules_do_not_import_cli():
    """The command modules sit on top of `startup`; only `cli` assembles them (no import cycle)."""
    code = ("import sys\n"
            "import dllama_mpi.api, dllama_mpi.chat, dllama_mpi.benchmark, dllama_mpi.inference, dllama_mpi.download\n"
            "assert 'dllama_mpi.cli' not in sys.modules, 'a command module imported cli'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
