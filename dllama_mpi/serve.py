"""`dllama-mpi serve`: the OpenAI-compatible API behind a supervisor, so that a lost node costs
seconds, not the service.

    dllama-mpi serve (this process, not an MPI rank: owns the HTTP port and every request's state)
      └─ mpiexec [-f hostfile] -n N dllama-mpi api --backend SOCKET ...   (the MPI job, own session)
           rank 0: connects to SOCKET and runs the scheduler for the requests it is sent
           ranks 1..N-1: Engine.serve(), as under `api`

The supervisor runs api.py's Starlette app (validation, chat templates, response shapes, the chat
page, /health, /metrics): `Supervisor` is an `api.Server` whose generation side is a client of the
socket instead of a local Scheduler. It keeps each request's token history (prompt ids, generated
ids, the sampler's xorshift state after the last token). When the MPI job dies (a rank killed, a
host gone, MPI_Abort, a --sync-timeout) it names the lost rank and host in one log line, relaunches
the job on the hosts that still start (each host of the hostfile is probed; the engine plans its
split for the new rank count at start-up), waits for rank 0 to connect, and re-submits every
unfinished request as prompt + generated-so-far with the remaining max_tokens and the saved sampler
state: the scheduler prefills that as a prompt, and its last row's logits are the logits the decode
row would have given (rows are batch-invariant), so the stream goes on where it was. Streaming
clients see a pause. Requests that arrive meanwhile wait in the queue.

Where text is made: here. The backend sends token ids (and the sampler state after each); the
supervisor runs the tokenizer's stream decoder, the stop strings (scheduler.StopMatcher) and the end
rules (EOS, max_tokens, a full context) over each request's whole token history, so the text a
client gets depends only on the tokens, never on where a restart cut the stream: nothing is
repeated, nothing is lost, and a stop string split across a restart is still found. A resumable
backend would have to ship the decoder's pending bytes and the matcher's held-back text across
every restart for the same result. The backend is not told the stop strings; when the supervisor
sees one it cancels the request there (the backend may compute one more token, which is dropped).

The wire: JSON lines over a unix socket (a private directory, 0700), a few dozen bytes per token.
  supervisor -> rank 0:  req {id, prompt, max_tokens, temperature, top_p, seed, state[, grammar,
                         consumed]} | cancel {id} | stats | stop
(grammar: the llguidance grammar of response_format / tools, as text; consumed: how many tokens at the
end of the prompt were generated under it, which rank 0 feeds to a fresh matcher before the next token)
  rank 0 -> supervisor:  hello {pid, ranks, max_seq_len, kv_plan, kv_bytes_per_token, rank_stats,
                         load_seconds, gauges} | tok {id, tok, state[, first]} | done {id, reason}
                         | error {id, message} | gauges {gauges} | stats {values}
Rank 0 must run on this machine (the first host of the hostfile): it holds the socket's other end.
If the supervisor goes away, rank 0 sees the socket close and ends the job.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import click

from .api import ApiError, Job, Server, check_server_options, serve_http, server_options
from .backend import Link
from .errors import ConfigError
from .startup import _options, log, model_options, one_line, sampling_options, spec_config, spec_options

# The supervisor uses request-level pieces of scheduler.py (RunStats, StopMatcher, check_request),
# whose imports reach comm.py and so mpi4py. This process is not an MPI rank: importing mpi4py
# must not initialize MPI here (a singleton init maps MPICH shared memory and starts a thread).
# The children's environment drops the setting again (Launcher.env).
NO_MPI_INIT = "MPI4PY_RC_INITIALIZE"


# ------------------------------------------------------------------------------------------------
# what the supervisor reads: hostfiles and MPICH's reports

def parse_hostfile(path: str) -> list[tuple[str, int]]:
    """MPICH hydra's hostfile: `host[:slots]` per line (default 1 slot), `#` comments."""
    hosts = []
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the hostfile ({e.strerror})") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host, _, slots = line.split()[0].partition(":")
        try:
            k = int(slots) if slots else 1
        except ValueError:
            k = 0
        if not host or k < 1:
            raise ConfigError(f"{path}:{n}: expected host or host:slots (slots >= 1), got {line!r}")
        hosts.append((host, k))
    if not hosts:
        raise ConfigError(f"{path}: the hostfile names no host")
    return hosts


_RANKS = re.compile(r"^ranks: (.*)$", re.M)
_RANK = re.compile(r"(\d+) = pid (\d+) on ([^\s,]+)")
_BAD = re.compile(r"BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES\W*PID (\d+) RUNNING AT (\S+)"
                  r"\W*EXIT CODE: (-?\d+)", re.S)


def rank_map(output: str) -> dict[int, tuple[int, str]]:
    """pid -> (rank, host) from the root's start-up line `ranks: 0 = pid a on h, 1 = pid b on h`."""
    m = _RANKS.search(output)
    return {int(pid): (int(r), host) for r, pid, host in _RANK.findall(m.group(1))} if m else {}


def _exit_text(code: int) -> str:
    """Hydra reports the signal number as the exit code of a process killed by a signal."""
    try:
        return f"exit code {code} ({signal.Signals(code).name})" if 0 < code < 32 else f"exit code {code}"
    except ValueError:
        return f"exit code {code}"


def describe_loss(output: str, rc: int | None, root_pid: int | None = None,
                  gone: tuple[str, int | None, str | None] | None = None) -> tuple[str, int | None, str | None]:
    """(one-line cause, lost rank or None, its host or None) from a dead job's output: MPICH
    hydra's "BAD TERMINATION ... PID n RUNNING AT host ... EXIT CODE c" block (the pid is named
    through the root's `ranks:` line), else the first of the job's processes seen to vanish (`gone`:
    what, rank, host; a host that went away takes its hydra proxy with it, which hydra does not
    report by name), else a rank's `error:` line (MPI_Abort after --sync-timeout or another
    error), an MPI_Abort report, or the last thing mpiexec said."""
    errors = [line.strip() for line in output.splitlines() if line.startswith("error:")]
    m = _BAD.search(output)
    if m:
        pid, host, code = int(m.group(1)), m.group(2), int(m.group(3))
        ranks = rank_map(output)
        rank = ranks[pid][0] if pid in ranks else (0 if pid == root_pid else None)
        who = f"rank {rank}" if rank is not None else "a rank"
        cause = f"{who} (pid {pid} on {host}) ended: {_exit_text(code)}"
        if errors:
            cause += f"; {errors[0]}"
        return cause, rank, host
    if gone is not None:
        what, rank, host = gone
        said = errors[0] if errors else (f"mpiexec exited with status {rc}" if rc is not None else "")
        return f"{what} vanished" + (f"; {said}" if said else ""), rank, host
    if errors:
        return errors[0], None, None
    aborts = [line.strip() for line in output.splitlines() if "MPI_Abort" in line]
    if aborts:
        return aborts[0], None, None
    said = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith("=")]
    tail = f": {said[-1]}" if said else ""
    return (f"mpiexec exited with status {rc}{tail}" if rc is not None else f"rank 0 closed the connection{tail}"), None, None


# ------------------------------------------------------------------------------------------------
# restarts

class RestartPolicy:
    """At most `max_restarts` relaunches within `window` seconds (then the supervisor gives up);
    a relaunch right after a loss starts at once, each launch that fails before it is healthy
    doubles the wait before the next (backoff, 2 x backoff, ... up to max_backoff)."""

    def __init__(self, max_restarts: int, window: float, backoff: float = 1.0, max_backoff: float = 30.0):
        self.max_restarts, self.window = max_restarts, window
        self.backoff, self.max_backoff = backoff, max_backoff
        self.attempts: deque[float] = deque()
        self.failures = 0          # launches in a row that never became healthy

    def allow(self, now: float) -> bool:
        while self.attempts and now - self.attempts[0] > self.window:
            self.attempts.popleft()
        return len(self.attempts) < self.max_restarts

    def attempt(self, now: float) -> None:
        self.attempts.append(now)

    def delay(self) -> float:
        return 0.0 if self.failures == 0 else min(self.backoff * 2 ** (self.failures - 1), self.max_backoff)

    def failed(self) -> None:
        self.failures += 1

    def succeeded(self) -> None:
        self.failures = 0


# ------------------------------------------------------------------------------------------------
# one launch of the MPI job

class LaunchFailed(Exception):
    pass


class Backend:
    """One launch: mpiexec in a session of its own (so that its whole process group can be killed),
    its output forwarded line by line to our stderr and kept, and the link to rank 0 once it connects."""

    def __init__(self, number: int, cmd: list[str], env: dict, hosts: list[tuple[str, int]], n_ranks: int):
        self.number, self.cmd, self.hosts, self.n_ranks = number, cmd, hosts, n_ranks
        self.t_start = time.monotonic()
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, start_new_session=True)
        self._pumps = [threading.Thread(target=self._pump, args=(s,), name="backend-output", daemon=True)
                       for s in (self.proc.stdout, self.proc.stderr)]
        for t in self._pumps:
            t.start()
        self.link: Link | None = None
        self.hello: dict | None = None
        self.up = threading.Event()
        self.tree: dict[int, tuple[str, int]] = {}
        self.labels: dict[int, tuple[str, int | None, str | None]] = {}
        self.gone: tuple[str, int | None, str | None] | None = None   # the first of them seen to vanish
        self._exit_seen = threading.Event()      # the watcher saw a first exit and settles its verdict
        self._watcher: threading.Thread | None = None
        self.on_message = lambda backend, msg: None   # the supervisor's, once it takes this launch

    def _receive(self, msg) -> None:
        if self.hello is None and msg is not None and msg.get("t") == "hello":
            self.hello = msg
            self.up.set()
        else:
            self.on_message(self, msg)

    def _pump(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self.lines.append(line)
            print(line, file=sys.stderr, flush=True)
        stream.close()

    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    @property
    def pid(self) -> int | None:
        return self.hello["pid"] if self.hello else None

    def dead(self) -> bool:
        return self.proc.poll() is not None or (self.link is not None and self.link.closed.is_set())

    def remember_processes(self) -> None:
        """Note the job's processes once it is up, and watch them: hydra runs each proxy and each
        rank in a session of its own (a process whose parent died is out of reach of a walk from
        mpiexec), and which one vanished first names what was lost when MPICH does not."""
        self.tree = process_tree(self.proc.pid)
        ranks = {pid: r for pid, (r, _) in rank_map(self.output()).items()}
        ranks[self.pid] = 0
        self.labels = job_labels(self.tree, self.hosts, ranks)
        self._wake_r, self._wake_w = os.pipe()   # stops the watcher
        self._watcher = threading.Thread(target=self._watch, name="backend-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Wait on a pidfd per watched process, so each exit is seen when it happens and in order
        (a poll every few ms lost the race to mpiexec, whose own exit a host's loss triggers at
        once). Exits within 50 ms of the first count as one event, in which a proxy outranks a
        rank: a host that goes takes both, and its rank may be reaped first."""
        fds, order = {}, []
        for pid in self.labels:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                order.append(pid)
                continue
            if _start_time(pid) != self.tree[pid][0]:   # gone (or reused) before we looked
                os.close(fd)
                order.append(pid)
            else:
                fds[fd] = pid
        deadline = time.monotonic() + 0.05 if order else None
        try:
            while fds:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([*fds, self._wake_r], [], [], wait)
                if self._wake_r in ready or not ready:
                    break
                for fd in ready:
                    order.append(fds.pop(fd))
                    os.close(fd)
                if deadline is None:
                    deadline = time.monotonic() + 0.05
                    self._exit_seen.set()
        finally:
            for fd in fds:
                os.close(fd)
        proxies = [p for p in order if self.labels[p][1] is None]
        if order:
            self.gone = self.labels[(proxies or order)[0]]

    def kill(self, grace: float = 2.0) -> None:
        """Let mpiexec finish its own report for up to `grace` seconds, then kill whatever is left
        of the job: mpiexec's process tree now and every process of it seen when it came up."""
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        if self._watcher is not None:
            if self._exit_seen.is_set() or self.proc.returncode is not None:
                self._watcher.join(timeout=0.2)   # let it name the first to go
            os.write(self._wake_w, b"x")
            self._watcher.join(timeout=1)
            if not self._watcher.is_alive():
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._watcher = None
        # walk from mpiexec only while it is unreaped (a reaped pid may belong to anyone by now)
        now = process_tree(self.proc.pid) if self.proc.returncode is None else {}
        for pid, (started, _) in {**self.tree, **now}.items():
            if _start_time(pid) == started:   # still that process, not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.proc.wait()
        for t in self._pumps:
            t.join(timeout=2)
        if self.link is not None:
            self.link.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask rank 0 to stop the job; kill it if it has not ended within `timeout`."""
        if self.link is not None:
            self.link.send({"t": "stop"})
        self.kill(grace=timeout)


class Launcher:
    """Builds and starts the MPI job: which hosts (probing each host of the hostfile), how many
    ranks (the requested count minus the slots of hosts that do not start, then the largest count
    the model can be split into), the mpiexec command, and the wait until rank 0 says hello."""

    def __init__(self, mpiexec: list[str], n_ranks: int, hosts: list[tuple[str, int]] | None,
                 backend_args: list[str], header, workdir: str, probe_timeout: float, start_timeout: float,
                 stopping: threading.Event):
        self.mpiexec, self.n_ranks, self.hosts = mpiexec, n_ranks, hosts
        self.backend_args, self.header = backend_args, header
        self.workdir, self.probe_timeout, self.start_timeout = workdir, probe_timeout, start_timeout
        self.stopping = stopping
        self.path = os.path.join(workdir, "backend.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(self.path)
        except OSError as e:   # e.g. a TMPDIR too long for a socket path (108 bytes)
            raise ConfigError(f"cannot make the backend's socket {self.path}: {e}") from None
        self.listener.listen(4)
        self.listener.settimeout(0.2)
        self.launches = 0
        self.env = {k: v for k, v in os.environ.items() if k != NO_MPI_INIT}
        self.dllama = dllama_command()

    # --- hosts and ranks -------------------------------------------------------------------

    def probe(self, host: str) -> str | None:
        """None when a process starts on `host` through mpiexec's own launcher, else why not."""
        cmd = [*self.mpiexec, "-hosts", host, "-n", "1", "test", "-x", self.dllama[0]]
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=self.env, start_new_session=True)
        try:
            out, _ = p.communicate(timeout=self.probe_timeout)
        except subprocess.TimeoutExpired:
            for pid in process_tree(p.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            p.communicate()
            return f"no answer within {self.probe_timeout:g} s"
        if p.returncode == 0:
            return None
        said = [l.strip() for l in out.decode("utf-8", "replace").splitlines()
                if l.strip() and not l.startswith("[mpiexec@")]
        return said[0] if said else f"mpiexec exited with status {p.returncode}"

    def plan(self) -> tuple[list[tuple[str, int]] | None, int]:
        """(hosts to launch on, rank count). Probes every host in parallel; one log line per host
        that does not start."""
        from .shard import make_plan

        n, hosts = self.n_ranks, self.hosts
        if hosts is not None:
            why = [None] * len(hosts)

            def run(i):
                why[i] = self.probe(hosts[i][0])

            threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(hosts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for (host, _), w in zip(hosts, why):
                if w is not None:
                    log(f"serve: host {host} does not start: {w}")
            lost = sum(k for (_, k), w in zip(hosts, why) if w is not None)
            hosts = [h for h, w in zip(hosts, why) if w is None]
            if not hosts:
                raise LaunchFailed("no host of the hostfile starts")
            n = max(1, n - lost)
        while n > 1:   # the engine plans its split at start-up; pick a count it can split into
            try:
                make_plan(self.header, n, as_nodes=_options.get("as_nodes") or 0)
                break
            except ConfigError:
                n -= 1
        return hosts, n

    # --- one launch --------------------------------------------------------------------------

    def launch(self) -> Backend:
        """Start the job and wait until rank 0 has connected and said hello; LaunchFailed (with
        the cause) when the job ends first, does not connect within start_timeout, or we stop."""
        hosts, n = self.plan()
        self.launches += 1
        cmd = list(self.mpiexec)
        if hosts is not None:
            hostfile = os.path.join(self.workdir, f"hosts.{self.launches}")
            Path(hostfile).write_text("".join(f"{h}:{k}\n" for h, k in hosts))
            cmd += ["-f", hostfile]
        cmd += ["-n", str(n), *self.dllama, "api", "--backend", self.path, *self.backend_args]
        b = Backend(self.launches, cmd, self.env, hosts or [], n)
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                if self.stopping.is_set():
                    raise LaunchFailed("stopping")
                if b.proc.poll() is not None:
                    b.kill(grace=0)
                    raise LaunchFailed(describe_loss(b.output(), b.proc.returncode)[0])
                if time.monotonic() > deadline:
                    raise LaunchFailed(f"rank 0 did not connect within {self.start_timeout:g} s (--start-timeout)")
                if b.link is None:
                    try:
                        conn, _ = self.listener.accept()
                    except (socket.timeout, BlockingIOError):
                        continue
                    conn.settimeout(None)
                    b.link = Link(conn, b._receive)
                if b.up.wait(0.2):
                    b.remember_processes()
                    return b
                if b.link.closed.is_set():
                    continue   # the job is ending: its status and output come next round
        except BaseException as e:   # LaunchFailed, or Ctrl-C / SIGTERM during the first launch
            b.kill(grace=1 if isinstance(e, LaunchFailed) else 0)
            raise

    def close(self) -> None:
        self.listener.close()


def _start_time(pid: int) -> str | None:
    """A process's start time (/proc/PID/stat field 22): with the pid, names one process for good."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if fields[0] != "Z" else None


def process_tree(pid: int) -> dict[int, tuple[str, int]]:
    """pid and its descendants (through /proc/PID/task/PID/children) -> (start time, parent pid)."""
    out, todo = {}, [(pid, 0)]
    while todo:
        cur, parent = todo.pop()
        started = _start_time(cur)
        if started is None:
            continue
        out[cur] = (started, parent)
        try:
            todo += [(int(k), cur) for k in Path(f"/proc/{cur}/task/{cur}/children").read_text().split()]
        except OSError:
            pass
    return out


_PROXY_ID = re.compile(r"hydra_pmi_proxy\b.*--proxy-id (\d+)")


def job_labels(tree: dict[int, tuple[str, int]], hosts: list[tuple[str, int]], rank_pids: dict[int, int]) \
        -> dict[int, tuple[str, int | None, str | None]]:
    """What each local process of a job is: pid -> (what, rank, host). Hydra's proxy of host i (or
    the ssh that runs it there) has `--proxy-id i` in its command line; a rank is known by its pid
    (the root's `ranks:` line) and runs under its host's proxy."""
    proxy_host = {}
    for pid in tree:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        m = _PROXY_ID.search(cmd)
        if m:
            i = int(m.group(1))
            proxy_host[pid] = hosts[i][0] if i < len(hosts) else "this host"

    def host_of(pid):
        while pid in tree:
            if pid in proxy_host:
                return proxy_host[pid]
            pid = tree[pid][1]
        return None

    labels = {pid: (f"the MPI proxy of host {h} (pid {pid})", None, h) for pid, h in proxy_host.items()}
    for pid, rank in rank_pids.items():
        if pid in tree:
            h = host_of(pid)
            labels[pid] = (f"rank {rank} (pid {pid}" + (f" on {h})" if h else ")"), rank, h)
    return labels


def dllama_command() -> list[str]:
    """How to run this installation's dllama-mpi (the same path on every host, as under mpiexec)."""
    exe = Path(sys.executable).parent / "dllama-mpi"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dllama_mpi.cli"]


def default_mpiexec() -> str:
    exe = Path(sys.executable).parent / "mpiexec"
    return str(exe) if exe.exists() else (shutil.which("mpiexec") or "mpiexec")


# ------------------------------------------------------------------------------------------------
# the supervisor

class TextStream:
    """One request's text from its token ids: the tokenizer's stream decoder, the stop strings
    (scheduler.StopMatcher) and the end rules of Scheduler._on_token (end of turn, max_tokens, a
    full context), applied to the whole history of the request whatever backends produced it."""

    def __init__(self, tokenizer, stop, max_tokens: int, prompt_len: int, max_seq_len: int):
        from .scheduler import StopMatcher

        self.decoder, self.matcher = tokenizer.stream_decoder(), StopMatcher(stop)
        self.eos = set(tokenizer.eos_ids)
        self.max_tokens, self.prompt_len, self.max_seq_len = max_tokens, prompt_len, max_seq_len
        self.n = 0   # tokens pushed

    def push(self, tok: int) -> tuple[str, str | None]:
        """(text that became final with this token, finish reason if the request ends with it)."""
        self.n += 1
        if tok in self.eos:
            return self.flush(), "stop"
        text, stopped = self.matcher.push(self.decoder.push(tok))
        if stopped:
            return text, "stop"
        # the scheduler's rule: max_tokens, or K/V rows (prompt + every token but this one) filling the context
        if self.n >= self.max_tokens or self.prompt_len + self.n - 1 >= self.max_seq_len:
            return text + self.flush(), "length"
        return text, None

    def flush(self) -> str:
        return self.matcher.push(self.decoder.flush())[0] + self.matcher.flush()


@dataclass
class Flight:
    """A request the supervisor has taken: the API job (prompt ids, generated ids so far, limits)
    and what is needed to resume it anywhere: the seed and the sampler's state after the last token."""

    rid: int
    job: Job
    seed: int
    text: TextStream
    choice: int = 0                 # which of the job's n choices
    generated: list = field(default_factory=list)   # token ids so far, over every backend
    prompt_logprobs: list | None = None   # echo: the prompt's scores, once a backend has sent them
    state: int | None = None        # xorshift state after the last token (None: start from the seed)
    sent: bool = False              # submitted to the backend that runs now
    backend_done: bool = False
    done: bool = False
    first: dict = field(default_factory=dict)   # the first segment's prompt numbers (evaluated, seconds)
    t_first: float = 0.0
    t_last: float = 0.0


def _prompt_logprobs(rows) -> list:
    """scheduler.TokenLogprob list (None for the unscored first token) from the backend's message."""
    from .scheduler import TokenLogprob

    return [None if r is None else TokenLogprob(int(r[0]), r[1], [(int(i), v) for i, v in r[2]]) for r in rows]


class Supervisor(Server):
    """api.Server with the MPI job behind a socket: the main thread takes API jobs, sends them to
    rank 0 and watches the job; the link's reader thread turns tokens into text (see the module
    docstring); a dead job is relaunched and its unfinished requests re-submitted."""

    def __init__(self, launcher: Launcher, backend: Backend, policy: RestartPolicy, tokenizer, model_id, template,
                 defaults, api_key, max_body_bytes, cors_origins, web_ui, max_n: int = 8):
        from prometheus_client import Counter

        from .kvcache import KVPlan
        from .metrics import RankStats

        self.launcher, self.policy = launcher, policy
        self.lock = threading.RLock()
        self.flights: dict[int, Flight] = {}
        self.next_id = 0
        self.backend: Backend | None = None
        self.backend_gauges: dict = {}
        self.exit_code = 0
        self.lost_at = 0.0
        self.last_cause = ""
        self._stats: list | None = None
        self._stats_ready = threading.Event()
        h = backend.hello
        self.init_front(tokenizer, model_id, template, defaults, api_key, max_body_bytes, cors_origins, web_ui,
                        max_n, h["max_seq_len"], KVPlan(**h["kv_plan"]), h["kv_bytes_per_token"],
                        RankStats(self._gather_rank_stats, tuple(h["rank_stats"])))
        self.stopping = launcher.stopping   # also ends a launch in progress
        from .grammar import Grammars

        # response_format and tools are compiled here (a 400 before queueing) and sent as text; the
        # backend builds its matchers from that text, as wide as its logits
        self.grammars = Grammars(tokenizer, tokenizer.vocab_size)
        self.restarts = Counter("dllama_backend_restarts", "Relaunches of the MPI job after it was lost",
                                registry=self.metrics.registry)
        self.metrics.gauge("backend_up", "1 while the MPI job is up, 0 while it is being relaunched",
                           lambda: int(self.backend is not None))
        self.metrics.gauge("backend_ranks", "Ranks of the MPI job running now",
                           lambda: self.backend.n_ranks if self.backend is not None else 0)
        self._attach(backend)

    # --- the backend's numbers ---------------------------------------------------------------

    def _attach(self, b: Backend) -> None:
        from .kvcache import KVPlan

        h = b.hello
        with self.lock:
            self.backend = b
            b.on_message = self._on_message
            self.max_seq_len, self.kv_plan = h["max_seq_len"], KVPlan(**h["kv_plan"])
            self.kv_bytes_per_token = h["kv_bytes_per_token"]
            self.backend_gauges = dict(h["gauges"])
            self._reap_cancelled()   # clients that hung up during the recovery are not re-submitted
            for f in self.flights.values():
                self._send(f)

    def gauges(self) -> dict:
        with self.lock:
            g = dict(self.backend_gauges)
            unsent = sum(1 for f in self.flights.values() if not f.sent)
        g["waiting"] = g.get("waiting", 0) + unsent
        return g

    def health(self) -> dict:
        b = self.backend
        body = super().health()
        body["status"] = "ok" if b is not None else "recovering"
        body["backend"] = {"up": b is not None, "ranks": b.n_ranks if b else 0,
                           "hosts": [h for h, _ in b.hosts] if b else [], "launches": self.launcher.launches,
                           "last_loss": self.last_cause or None}
        return body

    def _gather_rank_stats(self):
        """RankStats.gather on the main thread: ask rank 0, wait a little for its answer."""
        import numpy as np

        b = self.backend
        if b is None:
            return self.rank_stats.values
        self._stats_ready.clear()
        b.link.send({"t": "stats"})
        if self._stats_ready.wait(2.0) and self._stats is not None:
            return np.asarray(self._stats, np.float64)
        return self.rank_stats.values

    # --- the main thread ---------------------------------------------------------------------

    def run_jobs(self) -> None:
        while not self.stopping.is_set():
            b = self.backend
            if b is None:
                self._relaunch()
                continue
            if b.dead():
                self._lost(b)
                continue
            for job in self.queued_jobs(block=True):
                self._add(job)
            self._reap_cancelled()
            self.rank_stats.poll()
        self._shutdown()

    def _add(self, job: Job) -> None:
        """A job's n choices become n flights (choice i draws with seed + i, as api.Server does); the
        backend's prefix cache shares their prompt's pages once the first has evaluated it."""
        with self.lock:
            for i in range(job.n):
                self.next_id += 1
                if job.seed is not None:
                    seed = job.seed + i
                else:   # as the Sampler would pick it for one choice; distinct ones for several
                    seed = int(time.time()) if job.n == 1 else int.from_bytes(os.urandom(4), "little")
                f = Flight(self.next_id, job, seed,
                           TextStream(self.tokenizer, job.stop, job.max_tokens, len(job.prompt_ids), self.max_seq_len),
                           choice=i)
                f.generated = job.generated.setdefault(i, [])
                self.flights[f.rid] = f
                if self.backend is not None:
                    self._send(f)

    def _send(self, f: Flight) -> None:
        """Submit (or re-submit after a restart) what is left of a request: the prompt and every
        token generated so far as the prompt, the remaining tokens, the sampler where it was."""
        job = f.job
        want_plp = job.echo and job.logprobs is not None and f.choice == 0 and f.prompt_logprobs is None
        if want_plp and f.generated:   # scores of the original prompt only: resubmit it as it was
            want_plp = False
        msg = {"t": "req", "id": f.rid, "prompt": list(job.prompt_ids) + list(f.generated),
               "max_tokens": job.max_tokens - len(f.generated), "temperature": job.temperature,
               "top_p": job.top_p, "seed": f.seed, "state": f.state, "logprobs": job.logprobs,
               "prompt_logprobs": want_plp, "draft": job.draft}
        if job.grammar is not None:   # the backend replays the generated tokens into a fresh matcher
            msg["grammar"], msg["consumed"] = job.grammar.text, len(f.generated)
        f.sent = self.backend.link.send(msg)
        f.backend_done = False

    def _reap_cancelled(self) -> None:
        with self.lock:
            for f in [f for f in self.flights.values() if f.job.cancel.is_set()]:
                self._finish(f, "abort")

    # --- what rank 0 sends (the link's reader thread) -----------------------------------------

    def _on_message(self, b: Backend, msg) -> None:
        if msg is None:
            return   # the main thread sees the job end (Backend.dead)
        with self.lock:
            if b is not self.backend:
                return   # a launch that is gone
            kind = msg["t"]
            f = self.flights.get(msg.get("id"))
            if kind == "tok" and f is not None:
                self._token(f, msg)
            elif kind == "done" and f is not None:
                f.backend_done = True
                if "plp" in msg:
                    f.prompt_logprobs = _prompt_logprobs(msg["plp"])
                if msg["reason"] != "abort":   # the end rules here already ended it; a safety net
                    self._finish(f, msg["reason"], flush=True)
            elif kind == "error" and f is not None:
                f.job.send(("error", ApiError(400, msg["message"], None, "context_length_exceeded")))
                f.done = True
                del self.flights[f.rid]
            elif kind == "gauges":
                self.backend_gauges = msg["gauges"]
            elif kind == "stats":
                self._stats = msg["values"]
                self._stats_ready.set()

    def _token(self, f: Flight, msg: dict) -> None:
        """One generated token: its text over the request's whole history (the backend's segment
        may have started after a restart), and the end of the request if it ends here."""
        from .scheduler import Piece, TokenLogprob

        now = time.perf_counter()
        if "first" in msg and not f.first:
            f.first, f.t_first = msg["first"], now
        if "plp" in msg:
            f.prompt_logprobs = _prompt_logprobs(msg["plp"])
        f.state, f.t_last = msg["state"], now
        tok = int(msg["tok"])
        text, reason = f.text.push(tok)
        lp = None
        if msg.get("lp") is not None:
            lp = TokenLogprob(tok, msg["lp"][0], [(int(i), v) for i, v in msg["lp"][1]])
        self._on_event(f.job, f.choice, f, "piece", Piece(tok, text, lp))
        if reason is not None:
            self._finish(f, reason)

    def _finish(self, f: Flight, reason: str, flush: bool = False) -> None:
        from .scheduler import RunStats

        if f.done:
            return
        f.done = True
        del self.flights[f.rid]
        if flush:
            from .scheduler import Piece

            tail = f.text.flush()
            if tail:   # text held back for a stop string: its token was sent already
                f.job.send(("piece", f.choice, Piece(-1, tail)))
        if f.sent and not f.backend_done and self.backend is not None:
            self.backend.link.send({"t": "cancel", "id": f.rid})
        job, first = f.job, f.first
        st = RunStats(prompt_tokens=len(job.prompt_ids), evaluated_prompt_tokens=first.get("evaluated", 0),
                      generated_tokens=len(f.generated), prompt_seconds=first.get("prompt_s", 0.0),
                      queue_seconds=first.get("queue_s", 0.0), generate_seconds=f.t_last - f.t_first,
                      finish_reason=reason)
        self._on_event(job, f.choice, f, "done", st)

    # --- loss and recovery -------------------------------------------------------------------

    def _lost(self, b: Backend) -> None:
        self.lost_at = time.monotonic()
        with self.lock:
            self.backend = None
            self.backend_gauges = {**self.backend_gauges, "running": 0, "waiting": 0}
            for f in self.flights.values():
                f.sent = False
            in_flight = len(self.flights)
        b.kill()
        cause, rank, host = describe_loss(b.output(), b.proc.returncode, b.pid, b.gone)
        self.last_cause = cause
        log(f"serve: lost the MPI job (launch {b.number}, {b.n_ranks} rank(s), up {self.lost_at - b.t_start:.1f} s): "
            f"{cause}; {in_flight} request(s) in flight, {self.jobs.qsize()} queued")

    def _relaunch(self) -> None:
        policy = self.policy
        delay = policy.delay()
        if delay and self.stopping.wait(delay):
            return
        now = time.monotonic()
        if not policy.allow(now):
            self._give_up(f"{policy.max_restarts} relaunches within {policy.window:g} s (--max-restarts)")
            return
        policy.attempt(now)
        self.restarts.inc()
        t0 = time.monotonic()
        try:
            b = self.launcher.launch()
        except LaunchFailed as e:
            if self.stopping.is_set():
                return
            policy.failed()
            self.last_cause = str(e)
            log(f"serve: relaunch {self.launcher.launches} failed after {time.monotonic() - t0:.1f} s: {e}; "
                f"next try in {policy.delay():g} s")
            return
        policy.succeeded()
        self._attach(b)
        with self.lock:
            resubmitted = sum(1 for f in self.flights.values() if f.sent)
        hosts = ", ".join(f"{h}:{k}" for h, k in b.hosts) or "this host"
        log(f"serve: recovered in {time.monotonic() - self.lost_at:.1f} s (launch {b.number}: {b.n_ranks} rank(s) "
            f"on {hosts}, loaded in {b.hello.get('load_seconds', 0):.1f} s); {resubmitted} request(s) resubmitted; "
            f"{len(policy.attempts)} relaunch(es) in the last {policy.window:g} s")

    def _give_up(self, why: str) -> None:
        log(f"serve: giving up: {why}; last loss: {self.last_cause}")
        self.exit_code = 3
        err = ApiError(503, "the model's MPI job was lost and could not be restarted", type_="server_error")
        with self.lock:
            for f in list(self.flights.values()):
                f.done = True
                f.job.send(("error", err))
            self.flights.clear()
        self.stopping.set()

    def _shutdown(self) -> None:
        b, self.backend = self.backend, None
        with self.lock:
            for f in list(self.flights.values()):
                self._finish(f, "abort")
        if b is not None:
            b.stop()
        self.refuse_queued()


# ------------------------------------------------------------------------------------------------
# the command

def _backend_args(model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len, sync_scheme, load, max_batch,
                  parallel, kv_memory, sync_timeout) -> list[str]:
    """The api --backend options: everything rank 0 and the workers need to load and run the model."""
    args = ["--model", model_path, *(["--tokenizer", tokenizer_path] if tokenizer_path else []), "--sync",
            sync_scheme, "--load", load, "--batch", str(max_batch), "--parallel", str(parallel), "--sync-timeout",
            f"{sync_timeout:g}"]
    for opt, v in (("--nthreads", nthreads), ("--buffer-float-type", buffer_float_type),
                   ("--max-seq-len", max_seq_len), ("--kv-memory", kv_memory), ("--pp", _options.get("pp")),
                   ("--split", _options.get("split")), ("--wait", _options.get("wait")),
                   ("--as-nodes", _options.get("as_nodes") or None),
                   ("--spec", _options.get("spec")), ("--draft-max", _options.get("draft_max")),
                   ("--draft-min", _options.get("draft_min")), ("--draft-p-min", _options.get("draft_p_min")),
                   ("--draft-model", _options.get("draft_model") and os.path.abspath(_options["draft_model"]))):
        if v is not None:
            args += [opt, str(v)]
    if _options.get("draft_fixed"):
        args.append("--draft-fixed")
    return args


def register(group) -> None:
    """Add `serve` to the CLI group."""

    @click.command()
    @model_options
    @sampling_options
    @spec_options
    @server_options
    @click.option("-n", "--np", "n_ranks", type=int, default=None,
                  help="MPI ranks [default: the slots of --hostfile, else 1].")
    @click.option("-f", "--hostfile", default=None,
                  help="MPICH hostfile (host[:slots] per line). The first host must be this machine: rank 0 talks "
                       "to the supervisor over a unix socket. Hosts that do not start are left out of a relaunch.")
    @click.option("--mpiexec", "mpiexec_path", default=None, help="mpiexec to run [default: the venv's, else PATH's].")
    @click.option("--mpiexec-args", default="", help="More mpiexec options, e.g. '-launcher ssh -launcher-exec X' [default: none].")
    @click.option("--max-restarts", type=int, default=10, show_default=True,
                  help="Give up after this many relaunches within --restart-window seconds.")
    @click.option("--restart-window", type=float, default=600.0, show_default=True,
                  help="The window, in seconds, that --max-restarts counts relaunches in.")
    @click.option("--probe-timeout", type=float, default=10.0, show_default=True,
                  help="Seconds a host of the hostfile may take to start a probe process.")
    @click.option("--start-timeout", type=float, default=600.0, show_default=True,
                  help="Seconds a launch may take to load the model and connect.")
    @one_line()
    def serve(model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len, sync_scheme, load, max_batch,
              temperature, topp, seed, parallel, max_n, host, port, api_key, max_body_bytes, cors_origin, chat_template,
              model_name, verbose, no_web_ui, n_ranks, hostfile, mpiexec_path, mpiexec_args, max_restarts,
              restart_window, probe_timeout, start_timeout):
        """The API with a supervisor: relaunches the MPI job when a rank or host is lost and resumes
        every request (not under mpirun: it runs mpiexec itself)."""
        os.environ[NO_MPI_INIT] = "0"
        sys.exit(_serve(model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len, sync_scheme, load,
                        max_batch, temperature, topp, seed, parallel, max_n, host, port, api_key, max_body_bytes,
                        cors_origin, chat_template, model_name, verbose, no_web_ui, n_ranks, hostfile, mpiexec_path,
                        mpiexec_args, max_restarts, restart_window, probe_timeout, start_timeout))

    group.add_command(serve)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _serve(model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len, sync_scheme, load, max_batch,
           temperature, topp, seed, parallel, max_n, host, port, api_key, max_body_bytes, cors_origin, chat_template,
           model_name, verbose, no_web_ui, n_ranks, hostfile, mpiexec_path, mpiexec_args, max_restarts, restart_window,
           probe_timeout, start_timeout) -> int:
    from .api import _model_id
    from .chat import template_for
    from .shard import fit_types, make_plan
    from .startup import load_tokenizer, resolve_model
    from .weights import open_model_file, runtime_header

    check_server_options(port, max_body_bytes, max_n)
    spec = spec_config()    # a bad --draft-max / --draft-min fails here, not in every launch
    for name, v in (("--max-restarts", max_restarts), ("--restart-window", restart_window),
                    ("--probe-timeout", probe_timeout), ("--start-timeout", start_timeout)):
        if v < (0 if name == "--max-restarts" else 1e-9):
            raise ConfigError(f"{name} must be {'>= 0' if name == '--max-restarts' else '> 0'}, got {v:g}")
    hosts = parse_hostfile(hostfile) if hostfile else None
    if n_ranks is None:
        n_ranks = sum(k for _, k in hosts) if hosts else 1
    if n_ranks < 1:
        raise ConfigError(f"-n must be >= 1, got {n_ranks}")
    model_file, tokenizer_file = resolve_model(model_path, tokenizer_path)
    tokenizer = load_tokenizer(model_file, tokenizer_file)
    m = open_model_file(model_file)
    header, _ = runtime_header(m)
    m.close()
    if tokenizer.vocab_size != header.vocab_size:
        raise ConfigError(f"{tokenizer_file or model_file}: tokenizer has {tokenizer.vocab_size} tokens but the "
                          f"model {model_file} has vocab_size {header.vocab_size}")
    if spec.method == "draft":   # so does a bad --draft-model
        from .speculative import check_draft_model

        check_draft_model(spec.draft_model, header.vocab_size, tokenizer.vocab)
    # an impossible split fails here, before anything starts
    fit_types(header, lambda h: make_plan(h, n_ranks, as_nodes=_options.get("as_nodes") or 0))
    template = template_for(tokenizer, chat_template)
    sync_timeout = _options.get("sync_timeout") or 20.0
    backend_args = _backend_args(os.path.abspath(model_file), tokenizer_file and os.path.abspath(tokenizer_file), nthreads,
                                 buffer_float_type, max_seq_len, sync_scheme, load, max_batch, parallel,
                                 _options.get("kv_memory"), sync_timeout)
    mpiexec = [mpiexec_path or default_mpiexec(), *shlex.split(mpiexec_args)]
    workdir = tempfile.mkdtemp(prefix="dllama-serve-")   # 0700: only our children reach the socket
    stopping = threading.Event()
    launcher = Launcher(mpiexec, n_ranks, hosts, backend_args, header, workdir, probe_timeout, start_timeout, stopping)
    backend = None
    try:
        t0 = time.monotonic()
        signal.signal(signal.SIGTERM, _interrupt)   # until serve_http takes over: clean up, then exit
        try:
            backend = launcher.launch()
        except LaunchFailed as e:
            raise ConfigError(f"the MPI job did not start: {str(e).removeprefix('error: ')}") from None
        supervisor = Supervisor(launcher, backend, RestartPolicy(max_restarts, restart_window), tokenizer,
                                model_name or _model_id(model_path), template,
                                {"temperature": temperature, "top_p": topp, "seed": seed}, api_key, max_body_bytes,
                                list(cors_origin), not no_web_ui, max_n)
        log(f"serve: MPI job up in {time.monotonic() - t0:.1f} s: {backend.n_ranks} rank(s) on "
            f"{', '.join(f'{h}:{k}' for h, k in backend.hosts) or 'this host'} (rank 0 pid {backend.pid})")
        serve_http(supervisor, host, port, verbose)
        backend = None   # the supervisor stopped it
        return supervisor.exit_code
    finally:
        if backend is not None:
            backend.kill(grace=0)
        launcher.close()
        shutil.rmtree(workdir, ignore_errors=True)
