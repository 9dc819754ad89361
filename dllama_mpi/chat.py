"""`dllama-mpi chat`: an interactive conversation. Rank 0 talks to the terminal; the other ranks
follow its forward passes (`Engine.serve`) and ignore SIGINT, so Ctrl-C only reaches the root.

The conversation stays in the KV cache: each turn only the new tokens are evaluated (see
`PromptHistory`: the previous prompt plus the generated tokens are reused token for token when the
newly rendered prompt extends them; otherwise `Generator.prefill` keeps the longest common prefix).

Ctrl-C under MPICH's mpiexec: the ranks run in sessions of their own (no controlling terminal);
the terminal's Ctrl-C reaches mpiexec, which forwards the first SIGINT to every rank and kills the
whole job on the second. So during an answer the root switches the terminal (found through its
ancestors' stdin when its own stdin is hydra's pipe) to deliver Ctrl-C as a byte (ISIG off), which
mpiexec forwards on stdin like any other key; a SIGINT that still arrives (no terminal found, or a
`kill -INT`) also just stops the answer.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import termios
import threading

import click

from .errors import ConfigError, DllamaError
from .startup import model_options, sampling_options, spec_config, spec_options, spmd, start



CTRL_C = 0x03

HELP = """commands:
  /help         this help
  /exit         quit (Ctrl-D too)
  /clear        start a new conversation (the system prompt stays)
  /save FILE    save the conversation and settings as JSON
  /load FILE    load a conversation saved with /save
  /stats        speed of the last answer
  /json [FILE]  answer with JSON from now on: any JSON object, or a value valid under the JSON
                schema in FILE (constrained decoding); /json off: free text again
Ctrl-C stops the answer being generated."""


# ------------------------------------------------------------------------------------------------
# prompt building shared by chat and api

def template_for(tokenizer, override: str | None):
    from .chat_template import ChatTemplate

    def text(i):
        if i is None or not 0 <= i < tokenizer.vocab_size:
            return ""
        return tokenizer.token_bytes(i).decode("utf-8", errors="replace")

    bos = text(tokenizer.bos_id) if tokenizer.bos_id >= 0 else ""
    eos = text(tokenizer.eos_ids[0]) if tokenizer.eos_ids else ""
    return ChatTemplate.from_tokenizer(tokenizer.chat_template, bos, eos, override=override)


def render_prompt(template, messages, where: str) -> str:
    """A chat (batch lines, benchmark prompts) as the model's prompt text, the generation prompt
    added; a chat the template cannot render is one ConfigError line starting with `where`."""
    from .errors import TemplateError

    try:
        return template.render(messages, add_generation_prompt=True)
    except TemplateError as e:
        raise ConfigError(f"{where}: {e}") from None


class PromptHistory:
    """The text and tokens of what the cache holds after recent answers (prompt + generated tokens,
    end-of-turn token included), so that a next prompt whose text extends one of them is tokenized
    as `ids + encode(new text)`: the cached tokens are then reused exactly, whatever a
    re-tokenization of the answer would have given. Chat keeps one conversation (capacity 1); the
    API keeps the most recent few, one per conversation, and may be used from two threads."""

    def __init__(self, tokenizer, capacity: int = 1):
        self.tokenizer = tokenizer
        self.capacity = capacity
        self.entries: list[tuple[str, list[int]]] = []   # most recent last
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self.entries = []

    def encode(self, prompt_text: str) -> list[int]:
        """Token ids of a rendered chat prompt (the template writes bos itself)."""
        tok = self.tokenizer
        with self._lock:
            best = max((e for e in self.entries if len(prompt_text) > len(e[0]) and prompt_text.startswith(e[0])),
                       key=lambda e: len(e[0]), default=None)
        if best is not None:
            return list(best[1]) + tok.encode(prompt_text[len(best[0]):], add_bos=False)
        return tok.encode(prompt_text, add_bos=False)

    def record(self, prompt_text: str, prompt_ids: list[int], generated: list[int]) -> None:
        """After an answer: the cache holds prompt_ids + generated[:-1]; the next prompt will
        contain the whole answer, end-of-turn token included."""
        # Invalid UTF-8 in the answer became U+FFFD in its text: the text still maps to these tokens
        # (what the model generated), which is what the cache holds.
        gen_text = self.tokenizer.decode(generated)
        entry = (prompt_text + gen_text, list(prompt_ids) + list(generated))
        with self._lock:
            # the conversation's earlier turn is a prefix of this one: replace it
            self.entries = [e for e in self.entries if not entry[0].startswith(e[0])] + [entry]
            del self.entries[:-self.capacity]


# ------------------------------------------------------------------------------------------------
# terminal

def _ancestor_tty() -> int | None:
    """A file descriptor on the terminal the user types into: our stdin when it is one, else the
    stdin of the nearest ancestor (mpiexec) that reads a terminal. None when there is none."""
    if os.isatty(0):
        return os.dup(0)
    pid = os.getppid()
    for _ in range(4):
        if pid <= 1:
            break
        try:
            link = os.readlink(f"/proc/{pid}/fd/0")
            if link.startswith("/dev/pts/") or link.startswith("/dev/tty"):
                fd = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
                if os.isatty(fd):
                    return fd
                os.close(fd)
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return None


class Terminal:
    """Line input from fd 0 (a pipe from mpiexec, or a terminal) with a Ctrl-C check that does not
    lose type-ahead, and output on stdout."""

    def __init__(self):
        self.fd = 0
        self.buf = b""
        self.eof = False
        self.tty = _ancestor_tty()
        self.saved = None
        self.interrupted = False   # set by SIGINT during an answer

    # --- input -----------------------------------------------------------------------------

    def readline(self) -> str | None:
        """The next line without its newline; None at end of input."""
        while b"\n" not in self.buf and not self.eof:
            try:
                chunk = os.read(self.fd, 65536)
            except InterruptedError:   # pragma: no cover (PEP 475 retries)
                continue
            if not chunk:
                self.eof = True
            self.buf += chunk.replace(bytes([CTRL_C]), b"")
        if b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
        elif self.buf:
            line, self.buf = self.buf, b""
        else:
            return None
        return line.decode("utf-8", errors="replace").rstrip("\r")

    def ctrl_c_pending(self) -> bool:
        """Reads what is available on stdin without blocking; True when it holds a Ctrl-C byte."""
        if self.eof:
            return False
        hit = False
        while True:
            try:
                r, _, _ = select.select([self.fd], [], [], 0)
            except (OSError, ValueError):
                return False
            if not r:
                return hit
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
                return hit
            if CTRL_C in chunk:
                hit = True
                chunk = chunk.replace(bytes([CTRL_C]), b"")
            chunk = chunk.replace(b"\x04", b"")   # Ctrl-D typed during an answer (raw mode): ignored
            self.buf += chunk

    def should_abort(self) -> bool:
        return self.interrupted or self.ctrl_c_pending()

    # --- Ctrl-C as a byte while an answer is generated -------------------------------------

    def raw_ctrl_c(self) -> None:
        if self.tty is None:
            return
        try:
            self.saved = termios.tcgetattr(self.tty)
            new = termios.tcgetattr(self.tty)
            new[3] &= ~(termios.ISIG | termios.ICANON | termios.ECHO)
            new[6][termios.VMIN] = 1
            new[6][termios.VTIME] = 0
            termios.tcsetattr(self.tty, termios.TCSANOW, new)
        except (termios.error, OSError):
            self.saved = None

    def restore(self) -> None:
        if self.tty is not None and self.saved is not None:
            try:
                termios.tcsetattr(self.tty, termios.TCSANOW, self.saved)
            except (termios.error, OSError):
                pass
            self.saved = None

    def close(self) -> None:
        self.restore()
        if self.tty is not None:
            os.close(self.tty)
            self.tty = None

    # --- output ----------------------------------------------------------------------------

    @staticmethod
    def write(text: str) -> None:
        # Notices go to stdout with the answers: mpiexec forwards stdout and stderr separately,
        # so only one stream keeps them in order.
        sys.stdout.write(text)
        sys.stdout.flush()


# ------------------------------------------------------------------------------------------------
# the session

SETTING_KEYS = ("system", "temperature", "topp", "seed", "max_tokens", "stop", "think", "chat_template",
                "context_overflow")


class ChatSession:
    """The root's side of `dllama-mpi chat`."""

    def __init__(self, engine, tokenizer, term: Terminal, settings: dict, ignore_eos: bool = False,
                 autosave: str | None = None, spec=None):
        from .generate import Generator

        self.engine, self.tokenizer, self.term = engine, tokenizer, term
        self.gen = Generator(engine, tokenizer, spec=spec)
        self.history = PromptHistory(tokenizer)
        self.settings = dict(settings)
        self.ignore_eos = ignore_eos
        self.messages: list[dict] = []       # user/assistant turns (the system prompt is a setting)
        self.last_stats = None
        self.answering = False               # inside a generation (workers are in the token loop)
        self.quit_requested = False          # SIGTERM arrived during an answer
        self.autosave = autosave             # --autosave FILE: written after every turn
        self.grammars = None                 # grammar.Grammars, made at the first /json
        self.json_grammar = None             # /json: the compiled grammar every answer follows
        self.apply_settings()

    def apply_settings(self) -> None:
        from .sampler import Sampler

        s = self.settings
        self.template = template_for(self.tokenizer, s.get("chat_template"))
        try:
            self.sampler = Sampler(self.tokenizer.vocab_size, s["temperature"], s["topp"], s.get("seed"))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if s.get("max_tokens") is not None and s["max_tokens"] < 1:
            raise ConfigError(f"--max-tokens must be >= 1, got {s['max_tokens']}")

    def conversation(self, extra: list[dict] = ()) -> list[dict]:
        system = self.settings.get("system")
        head = [{"role": "system", "content": system}] if system else []
        return head + self.messages + list(extra)

    # --- one turn ----------------------------------------------------------------------------

    def _reserve(self) -> int:
        mt = self.settings.get("max_tokens")
        return max(1, min(mt or 128, self.engine.max_seq_len // 4))

    def _prompt(self, user: str) -> tuple[str, list[int]] | None:
        """Render and tokenize the conversation plus the new message, applying the configured
        context-overflow policy. None (after a message) when it cannot fit."""
        max_seq = self.engine.max_seq_len
        dropped = 0
        while True:
            msgs = self.conversation([{"role": "user", "content": user}])
            text = self.template.render(msgs, add_generation_prompt=True)
            ids = self.history.encode(text)
            if len(ids) < max_seq and (self.settings["context_overflow"] == "error" or not self.messages
                                       or len(ids) + self._reserve() <= max_seq):
                break
            if self.settings["context_overflow"] == "error":
                self.say(f"context full: the conversation with your message is {len(ids)} tokens and the context "
                    f"holds {max_seq}; /clear starts a new conversation (/save keeps this one), or run with "
                    f"--context-overflow truncate-oldest to drop the oldest turns automatically")
                return None
            if not self.messages:
                self.say(f"your message alone is {len(ids)} tokens and the context holds {max_seq}: shorten it")
                return None
            # drop the oldest turn: its user message and what follows up to the next user message
            self.messages.pop(0)
            dropped += 1
            while self.messages and self.messages[0]["role"] != "user":
                self.messages.pop(0)
                dropped += 1
            self.history.clear()
        if dropped:
            self.say(f"(context full: dropped the {dropped} oldest message(s))")
        return text, ids

    def turn(self, user: str) -> None:
        from .chat_template import ThinkingFilter, prompt_opens_thinking

        p = self._prompt(user)
        if p is None:
            return
        text, ids = p
        # the message being answered is saved too: a run that dies mid-answer resumes with it
        self._autosave(self.messages + [{"role": "user", "content": user}])
        room = self.engine.max_seq_len - len(ids) + 1   # the first token needs no forward pass
        mt = self.settings.get("max_tokens")
        max_tokens = min(mt, room) if mt else room
        show = self.settings.get("think", "show") == "show"
        filt = ThinkingFilter(show=show, inside=prompt_opens_thinking(text))
        pieces, generated = [], []
        term = self.term
        term.interrupted = False
        term.raw_ctrl_c()
        old = signal.signal(signal.SIGINT, self._on_sigint)
        self.answering = True
        try:
            grammar = self.json_grammar.matcher() if self.json_grammar is not None else None
            for piece in self.gen.stream(ids, max_tokens, self.sampler, stop=self.settings.get("stop") or (),
                                         ignore_eos=self.ignore_eos, should_abort=term.should_abort,
                                         grammar=grammar):
                generated.append(piece.token)
                pieces.append(piece.text)
                out = filt.push(piece.text)
                if out:
                    term.write(out)
            term.write(filt.flush())
        finally:
            self.answering = False
            signal.signal(signal.SIGINT, old)
            term.restore()
        st = self.gen.last
        self.last_stats = st
        answer = "".join(pieces)
        term.write("\n")
        if st.finish_reason == "abort":
            self.say("[stopped]")
        elif st.finish_reason == "length" and len(self.gen.cached) >= self.engine.max_seq_len:
            self.say("[context full: the answer was cut; /clear starts a new conversation]")
        self.messages.append({"role": "user", "content": user})
        self.messages.append({"role": "assistant", "content": answer})
        ended_on_eos = bool(generated) and generated[-1] in self.tokenizer.eos_ids and not self.ignore_eos
        if st.finish_reason == "stop" and not ended_on_eos:
            self.history.clear()   # cut by a stop string: the stored answer is not the generated tokens
        else:
            self.history.record(text, ids, generated)
        self._autosave()

    def say(self, msg: str) -> None:
        self.term.write(msg + "\n")

    def _on_sigint(self, signum, frame):
        self.term.interrupted = True

    def on_sigterm(self, signum, frame):
        """SIGTERM (e.g. to mpiexec, which forwards it): leave cleanly. During an answer the engine is
        inside a forward pass with the workers, so only flag it: the answer stops at the next token
        and run() returns; at the prompt, unwind at once."""
        if self.answering:
            self.quit_requested = True
            self.term.interrupted = True
        else:
            raise KeyboardInterrupt

    # --- commands ----------------------------------------------------------------------------

    def stats_line(self) -> str:
        st = self.last_stats
        if st is None:
            return "no answer yet"
        d = st.as_dict()
        return (f"prompt: {st.prompt_tokens} tokens ({st.evaluated_prompt_tokens} evaluated, "
                f"{st.prompt_tokens - st.evaluated_prompt_tokens} from the cache), {st.prompt_tps:.2f} tok/s | "
                f"answer: {st.generated_tokens} tokens, {st.generate_tps:.2f} tok/s, {d['ms_per_token']:.2f} ms/token "
                f"| finish: {st.finish_reason} | context: {len(self.gen.cached)}/{self.engine.max_seq_len}"
                + (f" | spec: {st.tokens_per_pass:.2f} tokens/pass, {100 * st.acceptance:.0f} % of "
                   f"{st.draft_tokens} drafted accepted" if self.gen.scheduler.spec.on else ""))

    def save(self, path: str, messages: list[dict] | None = None) -> None:
        """Write the conversation (or `messages`) and the settings as JSON, atomically: a new file
        is written beside the old one and renamed over it, so a crash leaves the old or the new."""
        data = {"format": "dllama-mpi-chat", "version": 1,
                "settings": {k: self.settings.get(k) for k in SETTING_KEYS},
                "messages": self.messages if messages is None else messages}
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _autosave(self, messages: list[dict] | None = None) -> None:
        if self.autosave is None:
            return
        try:
            self.save(self.autosave, messages)
        except OSError as e:
            self.say(f"(--autosave {self.autosave} failed: {e})")

    def resume(self, path: str) -> None:
        """--resume: load a saved conversation; a last message without an answer (the run that
        saved it ended mid-answer) is answered now."""
        self.load(path)
        pending = self.messages.pop()["content"] if self.messages and self.messages[-1]["role"] == "user" else None
        self.say(f"(resumed {len(self.messages)} messages from {path}"
                 + ("; answering the last message again)" if pending is not None else ")"))
        if pending is not None:
            self.term.write(f"\n> {pending}\n")
            self.turn(pending)

    def load(self, path: str) -> None:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ConfigError(f"{path}: not a conversation saved with /save")
        msgs = []
        for m in data["messages"]:
            if not (isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                    and isinstance(m.get("content"), str)):
                raise ConfigError(f"{path}: bad message {m!r}")
            msgs.append({"role": m["role"], "content": m["content"]})
        settings = dict(self.settings)
        for k, v in (data.get("settings") or {}).items():
            if k in SETTING_KEYS:
                settings[k] = v
        old = dict(self.settings)
        self.settings = settings
        try:
            self.apply_settings()
        except DllamaError:
            self.settings = old
            self.apply_settings()
            raise
        self.messages = msgs
        self.history.clear()

    def command(self, line: str) -> bool:
        """Run a /command; False means exit."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit", "/bye"):
            return False
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/clear":
            self.messages = []
            self.history.clear()
            self._autosave()
            self.say("(new conversation)")
        elif cmd == "/stats":
            self.say(self.stats_line())
        elif cmd == "/json":
            self.json_command(arg)
        elif cmd in ("/save", "/load"):
            if not arg:
                self.say(f"usage: {cmd} FILE")
                return True
            try:
                if cmd == "/save":
                    self.save(arg)
                    self.say(f"(saved {len(self.messages)} messages to {arg})")
                else:
                    self.load(arg)
                    self._autosave()
                    self.say(f"(loaded {len(self.messages)} messages from {arg})")
            except (OSError, ValueError, DllamaError) as e:
                self.say(f"{cmd} failed: {e}")
        else:
            self.say(f"unknown command {cmd}; /help lists the commands")
        return True

    def json_command(self, arg: str) -> None:
        """/json: any JSON object; /json FILE: the JSON schema in FILE; /json off: free text. A schema
        that cannot be read or compiled is one line, and the mode stays as it was."""
        if arg == "off":
            self.json_grammar = None
            self.say("(free text)")
            return
        from .grammar import GrammarError, Grammars, read_schema

        try:
            if self.grammars is None:
                self.grammars = Grammars(self.tokenizer, self.engine.h.vocab_size)
            if arg:
                self.json_grammar = self.grammars.compile_schema(read_schema(arg, "/json"))
            else:
                self.json_grammar = self.grammars.compile({"type": "json_object"})
        except (GrammarError, ConfigError) as e:
            self.say(f"/json: {e}")
            return
        self.say(f"(answers are JSON{' valid under ' + arg if arg else ' objects'}; /json off for free text)")

    # --- the loop ----------------------------------------------------------------------------

    def run(self, resume: str | None = None) -> None:
        term = self.term
        self.say("chat: /help for commands, /exit or Ctrl-D to quit")
        if resume is not None:
            self.resume(resume)
        while True:
            term.write("\n> ")
            try:
                line = term.readline()
            except KeyboardInterrupt:   # Ctrl-C / SIGINT at the prompt: a clean exit of every rank
                term.write("\n")
                return
            if line is None:
                term.write("\n")
                return
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            try:
                self.turn(line)
            except KeyboardInterrupt:   # pragma: no cover (the handler only sets a flag)
                self.say("[stopped]")
            if self.quit_requested:     # SIGTERM during the answer: it stopped, now leave
                return


def register(group) -> None:
    """Add `chat` to the CLI group."""

    @click.command()
    @model_options
    @sampling_options
    @spec_options
    @click.option("--system", default=None, help="System prompt.")
    @click.option("--chat-template", default=None,
                  help="Override the tokenizer's chat template: a built-in name (llama3, chatml, smollm2, qwen2.5, "
                       "qwen3, deepseek-r1, gemma3) or Jinja source.")
    @click.option("--think", type=click.Choice(["show", "hide"]), default="show", show_default=True,
                  help="Show or hide the <think>...</think> part of thinking models (Qwen3, DeepSeek-R1).")
    @click.option("--stop", multiple=True, help="Stop an answer at this text (repeatable).")
    @click.option("--max-tokens", type=int, default=None, help="Most tokens per answer (default: until the end of turn).")
    @click.option("--context-overflow", type=click.Choice(["error", "truncate-oldest"]), default="error",
                  show_default=True, help="When the conversation no longer fits the context: refuse the message, "
                                          "or drop the oldest turns.")
    @click.option("--autosave", default=None, metavar="FILE",
                  help="Write the conversation to FILE after every turn (atomically, in the /save format; the "
                       "message being answered included), so that a run that dies can be resumed.")
    @click.option("--resume", default=None, metavar="FILE",
                  help="Start from a conversation saved by --autosave or /save; a last message left unanswered "
                       "is answered first. Autosaves to FILE unless --autosave names another.")
    @click.option("--ignore-eos", is_flag=True, hidden=True, help="Keep generating after end-of-turn tokens (tests).")
    @spmd
    def chat(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len, sync_scheme, load, max_batch,
             temperature, topp, seed, system, chat_template, think, stop, max_tokens, context_overflow, autosave, resume,
             ignore_eos):
        """Chat with the model in the terminal (run under mpirun -np N; rank 0 reads the terminal)."""
        if not comm.is_root:   # mpiexec forwards Ctrl-C and SIGTERM to every rank: the root stops the workers
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        elif resume is not None and not os.path.isfile(resume):
            raise ConfigError(f"--resume {resume}: no such file")
        spec = spec_config() if comm.is_root else None
        engine, tokenizer = start(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len,
                                  sync_scheme, load, max_batch)
        if not comm.is_root:
            engine.serve()
            return
        term = Terminal()
        try:
            settings = {"system": system, "temperature": temperature, "topp": topp, "seed": seed,
                        "max_tokens": max_tokens, "stop": list(stop), "think": think, "chat_template": chat_template,
                        "context_overflow": context_overflow}
            session = ChatSession(engine, tokenizer, term, settings, ignore_eos=ignore_eos,
                                  autosave=autosave or resume, spec=spec)
            signal.signal(signal.SIGTERM, session.on_sigterm)
            session.run(resume)
        finally:
            term.close()
            engine.stop_workers()

    group.add_command(chat)
