"""The job scripts of scripts/slurm/ on a real (one-node) Slurm: scripts/slurm_local.sh's cluster,
which scripts/test.sh starts when it runs as root with apt (elsewhere these tests skip; by hand:
`scripts/slurm_local.sh run .venv/bin/python -m pytest tests/test_slurm.py`).

- `sbatch` of inference.sbatch (SmolLM2 on 2 ranks): COMPLETED, exit 0, the answer and the start-up
  lines saying what Slurm gave (job, nodes, tasks, threads from SLURM_CPUS_PER_TASK, placement);
  a bad model path: FAILED with a non-zero exit code, one `error:` line.
- `srun --mpi=pmi2 -n 2` and `-n 4` run the MPI tests' smallest case.
- batch.sbatch cancelled mid-run (scancel): every process of the job gone within 10 s, the job
  CANCELLED, one line from the root saying where to resume; submitted again, it runs only the rest
  and every id is in --out exactly once.
- api.sbatch: its output names the node and port, which answer; scancel ends it.
- sweep.sbatch: one benchmark JSON per ranks x threads (with the Slurm job, host, ISA, MPI library
  and git revision) and the scaling chart.
Job states and exit codes are what `sacct -c` reports (the job-completion log; no slurmdbd)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import TINY
from procs import our_processes

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "scripts" / "slurm"
VENV = Path(sys.executable).parent.parent
QWEN3 = {"MODEL": str(TINY / "m" / "dllama_model_tiny_qwen3_q40.m"),
         "TOKENIZER": str(TINY / "t" / "dllama_tokenizer_tiny_qwen3.t")}


def _local_slurm() -> bool:
    conf = os.environ.get("SLURM_CONF", "")
    try:
        return Path(conf).read_text().startswith("# written by scripts/slurm_local.sh")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _local_slurm(), reason="no local Slurm: scripts/test.sh starts one as root with "
                                                           "apt (scripts/slurm_local.sh)")


def sbatch(script: str, tmp_path: Path, *opts: str, **env: str) -> str:
    """Submit scripts/slurm/<script> with these sbatch options and environment; the job id."""
    full = dict(os.environ, DLLAMA_VENV=str(VENV), **env)
    r = subprocess.run(["sbatch", "--parsable", "--chdir", str(tmp_path), "--output", str(tmp_path / "%x-%j.out"),
                        *opts, str(SLURM / script)], capture_output=True, text=True, env=full, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def finished(job: str, timeout: float = 120.0) -> tuple[str, str]:
    """(state, exit code) of a job once it has ended, as `sacct -c` reports them."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run(["sacct", "-c", "-n", "-P", "-j", job, "-o", "State,ExitCode"],
                           capture_output=True, text=True, timeout=30)
        rows = [l.split("|") for l in r.stdout.splitlines() if l.strip()]
        if rows and rows[-1][0] not in ("PENDING", "RUNNING", "REQUEUED"):
            return rows[-1][0], rows[-1][1]
        time.sleep(0.2)
    subprocess.run(["scancel", job], timeout=30)
    raise AssertionError(f"job {job} did not end in {timeout:g} s")


def output(tmp_path: Path, job: str) -> str:
    return "".join(p.read_text(errors="replace") for p in tmp_path.glob(f"*-{job}.out"))


def wait_until(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout:g} s")


# ------------------------------------------------------------------------------------------------

def test_inference_job_answers_and_says_what_slurm_gave(tmp_path):
    question = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    job = sbatch("inference.sbatch", tmp_path, "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                 PROMPT=question, STEPS="16")
    assert finished(job) == ("COMPLETED", "0:0"), output(tmp_path, job)
    out = output(tmp_path, job)
    assert "Paris" in out, out
    host = socket.gethostname().split(".")[0]
    assert f"slurm: job {job}.0, nodes {host}, 2 tasks, tasks per node 2, 1 CPUs per task, --mpi=pmi2" in out, out
    assert "1 thread: SLURM_CPUS_PER_TASK=1" in out, out
    assert "ranks: 0 = pid " in out and ", 1 = pid " in out and f" on {host}" in out, out


def test_failed_job_exit_code(tmp_path):
    job = sbatch("inference.sbatch", tmp_path, "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                 MODEL=str(tmp_path / "missing.gguf"))
    # the root exits 2 and MPI_Abort has Slurm SIGKILL the other rank: srun reports the highest, 137
    state, code = finished(job)
    assert state == "FAILED" and code != "0:0", (state, code, output(tmp_path, job))
    errors = [l for l in output(tmp_path, job).splitlines() if l.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'missing.gguf'}: model file not found"], output(tmp_path, job)


@pytest.mark.parametrize("n", [2, 4])
def test_srun_pmi2_runs_the_mpi_tests_smallest_case(n):
    r = subprocess.run(["srun", "--mpi=pmi2", "-n", str(n), "--overcommit", "--chdir", str(ROOT), sys.executable,
                        "-m", "pytest", "-q", "--with-mpi", "-m", "mpi", "-p", "no:cacheprovider",
                        "tests/test_mpi.py", "-k", "test_f32_llama_ids_equal_golden"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count(" passed") == n, r.stdout[-3000:]
    assert "MPI vendor: MPICH" in r.stdout


def test_cancelled_batch_job_resumes_when_submitted_again(tmp_path):
    n = 24
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"request {i}: the quick brown fox"}) + "\n"
                               for i in range(n)))
    marker = uuid.uuid4().hex
    env = dict(QWEN3, PROMPTS=str(prompts), OUT=str(out), PARALLEL="1", MAX_TOKENS="64",
               DLLAMA_TEST_MARKER=marker)
    opts = ("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1")
    job = sbatch("batch.sbatch", tmp_path, *opts, **env)
    wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= 1, 60, "first result")
    wait_until(lambda: len(our_processes(marker)) >= 3, 10, "ranks")   # the batch shell, srun, 2 ranks
    subprocess.run(["scancel", job], check=True, timeout=30)
    t0 = time.time()
    wait_until(lambda: not our_processes(marker), 10, "end of every process of the cancelled job")
    gone = time.time() - t0
    assert finished(job)[0] == "CANCELLED", output(tmp_path, job)
    first = [json.loads(l)["id"] for l in out.read_text().splitlines()]
    assert 0 < len(first) < n, (gone, len(first))
    log = output(tmp_path, job)
    lines = [l for l in log.splitlines() if l.startswith("terminated by SIGTERM")]
    assert len(lines) == 1 and f"result(s) written to {out} in this run" in lines[0], log

    again = sbatch("batch.sbatch", tmp_path, *opts, **dict(env, PARALLEL="8"))
    assert finished(again) == ("COMPLETED", "0:0"), output(tmp_path, again)
    assert f"{n} requests in {prompts}, {len(first)} already in {out}, {n - len(first)} to run" \
        in output(tmp_path, again)
    ids = [json.loads(l)["id"] for l in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n)), ids     # every id exactly once
    assert ids[:len(first)] == first                                  # the first run's results kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_api_job_names_its_node_and_port(tmp_path):
    port = _free_port()
    job = sbatch("api.sbatch", tmp_path, "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                 PORT=str(port), **QWEN3)
    try:
        line = wait_until(lambda: next((l for l in output(tmp_path, job).splitlines() if l.startswith("api: ")), None),
                          60, "api: line")
        host = socket.gethostname().split(".")[0]
        assert f"(job {job}, node {host}, port {port})" in line, line
        url = line.split()[1]
        assert url.endswith(f":{port}/v1"), line

        def healthy():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_until(healthy, 60, "/health")
    finally:
        subprocess.run(["scancel", job], timeout=30)
    assert finished(job)[0] == "CANCELLED", output(tmp_path, job)


def test_sweep_job_writes_one_json_per_configuration_and_the_chart(tmp_path):
    job = sbatch("sweep.sbatch", tmp_path, "--ntasks=4", "--cpus-per-task=1", "--overcommit", **QWEN3,
                 OVERCOMMIT="1", RANKS="1 2 4", THREADS="1 2", OUT_DIR=str(tmp_path / "sweep"),
                 BENCH_ARGS="--synthetic 16 --steps 8 --repeat 1 --warmup 0 --bandwidth 10")
    assert finished(job, 300) == ("COMPLETED", "0:0"), output(tmp_path, job)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    rev = rev or None   # (not a git checkout)
    host = socket.gethostname()
    for r in (1, 2, 4):
        for t in (1, 2):
            d = json.loads((tmp_path / "sweep" / f"r{r}t{t}.json").read_text())
            assert (d["config"]["nodes"], d["config"]["nthreads"]) == (r, t)
            s = d["system"]
            assert s["slurm"]["job_id"] == job and s["slurm"]["ntasks"] == str(r) and s["slurm"]["cpus_per_task"] == str(t)
            assert s["hostname"] == host and [x["host"] for x in d["per_rank"]] == [host] * r
            assert s["versions"]["mpi_library"].startswith("MPICH Version:")
            assert (s["versions"]["git_revision"] or "").split("+")[0] == (rev or "")
            assert d["summary"]["kernel_isa"] and d["summary"]["decode_tok_s"] > 0
    png = tmp_path / "sweep" / "scaling.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
