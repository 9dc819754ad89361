"""`dllama-mpi chat`: the session logic on a stand-in engine (prompt history, context overflow,
/save + /load, stop strings), then the real thing through a pseudo-terminal:
`mpiexec -n 2 dllama-mpi chat` with two turns, /stats, /clear, /save, /load, Ctrl-C and EOF."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from dllama_mpi.chat import ChatSession, PromptHistory, Terminal, template_for
from dllama_mpi.tokenizer import Tokenizer

from procs import our_processes

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "tiny"
BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"
DLLAMA = [str(BIN / "dllama-mpi")] if (BIN / "dllama-mpi").exists() else [sys.executable, "-m", "dllama_mpi.cli"]
LLAMA = (TINY / "m" / "dllama_model_tiny_llama_q40.m", TINY / "t" / "dllama_tokenizer_tiny_llama3.t")
QWEN3 = TINY / "t" / "dllama_tokenizer_tiny_qwen3.t"


# ------------------------------------------------------------------------------------------------
# the session on a stand-in engine (no MPI)

class FakeComm:
    wait_seconds = 0.0


class FakeEngine:
    """Logits from a seeded generator; records what each pass evaluates. It has what the scheduler
    uses of an engine: the root's KVCache, `step` and the sampled-row counters of its gauges."""

    def __init__(self, vocab: int, max_seq_len: int, favour: int | None = None):
        from dllama_mpi.kvcache import KVCache, plan_kv

        self.comm, self.max_seq_len, self.vocab = FakeComm(), max_seq_len, vocab
        self.max_batch = 4096
        self.kv_plan = plan_kv(64, max_seq_len, 1)
        self.kv = KVCache(self.kv_plan)
        self.favour = favour
        self.evaluated = []
        self.sampled_rows_summarised = self.sampled_rows_whole = 0

    def step(self, rows, updates=(), copies=(), out_full=None):
        assert rows.positions[-1] < self.max_seq_len
        self.evaluated.append((rows.positions[0], list(rows.tokens)))
        out = []
        for r, mode in zip(rows.logit_rows, rows.logit_modes):
            rng = np.random.default_rng(rows.positions[r] + 1)
            logits = rng.standard_normal(self.vocab).astype(np.float32)
            if self.favour is not None:
                logits[self.favour] = 100.0
            out.append(int(np.argmax(logits)) if mode == 0 else logits)
        return out


class FakeTerm(Terminal):
    def __init__(self, lines=()):
        self.lines = list(lines)
        self.out = []
        self.tty, self.saved, self.interrupted, self.eof, self.buf, self.fd = None, None, False, False, b"", -1

    def readline(self):
        return self.lines.pop(0) if self.lines else None

    def ctrl_c_pending(self):
        return False

    def write(self, text):
        self.out.append(text)


SETTINGS = {"system": None, "temperature": 0.0, "topp": 0.9, "seed": 1, "max_tokens": 6, "stop": [],
            "think": "show", "chat_template": None, "context_overflow": "error"}


@pytest.fixture(scope="module")
def qwen_tok():
    return Tokenizer.load(QWEN3)


def session(tok, max_seq_len=1024, favour=None, **settings):
    eng = FakeEngine(tok.vocab_size, max_seq_len, favour)
    s = ChatSession(eng, tok, FakeTerm(), {**SETTINGS, **settings})
    return s, eng


def test_history_reuses_the_answer_tokens(qwen_tok):
    eos = qwen_tok.eos_ids[0]
    s, eng = session(qwen_tok, favour=eos, max_tokens=None)   # every answer is just end-of-turn
    s.turn("hello")
    (pos0, first), = eng.evaluated
    assert pos0 == 0 and s.gen.last.finish_reason == "stop"
    eng.evaluated.clear()
    s.turn("again")
    # the second turn evaluates only its new tokens: eos (sampled, never fed back) + the new message
    (pos, toks), = eng.evaluated
    assert pos == len(first)
    assert toks[0] == eos and len(toks) == s.gen.last.prompt_tokens - len(first)
    assert s.gen.last.evaluated_prompt_tokens == len(toks)
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]


def test_history_after_length_cut(qwen_tok):
    s, eng = session(qwen_tok, max_tokens=5)
    s.turn("one")
    p1, g1 = s.gen.last.prompt_tokens, s.gen.last.generated_tokens
    assert g1 == 5 and s.gen.last.finish_reason == "length"
    s.turn("two")
    assert s.gen.last.prompt_tokens - s.gen.last.evaluated_prompt_tokens == p1 + g1 - 1


def test_prompt_history_falls_back_when_text_differs(qwen_tok):
    h = PromptHistory(qwen_tok)
    h.record("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", [1, 2, 3], qwen_tok.encode("yo", add_bos=False))
    assert h.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>")[:3] == [1, 2, 3]
    other = "<|im_start|>user\nbye<|im_end|>\n"
    assert h.encode(other) == qwen_tok.encode(other, add_bos=False)
    h.clear()
    assert h.encode(other) == qwen_tok.encode(other, add_bos=False)


def test_context_overflow_error_keeps_the_conversation(qwen_tok):
    s, eng = session(qwen_tok, max_seq_len=64, max_tokens=8)
    s.turn("short")
    n = len(s.messages)
    s.term.out.clear()
    s.turn("word " * 80)   # cannot fit: refused with a message, nothing crashes, nothing evaluated
    assert len(s.messages) == n
    out = "".join(s.term.out)
    assert "context full" in out and "--context-overflow truncate-oldest" in out


def test_context_overflow_truncate_oldest(qwen_tok):
    s, eng = session(qwen_tok, max_seq_len=96, max_tokens=8, context_overflow="truncate-oldest")
    for i in range(8):
        s.turn(f"message number {i} with a few words")
    text = "".join(s.term.out)
    assert "dropped the" in text
    assert s.messages[-2]["content"] == "message number 7 with a few words"
    assert s.messages[0]["role"] == "user" and s.messages[0]["content"] != "message number 0 with a few words"
    s.turn("word " * 200)   # alone larger than the context
    assert "your message alone" in "".join(s.term.out)


def test_stop_string_and_commands(qwen_tok, tmp_path):
    s, eng = session(qwen_tok, max_tokens=12)
    s.turn("hi")
    full = s.messages[-1]["content"]
    s2, _ = session(qwen_tok, max_tokens=12, stop=[full[3:5]] if len(full) >= 5 else ["\x00"])
    s2.turn("hi")
    if len(full) >= 5:
        assert s2.messages[-1]["content"] == full[:full.find(full[3:5])]
        assert s2.gen.last.finish_reason == "stop"
    # /save then /load in a fresh session: conversation and settings come back
    path = tmp_path / "conv.json"
    assert s.command(f"/save {path}")
    data = json.loads(path.read_text())
    assert data["messages"] == s.messages and data["settings"]["max_tokens"] == 12
    s3, _ = session(qwen_tok, max_tokens=3, system="changed")
    assert s3.command(f"/load {path}")
    assert s3.messages == s.messages and s3.settings["max_tokens"] == 12 and s3.settings["system"] is None
    assert s3.command("/load /nonexistent/file.json")          # an error message, not a crash
    assert s3.command("/clear") and s3.messages == []
    assert s3.command("/stats") and s3.command("/help") and s3.command("/what")
    assert not s3.command("/exit")


def test_thinking_hidden(qwen_tok):
    from dllama_mpi.chat_template import ThinkingFilter

    f = ThinkingFilter(show=False)
    assert f.push("<think>\nhmm</thi") + f.push("nk>\n\nAnswer") + f.flush() == "Answer"


def test_terminal_reads_lines_and_ctrl_c(tmp_path):
    r, w = os.pipe()
    t = Terminal.__new__(Terminal)
    t.fd, t.buf, t.eof, t.tty, t.saved, t.interrupted = r, b"", False, None, None, False
    os.write(w, "héllo\nsec".encode())
    assert t.readline() == "héllo"
    assert not t.ctrl_c_pending()
    os.write(w, b"ond\x03\nthird\n")
    assert t.ctrl_c_pending()
    assert t.readline() == "second" and t.readline() == "third"
    os.close(w)
    assert t.readline() is None
    os.close(r)


def test_template_for_override(qwen_tok):
    t = template_for(qwen_tok, "chatml")
    assert t.render([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------------------------------------
# the real thing, through a pseudo-terminal


@pytest.fixture
def spawn_chat(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    children = []

    def spawn(*args):
        marker = uuid.uuid4().hex
        env = dict(os.environ, DLLAMA_TEST_MARKER=marker, PYTHONPATH=str(ROOT))
        child = pexpect.spawn(MPIEXEC, ["-n", "2", *DLLAMA, "chat", "--model", str(LLAMA[0]), "--tokenizer",
                                        str(LLAMA[1]), "--seed", "1", *args],
                              env=env, cwd=str(tmp_path), encoding="utf-8", codec_errors="replace", timeout=60)
        child.logfile_read = open(tmp_path / f"chat-{len(children)}.log", "w")
        child.marker = marker
        children.append(child)
        return child

    yield spawn
    for c in children:   # never leave ranks behind
        if c.isalive():
            c.kill(signal.SIGTERM)
            time.sleep(1)
        if c.isalive():
            c.kill(signal.SIGKILL)
        for pid in our_processes(c.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


STATS = re.compile(r"prompt: (\d+) tokens \((\d+) evaluated, (\d+) from the cache\).*?answer: (\d+) tokens.*?"
                   r"finish: (\w+) \| context: (\d+)/(\d+)")


def stats(child):
    """Ask /stats (queued behind any answer being generated) and parse it."""
    child.sendline("/stats")
    child.expect(STATS)
    return [int(x) if x.isdigit() else x for x in child.match.groups()]


def finish_exit(child):
    child.expect(pexpect_eof())
    child.close()
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)
    deadline = time.time() + 5
    while our_processes(child.marker) and time.time() < deadline:
        time.sleep(0.1)
    assert our_processes(child.marker) == []


def pexpect_eof():
    import pexpect

    return pexpect.EOF


def test_chat_two_turns_clear_eof(spawn_chat, tmp_path):
    c = spawn_chat("--max-tokens", "16", "--temperature", "0")
    c.expect("/help for commands")
    c.sendline("Hello, who are you?")
    p1, e1, c1, g1, f1, ctx1, max_seq = stats(c)
    assert (e1, c1) == (p1, 0) and g1 >= 1 and f1 in ("stop", "length") and max_seq == 1024
    c.sendline("Tell me more.")
    p2, e2, c2, g2, f2, ctx2, _ = stats(c)
    # the second turn reuses the first one from the cache: only its own tokens are evaluated
    assert c2 == p1 + g1 - 1 and e2 == p2 - c2 and e2 < p2 - p1
    c.sendline("/save conv.json")
    c.expect(r"saved 4 messages")
    c.sendline("/clear")
    c.expect(r"new conversation")
    c.sendline("A fresh start")
    p3, e3, c3, g3, *_ = stats(c)
    assert p3 < p2   # the conversation was cleared (the system header is reused from the cache)
    c.sendline("/load conv.json")
    c.expect(r"loaded 4 messages")
    saved = json.loads((tmp_path / "conv.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2
    assert saved["messages"][2]["content"] == "Tell me more." and saved["settings"]["max_tokens"] == 16
    c.sendline("/help")
    c.expect("/save FILE")
    c.sendeof()
    finish_exit(c)


def test_chat_with_a_draft_model(spawn_chat):
    """--spec draft in chat: the model drafting for itself (whole on rank 0), two turns; /stats shows
    several tokens per pass, most drafts accepted."""
    c = spawn_chat("--max-tokens", "24", "--temperature", "0", "--ignore-eos", "--spec", "draft", "--draft-model",
                   str(LLAMA[0]), "--draft-p-min", "0", "--draft-fixed", "--draft-max", "6")
    c.expect(r"draft model \S+dllama_model_tiny_llama_q40.m: llama, dim 64, 4 layers, weights q40, [\d.]+ MiB on rank 0")
    c.expect("/help for commands")
    for turn in ("Hello, who are you?", "Tell me more."):
        c.sendline(turn)
        c.sendline("/stats")
        c.expect(r"answer: 24 tokens.*?\| spec: ([\d.]+) tokens/pass, (\d+) % of (\d+) drafted accepted")
        tpp, acc, drafted = float(c.match.group(1)), int(c.match.group(2)), int(c.match.group(3))
        assert tpp > 1.5 and acc > 50 and drafted > 10, (tpp, acc, drafted)
    c.sendeof()
    finish_exit(c)


def test_chat_json_answers(spawn_chat, tmp_path):
    """/json FILE: the next answers are values valid under the schema (here one of three strings, with
    the tiny random model); a bad schema file is one line and changes nothing; /json off: free text."""
    (tmp_path / "answer.json").write_text(json.dumps({"enum": ["yes", "no", "maybe"]}))
    (tmp_path / "bad.json").write_text("[1]")
    c = spawn_chat("--max-tokens", "32", "--temperature", "0.9")
    c.expect("/help for commands")
    c.sendline("/json bad.json")
    c.expect(r"/json: /json bad.json: a JSON schema must be a JSON object")
    c.sendline("/json answer.json")
    c.expect(r"\(answers are JSON valid under answer.json; /json off for free text\)")
    for turn in ("Is it raining?", "Are you sure?"):
        c.sendline(turn)
        c.expect("\r?\n> ")
        c.sendline("/stats")
        c.expect(r"finish: (\w+)")
        assert c.match.group(1) == "stop"
    c.sendline("/save conv.json")
    c.expect("saved 4 messages")
    answers = [m["content"] for m in json.loads((tmp_path / "conv.json").read_text())["messages"]
               if m["role"] == "assistant"]
    assert len(answers) == 2 and all(json.loads(a) in ("yes", "no", "maybe") for a in answers), answers
    c.sendline("/json off")
    c.expect(r"\(free text\)")
    c.sendeof()
    finish_exit(c)


def test_chat_ctrl_c_stops_the_answer_not_the_program(spawn_chat):
    c = spawn_chat("--ignore-eos")   # answers run until the context is full unless stopped
    c.expect("/help for commands")
    for i in range(2):   # twice: MPICH's mpiexec kills the job at a second SIGINT, a Ctrl-C byte is fine
        c.sendline(f"Tell me a very long story {i}")
        # Ctrl-C as soon as the answer has begun: the tiny model fills its 1024-token context in
        # about 0.2 s, so a fixed sleep could arrive after the answer (seen in CI)
        c.expect(f"story {i}\r\n")
        c.expect(r"\S")
        c.sendcontrol("c")
        c.expect(r"\[stopped\]|\[context full")
        assert c.after == "[stopped]", "the answer was not stopped by Ctrl-C"
        *_, finish, ctx, max_seq = stats(c)
        assert finish == "abort" and ctx < max_seq
        c.sendline("/clear")
        c.expect("new conversation")
    c.sendline("/exit")
    finish_exit(c)
