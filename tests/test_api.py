"""`dllama-mpi api`: request validation (in process), then a real server
(`mpiexec -n 2 dllama-mpi api`, tiny Qwen3 model, started once for the module) driven with the
official `openai` package and raw HTTP, and one end-to-end answer from the default SmolLM2 model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from dllama_mpi.api import ApiError, parse_common, parse_messages, parse_prompt

from conftest import default_smollm2_or_skip
from procs import our_processes

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "tiny"
BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"
DLLAMA = [str(BIN / "dllama-mpi")] if (BIN / "dllama-mpi").exists() else [sys.executable, "-m", "dllama_mpi.cli"]
MODEL = TINY / "m" / "dllama_model_tiny_qwen3_q40.m"
TOKENIZER = TINY / "t" / "dllama_tokenizer_tiny_qwen3.t"
MODEL_ID = "dllama_model_tiny_qwen3_q40"
KEY = "test-key-123"
DEFAULTS = {"temperature": 0.8, "top_p": 0.9, "seed": None}


# ------------------------------------------------------------------------------------------------
# validation, no model

def test_parse_common_defaults_and_limits():
    p = parse_common({}, 1024, DEFAULTS)
    assert p == {"n": 1, "logprobs": None, "echo": False, "token_ids": False, "stream": False, "include_usage": False,
                 "max_tokens": None, "temperature": 0.8, "top_p": 0.9, "seed": None, "stop": [], "draft": None}
    p = parse_common({"max_completion_tokens": 7, "max_tokens": 9, "stop": "x", "stream": True,
                      "stream_options": {"include_usage": True}, "seed": 3, "temperature": 0}, 1024, DEFAULTS)
    assert (p["max_tokens"], p["stop"], p["stream"], p["include_usage"], p["seed"], p["temperature"]) == \
        (7, ["x"], True, True, 3, 0.0)
    assert parse_common({"speculative.n_max": 0}, 1024, DEFAULTS)["draft"] == (0, None, None)
    assert parse_common({"speculative.n_max": 4, "speculative.n_min": 2}, 1024, DEFAULTS)["draft"] == (4, 2, None)
    assert parse_common({"speculative.p_min": 0.5}, 1024, DEFAULTS)["draft"] == (None, None, 0.5)


@pytest.mark.parametrize("body,param", [
    ({"n": 9}, "n"), ({"n": 0}, "n"), ({"n": "1"}, "n"), ({"logprobs": 1}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 1025}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"), ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"seed": "x"}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": 5}, "stop"), ({"stop": ["a", 1]}, "stop"),
    ({"stream": "yes"}, "stream"), ({"stream_options": 1}, "stream_options"),
    ({"speculative.n_max": -1}, "speculative.n_max"), ({"speculative.n_min": "2"}, "speculative.n_min"),
    ({"speculative.n_max": 2, "speculative.n_min": 3}, "speculative.n_min"),
    ({"speculative.p_min": 1.5}, "speculative.p_min"), ({"speculative.p_min": "0.5"}, "speculative.p_min"),
])
def test_parse_common_rejects(body, param):
    with pytest.raises(ApiError) as e:
        parse_common(body, 1024, DEFAULTS)
    assert e.value.status == 400 and e.value.param == param
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body", [
    {}, {"messages": []}, {"messages": "hi"}, {"messages": [1]}, {"messages": [{"role": "robot", "content": "x"}]},
    {"messages": [{"content": "x"}]}, {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
])
def test_parse_messages_rejects(body):
    with pytest.raises(ApiError) as e:
        parse_messages(body)
    assert e.value.status == 400 and e.value.param.startswith("messages")


def test_parse_messages_and_prompt():
    msgs = parse_messages({"messages": [{"role": "developer", "content": "s"},
                                        {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                     {"type": "text", "text": "b"}]},
                                        {"role": "assistant", "content": None}]})
    assert msgs == [{"role": "system", "content": "s"}, {"role": "user", "content": "ab"},
                    {"role": "assistant", "content": ""}]
    assert parse_prompt({"prompt": ["x"]}) == "x"
    for bad in ({}, {"prompt": ""}, {"prompt": ["a", "b"]}, {"prompt": 3}):
        with pytest.raises(ApiError):
            parse_prompt(bad)


def test_metrics_module_rank_stats_between_passes():
    """The per-rank numbers are gathered by whoever runs the passes (here a thread standing in for
    the generation thread's loop): a scrape nobody answers returns after its timeout without them."""
    import asyncio

    import numpy as np
    from prometheus_client.parser import text_string_to_metric_families

    from dllama_mpi.metrics import Metrics, RankStats

    m = Metrics()
    rows = np.array([[1.5, 0.25, 3, 7], [1.0, 0.75, 3, 7]])
    rs = RankStats(lambda: rows, ("compute_seconds", "wait_seconds", "forward_passes", "tokens"))
    m.set_rank_stats(rs)
    m.gauge("queue_depth", "waiting", lambda: 2)
    m.gauge("kv_cache_used_bytes", "per rank", lambda: {(0,): 10, (1,): 20}, ("rank",))
    m.request_done("/v1/completions", 200)
    text = asyncio.run(m.render(refresh_timeout=0.05)).decode()
    assert "dllama_rank_" not in text and rs.count == 0
    stop = threading.Event()

    def passes():
        while not stop.is_set():
            rs.poll()
            time.sleep(0.005)

    t = threading.Thread(target=passes)
    t.start()
    try:
        text = asyncio.run(m.render(refresh_timeout=30)).decode()
    finally:
        stop.set()
        t.join()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert got[("dllama_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 1
    assert got[("dllama_queue_depth", ())] == 2
    assert got[("dllama_kv_cache_used_bytes", (("rank", "1"),))] == 20
    assert got[("dllama_rank_wait_seconds_total", (("rank", "1"),))] == 0.75
    assert got[("dllama_rank_tokens_total", (("rank", "0"),))] == 7 and rs.count >= 1


# ------------------------------------------------------------------------------------------------
# a real server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    def __init__(self, log_path: Path, model=MODEL, tokenizer=TOKENIZER, extra=(), ranks=2):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.marker = uuid.uuid4().hex
        self.log_path = log_path
        env = dict(os.environ, DLLAMA_TEST_MARKER=self.marker, PYTHONPATH=str(ROOT))
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [MPIEXEC, "-n", str(ranks), *DLLAMA, "api", "--model", str(model),
             *(["--tokenizer", str(tokenizer)] if tokenizer is not None else []), "--port", str(self.port), *extra],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
            start_new_session=True)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server did not answer /health:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM) -> int:
        """SIGTERM to mpiexec, then the whole process group is killed if it did not end."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        for pid in our_processes(self.marker):   # ranks that escaped the group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ApiServer(tmp_path_factory.mktemp("api") / "server.log", extra=["--api-key", KEY, "--no-web-ui"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def http(server, method, path, body=None, key=KEY, raw: bytes | None = None, headers=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(server) -> dict:
    status, body = http(server, "GET", "/health", key=None)
    assert status == 200
    return body


def chat_msgs(text="Hello there"):
    return [{"role": "user", "content": text}]


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL_ID]


def scrape(server, key=KEY) -> dict:
    """GET /metrics parsed by prometheus_client's own parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain"), r.headers
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics(server, client):
    from dllama_mpi.formats import open_model
    from dllama_mpi.shard import make_plan

    assert http(server, "GET", "/metrics", key=None)[0] == 401   # like every endpoint but /health
    before = scrape(server)
    r = client.chat.completions.create(model=MODEL_ID, messages=chat_msgs("count me"), max_tokens=5, temperature=0)
    u = r.usage
    evaluated = u.model_extra["evaluated_prompt_tokens"]
    after = scrape(server)
    delta = lambda name, **kw: metric(after, name, **kw) - metric(before, name, **kw)  # noqa: E731
    assert delta("dllama_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert delta("dllama_requests_total", endpoint="/metrics", status="200") == 1   # the first scrape
    assert metric(after, "dllama_requests_total", endpoint="/metrics", status="401") >= 1
    assert delta("dllama_generations_total", finish_reason="length") == 1
    assert delta("dllama_generated_tokens_total") == 5
    assert delta("dllama_prompt_tokens_total") == u.prompt_tokens
    assert delta("dllama_prompt_evaluated_tokens_total") == evaluated
    assert delta("dllama_generation_seconds_total") > 0
    assert metric(after, "dllama_tokens_per_second", phase="generation") > 0
    assert metric(after, "dllama_queue_depth") == 0 and metric(after, "dllama_running_sequences") == 0
    # the request ended: its pages (the prompt and every generated token but the last) stay cached
    # for reuse, none is held; capacity is --parallel (4) contexts of the model; bytes from its shape
    m = open_model(str(MODEL))
    h = m.header
    m.close()
    plan = make_plan(h, 2)
    ctx = metric(after, "dllama_kv_cache_capacity_tokens")
    assert ctx == 4 * 1024 and metric(after, "dllama_kv_cache_used_tokens") == 0
    assert metric(after, "dllama_kv_cache_pages", state="in_use") == 0
    assert metric(after, "dllama_kv_cache_pages", state="cached") >= -(-(u.prompt_tokens + 5 - 1) // 16)
    for rank in (0, 1):
        per_token = 2 * 4 * h.n_layers * plan[rank].n_kv_heads * h.head_size   # K and V rows, f32
        assert metric(after, "dllama_kv_cache_used_bytes", rank=str(rank)) == 0
        assert metric(after, "dllama_kv_cache_free_bytes", rank=str(rank)) == ctx * per_token
        # per-rank counters come from every rank: one pass per prompt batch of 32, one per token after the first
        assert delta("dllama_rank_forward_passes_total", rank=str(rank)) == -(-evaluated // 32) + 4
        assert delta("dllama_rank_tokens_total", rank=str(rank)) == evaluated + 4
        assert delta("dllama_rank_compute_seconds_total", rank=str(rank)) > 0
        assert delta("dllama_rank_wait_seconds_total", rank=str(rank)) > 0
    # a sampled top-p answer: each of its rows drawn from the two ranks' summaries or taken whole
    client.chat.completions.create(model=MODEL_ID, messages=chat_msgs("count me"), max_tokens=6, temperature=0.8,
                                   top_p=0.9, seed=3)
    last = scrape(server)
    rows = {w: metric(last, "dllama_sampled_rows", way=w) - metric(after, "dllama_sampled_rows", way=w)
            for w in ("summaries", "whole")}
    assert rows["summaries"] + rows["whole"] == 6 and rows["summaries"] > 0, rows


def test_no_web_ui(server):
    """--no-web-ui: no chat page, / is a 404 like any unknown path."""
    for path in ("/", "/web/app.js"):
        got, err = http(server, "GET", path)
        assert got == 404 and err["error"]["message"].endswith("Not Found"), (path, err)


def test_chat_non_stream_length(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=chat_msgs(), max_tokens=8, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.role == "assistant" and isinstance(c.message.content, str)
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_stream_matches_non_stream(client):
    kw = dict(model=MODEL_ID, messages=chat_msgs("stream me"), max_completion_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_completions(client):
    r = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_ID, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_stop_strings(client):
    kw = dict(model=MODEL_ID, messages=chat_msgs("stop test"), max_tokens=40, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    # a stop string taken from the middle of the greedy answer: the answer ends right before it
    cut = next((i for i in range(3, len(full) - 2) if full[i:i + 2].isascii() and full[i:i + 2].isprintable()
                and full[i:i + 2].strip() == full[i:i + 2]), None)
    if cut is None:
        pytest.skip(f"no printable text in the tiny model's answer {full!r}")
    stop = full[cut:cut + 2]
    r = client.chat.completions.create(stop=[stop, "\x00never"], **kw)
    assert r.choices[0].message.content == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(stop=stop, stream=False, **kw)   # a plain string too
    assert r.choices[0].message.content == full[:full.find(stop)]


def test_seed_repeats(client):
    kw = dict(model=MODEL_ID, messages=chat_msgs("seeded"), max_tokens=24, temperature=0.8, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    client.chat.completions.create(model=MODEL_ID, messages=chat_msgs("other"), max_tokens=5, seed=7)
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_prefix_reuse(client):
    q1 = chat_msgs("first question")
    r1 = client.chat.completions.create(model=MODEL_ID, messages=q1, max_tokens=10, temperature=0)
    answer = r1.choices[0].message.content
    q2 = q1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "and a follow-up"}]
    r2 = client.chat.completions.create(model=MODEL_ID, messages=q2, max_tokens=4, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # everything but the last generated token (never fed back) comes from the cache
    assert cached == r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    assert r2.usage.model_extra["evaluated_prompt_tokens"] == r2.usage.prompt_tokens - cached


def test_concurrent_clients(client):
    results, errors = {}, []

    def ask(i):
        try:
            r = client.chat.completions.create(model=MODEL_ID, messages=chat_msgs(f"client {i}"), max_tokens=16,
                                               temperature=0.5, seed=i)
            results[i] = r
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sorted(results) == [0, 1, 2, 3]
    assert all(r.usage.completion_tokens == 16 for r in results.values())


@pytest.mark.parametrize("body,status,param", [
    ({"messages": [{"role": "user", "content": "x"}], "n": 9}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1020}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "warm"}, 400, "temperature"),
    ({"messages": []}, 400, "messages"),
    ({"model": MODEL_ID}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-17"}, 404, "model"),
    ([1, 2], 400, None),
])
def test_bad_requests(server, body, status, param):
    got, err = http(server, "POST", "/v1/chat/completions", body)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["param"] == param


def test_malformed_and_oversized_bodies(server, client):
    got, err = http(server, "POST", "/v1/chat/completions", raw=b'{"messages": [')
    assert got == 400 and err["error"]["type"] == "invalid_request_error"
    # a body above --max-body-bytes (1 MB) is refused from its Content-Length, before it is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 2000000\r\n\r\n"
                  + b'{"prompt": "' + b"a" * 1000)
        reply = b""
        while b"}}" not in reply:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply
    assert b'"larger' in reply or b"larger than" in reply
    got, err = http(server, "POST", "/v1/completions", {"prompt": ["a", "b"]})
    assert got == 400
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=[], max_tokens=4)
    assert health(server)["status"] == "ok"
    r = client.chat.completions.create(model=MODEL_ID, messages=chat_msgs(), max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_api_key(server):
    openai = pytest.importorskip("openai")
    assert http(server, "GET", "/health", key=None)[0] == 200
    for path, method, body in (("/v1/models", "GET", None),
                               ("/v1/chat/completions", "POST", {"messages": chat_msgs(), "max_tokens": 2}),
                               ("/v1/completions", "POST", {"prompt": "x", "max_tokens": 2})):
        for key in (None, "wrong-key"):
            got, err = http(server, method, path, body, key=key)
            assert got == 401 and err["error"]["code"] == "invalid_api_key", (path, key)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_client_disconnect_mid_stream(server, client):
    body = json.dumps({"messages": chat_msgs("a long answer please"), "max_tokens": 900, "temperature": 0.8,
                       "seed": 5, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        got = b""
        while got.count(b"data:") < 4:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
    # the generation stops at once (not after 900 tokens) and the next request is answered
    deadline = time.time() + 10
    while time.time() < deadline:
        h = health(server)
        if h["last"] and h["last"]["finish_reason"] in ("abort", "stop"):
            break
        time.sleep(0.05)
    assert h["queued"] == 0
    if h["last"]["finish_reason"] == "abort":
        assert h["last"]["generated_tokens"] < 900
    r = client.chat.completions.create(model=MODEL_ID, messages=chat_msgs(), max_tokens=2)
    assert r.usage.completion_tokens == 2


def root_rank_pid(marker: str) -> int:
    for pid in our_processes(marker):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if b"PMI_RANK=0" in env:
            return pid
    raise AssertionError("rank 0 not found")


@pytest.mark.parametrize("target,sig", [("mpiexec", signal.SIGINT), ("root", signal.SIGTERM)])
def test_shutdown_exit_code(tmp_path, target, sig):
    s = ApiServer(tmp_path / "server.log")
    r = urllib.request.urlopen(s.url + "/v1/models", timeout=10)
    assert r.status == 200
    # Ctrl-C to mpiexec is forwarded to every rank; either way the root stops the workers itself
    os.kill(s.proc.pid if target == "mpiexec" else root_rank_pid(s.marker), sig)
    try:
        rc = s.proc.wait(timeout=20)
    finally:
        s.stop()
    assert rc == 0, s.output()
    assert our_processes(s.marker) == []
    assert "stopped after" in s.output()


# ------------------------------------------------------------------------------------------------
# the real default model

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    model, tokenizer = default_smollm2_or_skip()
    s = ApiServer(tmp_path_factory.mktemp("smollm2") / "server.log", model=model, tokenizer=tokenizer)
    yield s
    s.stop()


def test_smollm2_capital_of_france(smollm2):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=smollm2.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = c.models.list().data[0].id
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                  max_tokens=40, temperature=0)
    assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------------------
# continuous batching: --parallel 4 with a KV pool that holds about two requests at a time

POOL_PAGES = 6   # pages of 16 tokens, 1 kB per token and rank for this model on 2 ranks


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory):
    s = ApiServer(tmp_path_factory.mktemp("batch") / "server.log",
                  extra=["--parallel", "4", "--kv-memory", f"{POOL_PAGES * 16}KiB"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def pipeline_server(tmp_path_factory):
    """The same server as two pipeline stages (one rank each): passes of different requests in flight."""
    s = ApiServer(tmp_path_factory.mktemp("pipeline") / "server.log",
                  extra=["--parallel", "4", "--kv-memory", f"{POOL_PAGES * 16}KiB", "--pp", "2"])
    yield s
    s.stop()


def _answers(client, prompts, max_tokens=24, concurrent=False, stream=False):
    """Greedy answers to the prompts, asked one after another or all at once from threads."""
    out, errors = {}, []

    def ask(i):
        try:
            kw = dict(model=MODEL_ID, messages=chat_msgs(prompts[i]), max_tokens=max_tokens, temperature=0)
            if stream and i % 2:
                out[i] = "".join(c.choices[0].delta.content or "" for c in
                                 client.chat.completions.create(stream=True, **kw) if c.choices)
            else:
                out[i] = client.chat.completions.create(**kw).choices[0].message.content
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    if concurrent:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    else:
        for i in range(len(prompts)):
            ask(i)
    assert not errors, errors
    return [out[i] for i in range(len(prompts))]


def test_draft_model_beside_continuous_batching(tmp_path):
    """--spec draft (the model drafting for itself, whole on rank 0) under --parallel 4: 6 concurrent
    clients, greedy and seeded, streamed and not, with log-probabilities, get exactly what each gets
    with speculative.n_max 0 (plain decoding); the drafts are accepted (/metrics)."""
    openai = pytest.importorskip("openai")
    s = ApiServer(tmp_path / "server.log", extra=["--parallel", "4", "--spec", "draft", "--draft-model", str(MODEL),
                                                            "--draft-fixed"])
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)

        def ask(i, plain):
            kw = dict(model=MODEL_ID, messages=chat_msgs(f"Tell me about the number {i}"), max_tokens=24,
                      logprobs=True, top_logprobs=2, extra_body={"speculative.n_max": 0} if plain else None,
                      **(dict(temperature=0.8, seed=i) if i % 2 else dict(temperature=0)))
            if i % 3:
                ch = c.chat.completions.create(**kw).choices[0]
                return ch.message.content, [(t.token, t.logprob) for t in ch.logprobs.content]
            text, lps = "", []
            for chunk in c.chat.completions.create(stream=True, **kw):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    lp = chunk.choices[0].logprobs
                    lps += [(t.token, t.logprob) for t in (lp.content if lp else None) or []]
            return text, lps

        out = {}
        threads = [threading.Thread(target=lambda i=i, p=p: out.__setitem__((i, p), ask(i, p)))
                   for i in range(6) for p in (False, True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(out) == 12
        for i in range(6):
            assert out[(i, False)] == out[(i, True)] and len(out[(i, False)][1]) > 5, i
        assert metric(scrape(s), "dllama_spec_accepted_tokens_total") > 10
    finally:
        s.stop()


@pytest.mark.parametrize("which", ["batch_server", "pipeline_server"])
def test_eight_clients_each_get_the_text_they_get_alone(request, which):
    """8 concurrent greedy clients on --parallel 4 with a pool for ~2: they wait for pages, are
    decoded together (with --pp 2: in passes in flight on the two stages), and each gets exactly
    its text alone."""
    batch_server = request.getfixturevalue(which)
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=batch_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    prompts = [f"Tell me about the number {i}" for i in range(8)]
    alone = _answers(c, prompts)
    together = _answers(c, prompts, concurrent=True, stream=True)
    assert together == alone
    h = health(batch_server)
    assert h["running"] == 0 and h["queued"] == 0 and h["kv_pages"]["in_use"] == 0
    assert h["kv_pages"]["total"] == POOL_PAGES and h["waited_for_pages"] > 0


@pytest.mark.parametrize("which", ["batch_server", "pipeline_server"])
def test_a_cancelled_stream_does_not_change_the_others(request, which):
    batch_server = request.getfixturevalue(which)
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=batch_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    prompts = ["first question", "second question"]
    alone = _answers(c, prompts, max_tokens=30)
    body = json.dumps({"messages": chat_msgs("this one goes away"), "max_tokens": 60, "temperature": 0,
                       "stream": True}).encode()
    results = {}

    def others():
        results["got"] = _answers(c, prompts, max_tokens=30, concurrent=True)

    with socket.create_connection(("127.0.0.1", batch_server.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        t = threading.Thread(target=others)
        t.start()
        got = b""
        while got.count(b"data:") < 3:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
    t.join(120)
    assert results["got"] == alone


def test_a_request_the_pool_can_never_hold_is_refused(batch_server):
    got, err = http(batch_server, "POST", "/v1/chat/completions",
                    {"messages": chat_msgs("hi"), "max_tokens": POOL_PAGES * 16 + 10}, key=None)
    assert got == 400 and "raise --kv-memory" in err["error"]["message"], err
    assert err["error"]["code"] == "context_length_exceeded"


def test_pipeline_metrics_gather_every_stage(pipeline_server):
    """Per-rank counters travel through the stages (CMD_STATS) between passes."""
    _answers(openai_client(pipeline_server), ["count the stages"], max_tokens=4)
    req = urllib.request.Request(pipeline_server.url + "/metrics")
    with urllib.request.urlopen(req, timeout=60) as r:
        text = r.read().decode()
    passes = [l for l in text.splitlines() if l.startswith("dllama_rank_forward_passes_total")]
    assert len(passes) == 2 and all(float(l.split()[-1]) > 0 for l in passes), passes


def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


# ------------------------------------------------------------------------------------------------
# log-probabilities and n choices (an f32 model: its logits at 2 ranks are those of 1 rank to ~1e-6)

F32_MODEL = TINY / "m" / "dllama_model_tiny_llama_f32.m"
F32_TOK = TINY / "t" / "dllama_tokenizer_tiny_llama3.t"
F32_ID = "dllama_model_tiny_llama_f32"


@pytest.fixture(scope="module")
def lp_server(tmp_path_factory):
    s = ApiServer(tmp_path_factory.mktemp("lp") / "server.log", model=F32_MODEL, tokenizer=F32_TOK)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def lp_client(lp_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=lp_server.url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    """Teacher-forced logits of a one-rank engine: log_softmax(ids, inv_t) -> [len(ids), vocab]."""
    import numpy as np
    from mpi4py import MPI

    from dllama_mpi.comm import Comm
    from dllama_mpi.startup import build_engine
    from dllama_mpi.tokenizer import Tokenizer

    eng = build_engine(Comm(MPI.COMM_SELF), str(F32_MODEL))
    tok = Tokenizer.load(F32_TOK)

    def log_softmax(ids, inv_t=1.0):
        y = eng.forward(ids, 0, all_logits=True).astype(np.float64) * inv_t
        m = y.max(axis=1, keepdims=True)
        return y - (m + np.log(np.exp(y - m).sum(axis=1, keepdims=True)))
    return tok, log_softmax


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_completion_logprobs_equal_an_independent_log_softmax(lp_client, reference, temperature):
    tok, log_softmax = reference
    prompt = "The quick brown fox"
    r = lp_client.completions.create(model=F32_ID, prompt=prompt, max_tokens=8, temperature=temperature, seed=3,
                                     logprobs=5, extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    prompt_ids = tok.encode(prompt)
    tid = lambda s: int(s.split(":")[1])  # noqa: E731 ("token_id:N")
    ids = prompt_ids + [tid(t) for t in lp.tokens]
    ref = log_softmax(ids, 1 / temperature if temperature else 1.0)
    n = len(prompt_ids)
    for i, (t, chosen, top) in enumerate(zip(ids[n:], lp.token_logprobs, lp.top_logprobs)):
        row = ref[n - 1 + i]
        assert abs(chosen - row[t]) < 1e-4
        vals = list(top.values())
        assert vals == sorted(vals, reverse=True) and len(vals) == 5
        best = sorted(range(row.size), key=lambda j: (-row[j], j))[:5]
        assert [tid(s) for s in top] == best
        assert max(abs(v - row[j]) for v, j in zip(vals, best)) < 1e-4
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    plain = lp_client.completions.create(model=F32_ID, prompt=prompt, max_tokens=8, temperature=temperature, seed=3,
                                         logprobs=5).choices[0]
    assert plain.text == r.choices[0].text and plain.logprobs.token_logprobs == lp.token_logprobs
    assert "".join(plain.logprobs.tokens) == plain.text or "\ufffd" in "".join(plain.logprobs.tokens)


def test_echo_scores_a_text_without_generating(lp_client, reference):
    import math

    tok, log_softmax = reference
    text = "Once upon a time, in a land far away, there lived a tiny model."
    r = lp_client.completions.create(model=F32_ID, prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0)
    c = r.choices[0]
    ids = tok.encode(text)
    assert c.text.endswith(text) and r.usage.completion_tokens == 0
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert len(c.logprobs.tokens) == len(ids)
    ref = log_softmax(ids)
    want = [ref[j - 1][ids[j]] for j in range(1, len(ids))]
    got = c.logprobs.token_logprobs[1:]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    # their mean is the log-likelihood per token a perplexity run computes on the same tokens
    assert abs(math.exp(-sum(got) / len(got)) / math.exp(-sum(want) / len(want)) - 1) < 1e-5
    # streamed: the same text and scores
    chunks = list(lp_client.completions.create(model=F32_ID, prompt=text, max_tokens=0, echo=True, logprobs=2,
                                               temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs
                for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == c.logprobs.token_logprobs


def test_chat_logprobs_shape_stream_and_not(lp_client):
    kw = dict(model=F32_ID, messages=chat_msgs("Hi"), max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    r = lp_client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for e in content:
        assert e.bytes == list(e.token.encode()) or "\ufffd" in e.token
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert e.logprob == e.top_logprobs[0].logprob and e.token == e.top_logprobs[0].token   # greedy
    streamed = [e for ch in lp_client.chat.completions.create(stream=True, **kw)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = lp_client.chat.completions.create(model=F32_ID, messages=chat_msgs("Hi"), max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_n_choices_with_a_seed_repeat(lp_client):
    kw = dict(model=F32_ID, messages=chat_msgs("Tell me a story"), max_tokens=12, temperature=0.9, seed=11, n=3)
    a = lp_client.chat.completions.create(**kw)
    b = lp_client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [c.message.content for c in b.choices]
    assert 3 <= a.usage.completion_tokens <= 36 and a.usage.prompt_tokens == b.usage.prompt_tokens
    streamed = {}
    for ch in lp_client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts
    c = lp_client.completions.create(model=F32_ID, prompt="Once", max_tokens=5, n=2, seed=1, temperature=1.0)
    assert len(c.choices) == 2 and c.usage.completion_tokens == 10
