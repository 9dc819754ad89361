"""Start-up shared by every model command: the options they all take, the SPMD wrapper that turns
any error into one line and a job-wide exit, and the collective start (`start`: default model,
checks on the root, weights to every rank). Command modules (inference, chat, api, benchmark, ...)
import from here; `cli` only assembles them into the `dllama-mpi` group.

Every command that runs a model is SPMD: run it under `mpirun -np N`; rank 0 talks to the user, the
other ranks follow. Errors are caught here, once: one line on stderr, exit code 2, and every rank of
the job ends (comm.abort). The commands that are not MPI jobs end the same way through `one_line`."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
import traceback

import click

from .errors import ConfigError, DllamaError


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def spmd(fn):
    """Run fn(comm, ...) on every rank; turn any exception into one line and a job-wide exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .comm import world

        comm = world()
        _end_on_sigterm(comm)
        try:
            comm.set_sync_timeout(_options.get("sync_timeout"))
            return fn(comm, *args, **kwargs)
        except DllamaError as e:
            # The root runs every check that all ranks would run; a worker only gets here with an
            # error of its own, so it names itself.
            who = "" if comm.is_root else f"rank {comm.rank}: "
            log(f"error: {who}{e}")
            comm.abort(e.exit_code)
        except KeyboardInterrupt:
            if comm.is_root:
                log("interrupted")
            comm.abort(130)
        except Exception as e:  # a bug: keep the trace, still end every rank
            log(f"error: rank {comm.rank}: unexpected {type(e).__name__}: {e}")
            traceback.print_exc()
            comm.abort(1)

    return wrapper


# SIGTERM: what a job gets from `scancel`, a Slurm time limit (then SIGKILL after KillWait) or a kill
# that mpiexec forwards to every rank. Commands that stop cleanly on it (chat, api) install their own
# handler; for the others `sigterm_note` adds to the root's one line (batch: where to resume), and
# `output_lock` is held while a command writes a result line, so a rank never dies mid-line.
sigterm_note = None          # callable -> str, or None
output_lock = threading.Lock()


def _end_on_sigterm(comm) -> None:
    """On SIGTERM end this rank at once with exit code 143 (128 + 15), the root with one line.
    A Python signal handler runs in the main thread between bytecodes, which a rank spinning in a
    blocking MPI collective does not reach before the SIGKILL: so the handler does nothing, and
    the signal's byte on the wakeup pipe (written by the C-level handler on arrival) wakes a thread
    that ends the process. A command that installs its own SIGTERM handler later takes over. The pipe
    and the thread are made once per process (tests run many commands in one)."""
    global _sigterm_pipe, sigterm_note
    if threading.current_thread() is not threading.main_thread():
        return
    _sigterm_comm[0] = comm
    sigterm_note = None
    if _sigterm_pipe is None:
        r, w = os.pipe()
        os.set_blocking(w, False)
        _sigterm_pipe = w
        threading.Thread(target=_sigterm_watch, args=(r,), name="dllama-sigterm", daemon=True).start()
    signal.signal(signal.SIGTERM, _sigterm_noted)
    signal.set_wakeup_fd(_sigterm_pipe, warn_on_full_buffer=False)


_sigterm_pipe: int | None = None
_sigterm_comm: list = [None]


def _sigterm_noted(signum, frame) -> None:
    pass   # the work happens in _sigterm_watch


def _sigterm_watch(r: int) -> None:
    while True:
        got = os.read(r, 64)
        if signal.SIGTERM.value not in got or signal.getsignal(signal.SIGTERM) is not _sigterm_noted:
            continue
        if _sigterm_comm[0].is_root:
            note = sigterm_note() if sigterm_note else ""
            log("terminated by SIGTERM (scancel, a time limit, a requeue or a kill): every rank stops"
                + (f"; {note}" if note else ""))
        output_lock.acquire(timeout=2.0)
        os._exit(143)


def one_line(interrupted: str | None = "interrupted"):
    """The edge of a command that is not an MPI job (serve, download, convert), as `spmd` is for the
    SPMD ones: a DllamaError is one `error:` line and its exit code; Ctrl-C logs `interrupted` and
    exits 130 (None leaves it to click)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except DllamaError as e:
                log(f"error: {e}")
                sys.exit(e.exit_code)
            except KeyboardInterrupt:
                if interrupted is None:
                    raise
                log(interrupted)
                sys.exit(130)

        return wrapper

    return decorate


# ------------------------------------------------------------------------------------------------
# shared options

_options: dict = {}   # options every rank applies in `spmd` without passing them to the command


def _sync_timeout_option(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be > 0 seconds, got {value:g}")
    _options["sync_timeout"] = value
    return value


def _store(key: str):
    """A click callback that keeps the option's value in _options[key]."""
    def callback(ctx, param, value):
        _options[key] = value
        return value
    return callback


def model_options(fn):
    opts = [
        # paths are checked in resolve_model (one line, once on the root), not by click on every rank
        click.option("--model", "model_path", type=click.Path(readable=False), default=None,
                     help="A GGUF file (llama.cpp's, run as it is) or a Distributed Llama .m model "
                          "[default: SmolLM2-135M-Instruct's Q4_1 GGUF, installed on first use]."),
        click.option("--tokenizer", "tokenizer_path", type=click.Path(readable=False), default=None,
                     help="A Distributed Llama .t tokenizer, or a GGUF to take the vocabulary from "
                          "[default: the GGUF model's own; required with a .m model]."),
        click.option("--nthreads", type=int, default=None,
                     help="Threads per rank (C thread pool) [default: the cores this rank may use / the ranks on its host]."),
        click.option("--buffer-float-type", type=click.Choice(["q80", "f32"]), default=None,
                     help="Format of synchronised activations [default: q80 when some matrix is a block type (q40, q80, Q4_K, ...), f32 for f16 / bf16 / f32 weights]."),
        click.option("--max-seq-len", type=int, default=None, help="Cap the context (KV-cache rows) [default: the model's context length]."),
        click.option("--sync", "sync_scheme", type=click.Choice(["ring", "dllama", "auto"]), default="ring", show_default=True,
                     help="ring: reduce-scatter + all-gather; dllama: all-gather of every partial (Distributed Llama's "
                          "numerics); auto: ring, or dllama when collective waits poll (one round per sync instead "
                          "of two: a napping rank's wake-up is not on the ring's critical path twice; for throttled "
                          "or oversubscribed ranks). The default stays ring so a job's numbers do not depend on how "
                          "many cores its machines happen to have."),
        click.option("--load", type=click.Choice(["scatter", "local"]), default="scatter", show_default=True,
                     help="scatter: only rank 0 reads the model; local: every rank maps its own slices (shared storage)."),
        click.option("--batch", "max_batch", type=int, default=32, show_default=True, help="Prompt positions per forward pass."),
        click.option("--kv-memory", default=None, expose_value=False, callback=_store("kv_memory"),
                     help="KV cache pool per rank, e.g. 512MiB or 4GiB (the rank holding the most KV heads) "
                          "[default: every sequence slot's full context, at most 1/4 of the memory]."),
        click.option("--pp", type=int, default=1, show_default=True, expose_value=False, callback=_store("pp"),
                     help="Pipeline stages: the ranks form this many stages, each a contiguous range of layers "
                          "with tensor parallelism over its ranks; passes of different sequences overlap."),
        click.option("--as-nodes", type=click.IntRange(min=0), default=0, show_default=True, expose_value=False,
                     callback=_store("as_nodes"),
                     help="Compute every layer as this many nodes would (each rank a share of them), so that "
                          "outputs are the same bits on any node count up to it, one included: the same seed "
                          "gives the same tokens on 1, 2 or 4 machines. Costs a little speed "
                          "(more, smaller matmuls; an all-gather sync); 0: off."),
        click.option("--split", default="even", show_default=True, expose_value=False, callback=_store("split"),
                     help="How layers and tensor slices are shared: even, auto (measure each rank's speed and "
                          "free memory at start-up) or one weight per rank, e.g. 3,1."),
        click.option("--wait", type=click.Choice(["auto", "spin", "poll"]), default="auto", show_default=True,
                     expose_value=False, callback=_store("wait"),
                     help="How ranks wait in a pass's collectives: spin (fastest when every rank has its cores), "
                          "poll (leave the core: ranks sharing cores, or held to a CPU quota); auto: poll when "
                          "some rank's host has fewer cores (or CPU quota) than its ranks' threads."),
        click.option("--sync-timeout", type=float, default=None, expose_value=False, callback=_sync_timeout_option,
                     help="Abort the job (exit 3) when a rank waits longer than this many seconds in one "
                          "collective of a forward pass (a stopped or wedged peer) [default: wait forever]."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def sampling_options(fn):
    opts = [
        click.option("--temperature", type=float, default=0.8, show_default=True,
                     help="Sampling temperature (0 = greedy)."),
        click.option("--topp", type=float, default=0.9, show_default=True,
                     help="Nucleus sampling: the smallest set of tokens whose probabilities reach P."),
        click.option("--seed", type=int, default=None, help="Sampler seed (default: time)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def spec_options(fn):
    """Speculative decoding (speculative.py); the values are read on the root by spec_config()."""
    from .speculative import DRAFT_MAX, DRAFT_MIN, DRAFT_P_MIN, SPEC_METHODS

    opts = [
        click.option("--spec", type=click.Choice(SPEC_METHODS), default="none", show_default=True,
                     expose_value=False, callback=_store("spec"),
                     help="Speculative decoding: ngram drafts a sequence's next tokens from its own prompt and "
                          "output (prompt lookup), draft from --draft-model, and they are verified in one pass; "
                          "the output is plain decoding's, greedy or seeded."),
        # the path is checked on the root (one line), not by click on every rank
        click.option("--draft-model", type=click.Path(readable=False), default=None, expose_value=False,
                     callback=_store("draft_model"),
                     help="--spec draft: a smaller or lower-precision model with the same vocabulary (GGUF or .m), "
                          "run whole on rank 0."),
        click.option("--draft-p-min", type=float, default=DRAFT_P_MIN, show_default=True, expose_value=False,
                     callback=_store("draft_p_min"),
                     help="--spec draft: the draft stops before a token the draft model gives a probability below this."),
        click.option("--draft-max", type=int, default=DRAFT_MAX, show_default=True, expose_value=False,
                     callback=_store("draft_max"), help="Most tokens a sequence drafts per pass."),
        click.option("--draft-min", type=int, default=DRAFT_MIN, show_default=True, expose_value=False,
                     callback=_store("draft_min"), help="Shorter drafts are not verified (the pass decodes plainly)."),
        click.option("--draft-fixed", is_flag=True, default=False, show_default=True, expose_value=False,
                     callback=_store("draft_fixed"),
                     help="Draft --draft-max tokens every pass (llama.cpp's and vLLM's rule) instead of as many as "
                          "pay by the sequence's acceptance and the measured cost of a row."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def spec_config():
    """The SpecConfig of the command line's --spec / --draft-max / --draft-min / --draft-p-min /
    --draft-model / --draft-fixed (ConfigError when bad)."""
    from .speculative import DRAFT_MAX, DRAFT_MIN, DRAFT_P_MIN, SpecConfig

    return SpecConfig(_options.get("spec") or "none", _options.get("draft_max", DRAFT_MAX),
                      _options.get("draft_min", DRAFT_MIN), _options.get("draft_p_min", DRAFT_P_MIN),
                      _options.get("draft_model"), bool(_options.get("draft_fixed")))


def read_text_file(path: str) -> str:
    """A UTF-8 text file given on the command line, or one ConfigError line naming it."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def default_threads(cores: int, local_ranks: int) -> int:
    """Threads per rank when --nthreads is not given: the cores a rank may use shared among the
    ranks on its host (each rank a persistent pool), at least one."""
    return max(1, cores // max(local_ranks, 1))


def host_cores() -> tuple[int, str]:
    """The cores this host's ranks of the job may use, and what says so: in a Slurm job the CPUs
    Slurm gave the job on this node (SLURM_CPUS_ON_NODE; without cgroups or binding the CPU affinity
    is the whole node, which other jobs share), otherwise this rank's CPU affinity."""
    slurm = os.environ.get("SLURM_CPUS_ON_NODE", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm), f"{_plural(int(slurm), 'CPU')} Slurm gave this node"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, f"{_plural(cores, 'core')} available"


def choose_threads(comm, nthreads: int | None) -> tuple[int, str]:
    """This rank's thread count and why (collective: every rank asks MPI how many ranks share its
    host). An explicit --nthreads wins, then Slurm's --cpus-per-task (SLURM_CPUS_PER_TASK)."""
    local = comm.local_size()
    if nthreads is not None:
        return nthreads, f"{_plural(nthreads, 'thread')}: --nthreads {nthreads}"
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        return int(per_task), f"{_plural(int(per_task), 'thread')}: SLURM_CPUS_PER_TASK={per_task}"
    cores, what = host_cores()
    n = default_threads(cores, local)
    return n, f"{_plural(n, 'thread')}: {what} / {_plural(local, 'rank')} on this host"


def slurm_line() -> str | None:
    """What Slurm gave this job step (the root's start-up log), None outside Slurm."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return None
    job = env["SLURM_JOB_ID"] + (f".{env['SLURM_STEP_ID']}" if "SLURM_STEP_ID" in env else "")
    parts = [f"slurm: job {job}"]
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if nodes:
        parts.append(f"nodes {nodes}")
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if tasks:
        parts.append(f"{tasks} tasks")
    if env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"):
        parts.append(f"tasks per node {env.get('SLURM_STEP_TASKS_PER_NODE') or env['SLURM_TASKS_PER_NODE']}")
    if env.get("SLURM_CPUS_PER_TASK"):
        parts.append(f"{env['SLURM_CPUS_PER_TASK']} CPUs per task")
    if env.get("SLURM_MPI_TYPE"):
        parts.append(f"--mpi={env['SLURM_MPI_TYPE']}")
    return ", ".join(parts)


def cpu_quota_cores() -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v1 cpu.cfs_quota_us / period, or v2
    cpu.max), None when there is none."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [l.strip().split(":", 2) for l in f if l.strip()]
    except OSError:
        return None
    for _, ctrls, path in lines:
        names = ctrls.split(",")
        candidates = []
        if "cpu" in names:
            candidates.append(("v1", f"/sys/fs/cgroup/cpu{path}", f"/sys/fs/cgroup/cpu,cpuacct{path}"))
        if ctrls == "":
            candidates.append(("v2", f"/sys/fs/cgroup{path}", f"/sys/fs/cgroup/unified{path}"))
        for kind, *dirs in candidates:
            for d in dirs:
                try:
                    if kind == "v1":
                        quota = int(open(f"{d}/cpu.cfs_quota_us").read())
                        period = int(open(f"{d}/cpu.cfs_period_us").read())
                    else:
                        q, p = open(f"{d}/cpu.max").read().split()
                        if q == "max":
                            continue
                        quota, period = int(q), int(p)
                except (OSError, ValueError):
                    continue
                if quota > 0 and period > 0:
                    return quota / period
    return None


def wants_poll(mode: str, nthreads: int, local_ranks: int) -> tuple[bool, str]:
    """Whether this rank asks for poll waits (--wait), and why."""
    if mode != "auto":
        return mode == "poll", f"--wait {mode}"
    cores, what = host_cores()
    if local_ranks * nthreads > cores:
        return True, f"{local_ranks} ranks x {_plural(nthreads, 'thread')} on {what}"
    quota = cpu_quota_cores()
    if quota is not None and quota < nthreads:
        return True, f"a CPU quota of {quota:.2f} cores for {_plural(nthreads, 'thread')}"
    return False, "every rank has its cores"


def threads_line(choices: list[tuple[int, str]]) -> str:
    """The start-up line from every rank's (threads, why): one reason when all ranks agree."""
    whys = [why for _, why in choices]
    if all(w == whys[0] for w in whys):
        return whys[0]
    return "; ".join(f"rank {r}: {w}" for r, w in enumerate(whys))


def resolve_model(model_path, tokenizer_path):
    """(model, tokenizer or None) after checking both paths (root only): the default model (the
    SmolLM2 GGUF, installed on first use) when --model is omitted. A GGUF carries its tokenizer, so
    --tokenizer is only required with a .m model."""
    from .gguf import is_gguf

    if model_path is None:
        from .convert.smollm2 import default_models_dir, ensure_default_model

        model_path, default_tok = ensure_default_model(default_models_dir())
        log(f"no --model given: using the default model {model_path}")
        tokenizer_path = tokenizer_path or default_tok
    for what, p in (("model", model_path), ("tokenizer", tokenizer_path)):
        if p is None:
            continue
        if os.path.isdir(p):
            raise ConfigError(f"{p}: the {what} path is a directory, not a file")
        if not os.path.isfile(p):
            raise ConfigError(f"{p}: {what} file not found")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"{p}: {what} file is not readable (permission denied)")
    if tokenizer_path is None and not is_gguf(model_path):
        raise ConfigError("--tokenizer is required with a .m model (a GGUF model carries its own)")
    return model_path, tokenizer_path


def load_tokenizer(model_path, tokenizer_path):
    """The tokenizer of --tokenizer (a .t file, or a GGUF's vocabulary), else the GGUF model's own."""
    from .gguf import GGUFFile, is_gguf, tokenizer_of
    from .tokenizer import Tokenizer

    path = tokenizer_path or model_path
    if not is_gguf(path):
        return Tokenizer.load(path)
    g = GGUFFile(path)
    try:
        return tokenizer_of(g)
    finally:
        g.close()


def load_draft_model(path: str, target):
    """Root: the draft model (speculative.py), whole on this rank, sized for the target engine's
    sequence slots, batch and context (its own context if shorter). Built here, beside build_engine,
    so that speculative.py does not import startup."""
    from .comm import solo
    from .speculative import DraftModel
    from .weights import open_model_file

    m = open_model_file(path)
    ctx = m.header.max_seq_len
    m.close()
    engine = build_engine(solo(), path, max_seq_len=min(target.max_seq_len, ctx), max_batch=target.max_batch,
                          n_slots=target.kv_plan.n_slots, quiet=True)
    return DraftModel(engine, path)


def build_engine(comm, model_path: str | None, *, max_seq_len: int | None = None,
                 buffer_type: str = "auto", sync: str = "ring", load: str = "scatter",
                 max_batch: int | None = None, progress=None, n_slots: int = 1,
                 kv_memory: int | None = None, pp: int = 1, split="even", quiet: bool = False,
                 as_nodes: int = 0):
    """Collective: the root opens the model (.m or GGUF) and decides the types the ranks run
    (weights.runtime_header), every rank gets that header, the plan and its slices: an Engine, or with
    `pp` pipeline stages or a `split` ('even', 'auto' or one weight per rank) pipeline.py's stage."""
    from .engine import DEFAULT_BATCH, Engine, check_options, kv_ring, kv_row_bytes, ring_row_bytes
    from .formats import model_header_bytes, read_model_header
    from .kvcache import plan_kv
    from .shard import fit_types, make_plan
    from .weights import load_weights, open_model_file, runtime_header

    if max_batch is None:
        max_batch = DEFAULT_BATCH
    model = None
    raw_header = b""
    if comm.is_root or load == "local":
        model = open_model_file(model_path)
    if comm.is_root:
        h, notes = runtime_header(model)
        raw_header = model_header_bytes(h)
        if not quiet:
            for line in notes:
                log(f"{model_path}: {line}")
    raw_header = comm.bcast_bytes(raw_header) if comm.size > 1 else raw_header
    h, header_size = read_model_header(model_path or "<root>", raw_header, len(raw_header))
    if buffer_type in (None, "auto"):
        buffer_type = "q80" if h.quantized else "f32"
    check_options(h, buffer_type)
    if max_seq_len is not None:
        if max_seq_len <= 0:
            raise ConfigError(f"--max-seq-len must be positive, got {max_seq_len}")
        if max_seq_len > h.max_seq_len:
            raise ConfigError(f"--max-seq-len {max_seq_len} is beyond the model's context ({h.max_seq_len})")
    seq = min(max_seq_len or h.max_seq_len, h.max_seq_len)
    if pp != 1 or split != "even":
        from .pipeline import build_stages, parse_split

        return build_stages(comm, h, header_size, model, pp=pp, split=parse_split(split, comm.size)
                            if isinstance(split, str) else split, seq=seq, buffer_type=buffer_type, sync=sync,
                            load=load, max_batch=max_batch, progress=progress, n_slots=n_slots,
                            kv_memory=kv_memory, quiet=quiet, as_nodes=as_nodes)
    h, plan, note = fit_types(h, lambda hh: make_plan(hh, comm.size, as_nodes=as_nodes))
    if note and comm.is_root and not quiet:
        log(note)
    kv = plan_kv(kv_row_bytes(h, plan), seq, n_slots, kv_memory, ring=kv_ring(h, max_batch, ring_row_bytes(h, plan)))
    weights = load_weights(comm, h, header_size, plan, model, load, progress)
    return Engine(comm, h, plan, weights, seq, max_batch, buffer_type, sync, kv)


def start(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len, sync_scheme,
          load, max_batch, quiet=False, n_slots: int = 1):
    """Collective start-up: returns (engine, tokenizer or None on workers). n_slots: sequences the
    KV cache keeps at once (--parallel)."""
    from .engine import kv_ring, kv_row_bytes, ring_row_bytes
    from .kvcache import parse_size, plan_kv

    from . import kernels
    from .pipeline import kv_row_bytes as layout_kv_row_bytes
    from .pipeline import ring_row_bytes as layout_ring_row_bytes
    from .pipeline import make_layout, parse_split
    from .shard import fit_types
    from .weights import open_model_file, runtime_header

    tokenizer = None
    bft = buffer_float_type
    pp = _options.get("pp") or 1
    as_nodes = _options.get("as_nodes") or 0
    try:   # the root checks it (and says why); the others use what it accepted
        split = parse_split(_options.get("split"), comm.size)
    except ConfigError:
        if comm.is_root:
            raise
        split = "even"
    # Every check runs on the root only, before the first collective: the root prints the one
    # line and aborts the job while the workers are still waiting for the model header.
    if comm.is_root:
        if nthreads is not None and nthreads < 1:
            raise ConfigError(f"--nthreads must be >= 1, got {nthreads}")
        if max_batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {max_batch}")
        model_path, tokenizer_path = resolve_model(model_path, tokenizer_path)
        model = open_model_file(model_path)
        h, _ = runtime_header(model)
        model_bytes = sum(os.path.getsize(p) for p in model.paths)   # every part of a split GGUF
        model.close()
        tokenizer = load_tokenizer(model_path, tokenizer_path)
        if tokenizer.vocab_size != h.vocab_size:
            raise ConfigError(f"{tokenizer_path or model_path}: tokenizer has {tokenizer.vocab_size} tokens but the "
                              f"model {model_path} has vocab_size {h.vocab_size}")
        spec = spec_config()
        if spec.method == "draft":
            from .speculative import check_draft_model

            check_draft_model(spec.draft_model, h.vocab_size, tokenizer.vocab)
        # an impossible node count or layout fails here, before any weight moves (auto: with even
        # weights; the measured ones can still be refused after the measurement)
        h, layout, _ = fit_types(h, lambda hh: make_layout(hh, comm.size, pp,
                                                           None if split in ("even", "auto") else split,
                                                           as_nodes=as_nodes))
        shards = layout.stages[0].plan
        if max_seq_len is not None and not 0 < max_seq_len <= h.max_seq_len:
            raise ConfigError(f"--max-seq-len must be in 1..{h.max_seq_len} (the model's context), got {max_seq_len}")
        if n_slots < 1:
            raise ConfigError(f"--parallel must be >= 1, got {n_slots}")
        if n_slots > max_batch:
            raise ConfigError(f"--parallel {n_slots} is more than --batch {max_batch}: every running sequence "
                              f"needs a row of each pass")
        if _options.get("kv_memory"):
            row = kv_row_bytes(h, shards) if layout.n_stages == 1 else layout_kv_row_bytes(h, layout)
            ring = ring_row_bytes(h, shards) if layout.n_stages == 1 else layout_ring_row_bytes(h, layout)
            plan_kv(row, min(max_seq_len or h.max_seq_len, h.max_seq_len), n_slots, parse_size(_options["kv_memory"]),
                    ring=kv_ring(h, max_batch, ring))
    kv_memory = _options.get("kv_memory")
    if kv_memory:
        try:   # the root checks it (and says why); the others use the value it accepted
            kv_memory = parse_size(kv_memory)
        except ConfigError:
            if comm.is_root:
                raise
            kv_memory = None
    if comm.is_root and not quiet and slurm_line():
        log(slurm_line())
    nthreads, why = choose_threads(comm, nthreads)
    kernels.set_threads(nthreads)
    choices = comm.gather_object((nthreads, why)) if comm.size > 1 else [(nthreads, why)]
    if comm.is_root and not quiet:
        log(threads_line(choices))
    if comm.size > 1:   # one choice for the whole job (blocking and non-blocking collectives do not match)
        poll, poll_why = wants_poll(_options.get("wait") or "auto", nthreads, comm.local_size())
        comm.set_poll(bool(comm.allgather_floats([1.0 if poll else 0.0])[:, 0].max()))
        whys = comm.gather_object((poll, poll_why))
        if comm.is_root and not quiet and comm.poll:
            asked = [(r, w) for r, (p, w) in enumerate(whys) if p]
            log("collective waits poll (leave the core while waiting): "
                + (f"every rank: {asked[0][1]}" if len(asked) == comm.size and len({w for _, w in asked}) == 1
                   else "; ".join(f"rank {r}: {w}" for r, w in asked)))
    if comm.size > 1:
        # MPICH's report of a lost rank names its pid and host only ("BAD TERMINATION ... PID 123
        # RUNNING AT host"): say which rank each pid is, so that report identifies the rank.
        pids = comm.rank_pids()
        if comm.is_root and not quiet:
            log("ranks: " + ", ".join(f"{r} = pid {pid} on {host}" for r, (pid, host) in enumerate(pids)))
    if load == "local" and comm.size > 1:   # every rank maps the file the root resolved (the default model too)
        model_path = os.fsdecode(comm.bcast_bytes(os.fsencode(model_path) if comm.is_root else None))
    progress, bar = None, None
    if comm.is_root and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=model_bytes, unit="B", unit_scale=True, desc="loading",
                   file=sys.stderr, disable=not sys.stderr.isatty())
        progress = lambda t: bar.update(t.nbytes)  # noqa: E731
    t0 = time.perf_counter()
    engine = build_engine(comm, model_path if (comm.is_root or load == "local") else None,
                          max_seq_len=max_seq_len, buffer_type=bft or "auto",
                          sync=sync_scheme if sync_scheme not in (None, "auto") else ("dllama" if comm.poll else "ring"),
                          load=load, max_batch=max_batch, progress=progress, n_slots=n_slots,
                          kv_memory=kv_memory, pp=pp, split=split, quiet=quiet or not comm.is_root,
                          as_nodes=as_nodes)
    if bar is not None:
        bar.close()
    engine.load_seconds = time.perf_counter() - t0
    engine.nthreads = nthreads
    if comm.is_root and not quiet:
        h = engine.h
        log(f"model {model_path}: {h.arch_name}, dim {h.dim}, {h.n_layers} layers, {h.n_heads} heads / "
            f"{h.n_kv_heads} kv heads, vocab {h.vocab_size}, weights {h.weights_name}, "
            f"buffers {engine.buffer_type}, sync {engine.sync.scheme}, {comm.size} node(s) x {nthreads} thread(s)"
            f"{f' computing as {as_nodes} nodes' if as_nodes else ''}"
            f"{f', {pp} pipeline stages' if pp > 1 else ''}, "
            f"loaded in {engine.load_seconds:.2f} s")
        log(engine.kv_plan.describe())
    if comm.is_root and spec_config().method == "draft":   # checked above; rank 0 runs it whole
        engine.draft = load_draft_model(spec_config().draft_model, engine)
        if not quiet:
            log(engine.draft.describe())
    return engine, tokenizer
