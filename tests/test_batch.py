"""`dllama-mpi batch` under `mpiexec -n 2`: results, resume after a kill, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dllama_mpi.batch import done_ids, read_requests
from dllama_mpi.errors import ConfigError

from conftest import TINY
from procs import left_after, our_processes

BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec")
DLLAMA = [str(BIN / "dllama-mpi")] if (BIN / "dllama-mpi").exists() else [sys.executable, "-m", "dllama_mpi.cli"]
MODEL = str(TINY / "m" / "dllama_model_tiny_qwen3_q40.m")
TOK = str(TINY / "t" / "dllama_tokenizer_tiny_qwen3.t")


def write_jsonl(path, n=50, max_tokens=40):
    with open(path, "w") as f:
        for i in range(n):
            d = {"id": f"r{i}", "max_tokens": max_tokens, "temperature": 0}
            if i % 5 == 4:
                d["messages"] = [{"role": "user", "content": f"question {i}"}]
            else:
                d["prompt"] = f"Once upon a time there were {i} bears"
            f.write(json.dumps(d) + "\n")


def batch(prompts, out, *extra, marker=None, wait=True):
    env = dict(os.environ, DLLAMA_TEST_MARKER=marker or uuid.uuid4().hex)
    cmd = [MPIEXEC, "-n", "2", *DLLAMA, "batch", "--model", MODEL, "--tokenizer", TOK, "--prompts", str(prompts),
           "--out", str(out), *extra]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL, env=env)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)


def results(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_batch_killed_midway_then_rerun_gives_every_result_once(tmp_path):
    prompts, whole, out = tmp_path / "p.jsonl", tmp_path / "whole.jsonl", tmp_path / "out.jsonl"
    write_jsonl(prompts)
    r = batch(prompts, whole, "--parallel", "4")
    assert r.returncode == 0, r.stderr
    ref = {d["id"]: d for d in results(whole)}
    assert len(ref) == 50 and all(d["completion_tokens"] == 40 and d["finish_reason"] == "length"
                                  for d in ref.values())
    # the same job, killed (SIGKILL to every process) once some results are written, then rerun
    marker = uuid.uuid4().hex
    p = batch(prompts, out, "--parallel", "2", marker=marker, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 8):
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    for pid in our_processes(marker):
        os.kill(pid, signal.SIGKILL)
    n_first = out.read_text().count("\n")
    assert 8 <= n_first < 50
    r = batch(prompts, out, "--parallel", "4")
    assert r.returncode == 0, r.stderr
    assert f"{50 - n_first} to run" in r.stderr
    got = results(out)
    assert len(got) == 50 and len({d["id"] for d in got}) == 50
    # greedy: the same text whichever run, and whatever ran beside it
    assert {d["id"]: d["text"] for d in got} == {k: d["text"] for k, d in ref.items()}


def test_resume_drops_a_cut_last_line(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "a", "text": "x"}\n{"id": "b", "te')
    assert done_ids(str(out)) == {"a"}
    assert out.read_text() == '{"id": "a", "text": "x"}\n'


@pytest.mark.parametrize("line,msg", [
    ('{"id": "a", "prompt": "x"', "p.jsonl:2: not valid JSON"),
    ('{"prompt": "x"}', "p.jsonl:2: 'id' must be"),
    ('{"id": "a", "prompt": "y"}', "p.jsonl:2: id 'a' is already used on line 1"),
    ('{"id": "b"}', "p.jsonl:2: give exactly one of 'prompt' and 'messages'"),
    ('{"id": "b", "prompt": "x", "temperature": 9}', "p.jsonl:2: 'temperature' must be"),
    ('{"id": "b", "prompt": "x", "max_tokens": 0}', "p.jsonl:2: 'max_tokens' must be a positive integer"),
    ('{"id": "b", "messages": [{"role": "bot", "content": "x"}]}', "p.jsonl:2: messages[0].role"),
    ('{"id": "b", "prompt": "x", "colour": 1}', "p.jsonl:2: unknown field 'colour'"),
    ('[1]', "p.jsonl:2: each line must be a JSON object"),
])
def test_bad_lines_name_their_line(tmp_path, line, msg):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        read_requests(str(p))


def test_bad_file_under_mpiexec_is_one_line_and_every_rank_exits(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": 1, "prompt": "fine"}\n{"id": 1, "prompt": "again"}\n')
    marker = uuid.uuid4().hex
    r = batch(p, tmp_path / "o.jsonl", marker=marker)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {p}:2: id 1 is already used on line 1"], r.stderr
    assert "Traceback" not in r.stderr and left_after(marker) == []
