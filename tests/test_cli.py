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


# ------------------------------------------------------------------------------------------------
# --nthreads default: the cores a rank may use, shared by the ranks on its host

def test_nthreads_default_rule(monkeypatch):
    from mpi4py import MPI

    from dllama_mpi.comm import Comm
    from dllama_mpi.startup import choose_threads, default_threads

    assert [default_threads(c, k) for c, k in ((8, 1), (8, 3), (2, 2), (2, 4), (1, 1), (16, 5))] == [8, 2, 1, 1, 1, 3]
    for k in [k for k in os.environ if k.startswith("SLURM_")]:   # (the suite run inside a Slurm job)
        monkeypatch.delenv(k)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5, 7})   # this rank may use 4 cores
    one = Comm(MPI.COMM_SELF)
    assert one.local_size() == 1
    assert choose_threads(one, None) == (4, "4 threads: 4 cores available / 1 rank on this host")
    assert choose_threads(one, 3) == (3, "3 threads: --nthreads 3")   # an explicit value wins


def test_nthreads_under_slurm(monkeypatch):
    """In a Slurm job: --cpus-per-task, else the CPUs Slurm gave the node (not the affinity, which
    is the whole node without cgroups); --wait auto counts the same CPUs."""
    from mpi4py import MPI

    from dllama_mpi.comm import Comm
    from dllama_mpi import startup
    from dllama_mpi.startup import choose_threads, slurm_line, wants_poll

    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(startup, "cpu_quota_cores", lambda: None)   # (a container's CPU quota)
    assert slurm_line() is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    one = Comm(MPI.COMM_SELF)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "6")
    assert choose_threads(one, None) == (6, "6 threads: 6 CPUs Slurm gave this node / 1 rank on this host")
    assert wants_poll("auto", 8, 1) == (True, "1 ranks x 8 threads on 6 CPUs Slurm gave this node")
    assert wants_poll("auto", 6, 1) == (False, "every rank has its cores")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert choose_threads(one, None) == (3, "3 threads: SLURM_CPUS_PER_TASK=3")
    assert choose_threads(one, 2) == (2, "2 threads: --nthreads 2")
    for k, v in (("SLURM_STEP_ID", "0"), ("SLURM_STEP_NODELIST", "n[1-2]"), ("SLURM_STEP_NUM_TASKS", "2"),
                 ("SLURM_STEP_TASKS_PER_NODE", "1(x2)"), ("SLURM_MPI_TYPE", "pmi2")):
        monkeypatch.setenv(k, v)
    assert slurm_line() == "slurm: job 77.0, nodes n[1-2], 2 tasks, tasks per node 1(x2), 3 CPUs per task, --mpi=pmi2"


def _threads_line(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if "available /" in l or ": --nthreads" in l]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("cpus,extra", [(None, []), ("0", []), (None, ["--nthreads", "2"])])
def test_nthreads_startup_line_under_mpiexec(cpus, extra):
    """Under mpiexec -n 2 on one host each rank gets its share of the cores it may use (taskset
    narrows them; ranks inherit it); the root's start-up line says what was chosen and why."""
    cores = 1 if cpus else len(os.sched_getaffinity(0))
    prefix = ["taskset", "-c", cpus] if cpus else []
    cmd = prefix + [MPIEXEC, "-n", "2"] + DLLAMA + inference(LLAMA_F32, TOK_LLAMA, "--steps", "1", "--json", *extra)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    if extra:
        n, why = 2, "2 threads: --nthreads 2"
    else:
        n = max(1, cores // 2)
        why = f"{n} thread{'s' if n > 1 else ''}: {cores} core{'s' if cores > 1 else ''} available / 2 ranks on this host"
    assert _threads_line(r.stderr) == why
    assert f"2 node(s) x {n} thread(s)" in r.stderr
    assert json.loads(r.stdout)["nthreads"] == n
