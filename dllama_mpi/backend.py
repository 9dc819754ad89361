"""The MPI job's side of `dllama-mpi serve`: rank 0 of `dllama-mpi api --backend SOCKET` connects to
the supervisor's unix socket and runs the requests it is sent through the scheduler (serve.py
describes the supervisor and the wire). `Link` is the JSON-lines socket both sides speak."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import threading
from dataclasses import asdict

from .errors import ConfigError
from .metrics import engine_kv_bytes_per_token


class Link:
    """JSON lines over a connected unix socket. `send` may be called from any thread; a reader
    thread hands each message to `on_message`, and None once the stream ends."""

    def __init__(self, sock: socket.socket, on_message):
        self.sock = sock
        self.closed = threading.Event()
        self._wlock = threading.Lock()
        self._reader = threading.Thread(target=self._read, args=(on_message,), name="link", daemon=True)
        self._reader.start()

    def send(self, msg: dict) -> bool:
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        with self._wlock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.closed.set()
                return False

    def _read(self, on_message) -> None:
        try:
            with self.sock.makefile("rb") as f:
                for line in f:
                    on_message(json.loads(line))
        except (OSError, ValueError):
            pass
        finally:
            self.closed.set()
            on_message(None)

    def close(self) -> None:
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# ------------------------------------------------------------------------------------------------
# the backend: rank 0 of `dllama-mpi api --backend SOCKET`

def run_backend(engine, tokenizer, path: str, spec=None) -> None:
    """Take requests from the supervisor at `path`, run them through the scheduler (continuous
    batching, as `api` does), and send back every token with the sampler's state after it. Returns
    when the supervisor says stop or goes away, or on SIGTERM/SIGINT; the caller stops the workers."""
    from .grammar import GrammarError, Grammars
    from .sampler import Sampler
    from .scheduler import Request, RequestError, Scheduler

    sched = Scheduler(engine, tokenizer, spec=spec)
    inbox: queue.Queue = queue.Queue()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        raise ConfigError(f"--backend {path}: cannot connect to the supervisor ({e.strerror})") from None
    link = Link(sock, inbox.put)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.set())
    requests: dict[int, Request] = {}

    def on_event(rid: int, kind: str, value) -> None:
        req = requests.get(rid)
        if req is None:
            return
        if kind == "piece":
            msg = {"t": "tok", "id": rid, "tok": value.token, "state": req.sampler.state}
            if value.logprob is not None:
                msg["lp"] = [value.logprob.logprob, value.logprob.top]
            if len(req.generated) == 1:   # this segment's prompt is evaluated: its numbers
                st = req.stats
                msg["first"] = {"evaluated": st.evaluated_prompt_tokens, "queue_s": st.queue_seconds,
                                "prompt_s": st.prompt_seconds}
                if req.prompt_logprobs is not None:
                    msg["plp"] = plp(req)
            link.send(msg)
        else:
            del requests[rid]
            msg = {"t": "done", "id": rid, "reason": value.finish_reason}
            if req.prompt_logprobs is not None and not req.generated:   # echo with max_tokens 0
                msg["plp"] = plp(req)
            link.send(msg)

    def plp(req) -> list:
        return [None if x is None else [x.token, x.logprob, x.top] for x in req.prompt_logprobs]

    grammars = Grammars(tokenizer, engine.h.vocab_size)
    compiled: dict[str, object] = {}   # grammar text -> grammar.Grammar, the most recent few

    def matcher(msg: dict):
        """The request's grammar matcher where the supervisor left it: a fresh one over the grammar
        text, fed the tokens already generated (the end of the resubmitted prompt)."""
        text = msg.get("grammar")
        if text is None:
            return None
        g = compiled.pop(text, None) or grammars.from_text(text)
        compiled[text] = g
        while len(compiled) > 64:
            compiled.pop(next(iter(compiled)))
        m = g.matcher()
        n = int(msg.get("consumed", 0))
        for t in msg["prompt"][len(msg["prompt"]) - n:]:
            if not m.consume(t):
                raise ValueError(f"the tokens generated so far do not follow the request's grammar ({m.error})")
        return m

    def submit(msg: dict) -> None:
        rid = int(msg["id"])
        try:
            sampler = Sampler(tokenizer.vocab_size, msg["temperature"], msg["top_p"], msg["seed"], msg.get("state"))
            req = Request(msg["prompt"], msg["max_tokens"], sampler,
                          sink=lambda kind, value: on_event(rid, kind, value), logprobs=msg.get("logprobs"),
                          prompt_logprobs=bool(msg.get("prompt_logprobs")), grammar=matcher(msg),
                          spec=sched.spec.with_draft(*msg["draft"]) if msg.get("draft") else None)
            requests[rid] = req
            sched.submit(req)
        except (RequestError, ValueError, GrammarError) as e:
            requests.pop(rid, None)
            link.send({"t": "error", "id": rid, "message": str(e)})

    link.send({"t": "hello", "pid": os.getpid(), "host": socket.gethostname(), "ranks": engine.comm.size,
               "max_seq_len": engine.max_seq_len, "kv_plan": asdict(engine.kv_plan),
               "kv_bytes_per_token": engine_kv_bytes_per_token(engine), "rank_stats": list(engine.RANK_STATS),
               "load_seconds": getattr(engine, "load_seconds", 0.0), "gauges": sched.gauges()})
    gauges = None
    while not stopping.is_set():
        block = not sched.busy
        while True:
            try:
                msg = inbox.get(timeout=0.1) if block else inbox.get_nowait()
            except queue.Empty:
                break
            block = False
            kind = msg["t"] if msg is not None else "stop"   # None: the supervisor went away
            if kind == "req":
                submit(msg)
            elif kind == "cancel":
                if msg["id"] in requests:
                    requests[msg["id"]].cancel()
            elif kind == "stats":   # between passes: the one place a collective may run
                link.send({"t": "stats", "values": engine.gather_rank_stats().tolist()})
            elif kind == "stop":
                stopping.set()
                break
        if sched.busy and not stopping.is_set():
            sched.step()
        g = sched.gauges()
        if g != gauges:
            gauges = g
            link.send({"t": "gauges", "gauges": g})
    sched.abort_all()
    link.close()
