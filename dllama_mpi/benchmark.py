"""`dllama-mpi benchmark`: prompt and decode throughput, per-rank time split, traffic, memory.

SPMD like `inference` (run under `mpiexec -n N`). One JSON document on stdout, a human table on
stderr. How each number is measured (also in the JSON's "method"):

- prefill tok/s: prompt tokens / time from the request's admission to its first token (passes of
  --batch rows); decode tok/s: per generated token, wall time on the root between two tokens of one
  greedy request through the scheduler (what `inference --temperature 0` runs); median over every
  token of every repeat, with p10/p90 and min/max. With --temperature T every run's request samples
  instead (--topp, --seed; --sampled-rows whole sends each sampled top-p row to the root whole, as
  before the ranks' summaries); "summary" counts the sampled rows taken each way.
- --parallel P: P greedy streams submitted together (continuous batching); aggregate decode tok/s =
  rows of the passes in which every running sequence decodes / their wall time (llama-batched-bench's
  S_TG); end-to-end tok/s = all generated tokens / wall time; per-stream decode tok/s; time to first
  token (queue + prefill) p50 / p99.
- per-rank split of a decode token (one extra, instrumented run after the timed ones): token time
  (root: the loop's wall time; workers: their forward pass), time inside C kernel calls (every
  `lib.dl_*` call of the engine and the sync is timed with perf_counter by a proxy installed only
  for that run), MPI wait (time inside per-token collectives, `comm.wait_seconds`), and Python
  overhead = token time - C - MPI. The proxy's own cost per call is measured and subtracted from
  the Python share (`python_ms`; `python_ms_raw` keeps the uncorrected figure).
- bytes sent per token per rank: counted by `Comm` over the decode tokens (`bytes_sent`), next to
  the model `sync.bytes_per_sync() x syncs per token + argmax pair (16 B) + x broadcast`. Decoding
  is greedy through the engine's distributed argmax (what `inference --temperature 0` runs).
- with --spec: tokens per pass and acceptance per run; `summary.pass_cost_ms`, the scheduler's fit of
  a one-row decode pass and of each extra (verify) row from the job's passes (speculative.PassCost,
  what its draft lengths weigh; scripts/spec_bound.py takes the ratio).
- kernel ISA: the SIMD path each rank's kernels run (`per_rank[].kernel_isa`; summary: all of them,
  "/"-joined when ranks differ); DLLAMA_ISA=scalar|avx2|avx512|neon|neon-dotprod forces one.
- bandwidth ceiling: weight bytes read per token (q40 payload of every matrix slice, MoE experts
  scaled by active/total) / aggregate read bandwidth (every rank reading its own weight buffers
  at the same time with its thread pool, in the fastest of several read patterns: the median of
  3 passes right before and 3 right after the timed runs; or --bandwidth GB/s).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time

import click
import numpy as np

from .errors import ConfigError
from .startup import log, model_options, spec_config, spec_options, spmd, start

SCHEMA = "dllama-mpi-benchmark/1"



# ------------------------------------------------------------------------------------------------
# instrumentation

class _TimedLib:
    """Stands in for the cffi `lib` in engine / sync / weights for one run: times every dl_* call."""

    def __init__(self, lib):
        self._lib = lib
        self.seconds = 0.0
        self.calls = 0
        self.active = True        # the recorder turns counting on for decode forwards only
        self.by_name: dict[str, float] = {}

    def __getattr__(self, name):
        f = getattr(self._lib, name)
        if not name.startswith("dl_") or not callable(f):
            return f
        pc = time.perf_counter
        by = self.by_name
        by.setdefault(name, 0.0)

        def timed(*a):
            t = pc()
            r = f(*a)
            dt = pc() - t
            if self.active:
                self.seconds += dt
                self.calls += 1
                by[name] += dt
            return r

        setattr(self, name, timed)
        return timed


def _proxy_overhead_s(lib) -> float:
    """Seconds the proxy adds per call (a trivial C call through the proxy minus the same call
    made directly; best of 5 x 20000)."""
    p = _TimedLib(lib)
    f_direct, f_proxy = lib.dl_pool_nthreads, p.dl_pool_nthreads
    n = 20000
    best_d = best_p = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            f_direct()
        best_d = min(best_d, (time.perf_counter() - t) / n)
        t = time.perf_counter()
        for _ in range(n):
            f_proxy()
        best_p = min(best_p, (time.perf_counter() - t) / n)
    return max(best_p - best_d, 0.0)


class _Recorder:
    """Wraps engine._pass on one rank; accumulates its decode passes: those whose every row wants its
    logits (a sequence's next token, a speculative pass's drafted rows), not a prompt's chunks. The
    root divides by the tokens they emitted (a speculative pass emits several). With pipeline stages
    the root's wait for a decode pass's results (`collect`) counts as its waiting too."""

    def __init__(self, engine):
        self.engine = engine
        self.inner = engine._pass
        self.timed = None
        self.reset()
        self.last_decode = False
        engine._pass = self
        if getattr(engine, "depth", 1) > 1 and engine.world.is_root:
            inner_collect = engine.collect

            def collect():
                w0 = engine.comm.wait_seconds
                out = inner_collect()
                if self.last_decode:
                    self.wait += engine.comm.wait_seconds - w0
                return out
            engine.collect = collect

    def reset(self):
        self.n = 0
        self.seconds = self.wait = self.c_seconds = 0.0
        self.bytes = 0
        self.calls = 0

    def __call__(self, b, *rest):
        comm = self.engine.comm
        decode = self.last_decode = int(self.engine.st.ctrl.buf[2]) == b   # (the control packet: every rank)
        w0, by0 = comm.wait_seconds, comm.bytes_sent
        c0 = self.timed.seconds if self.timed else 0.0
        k0 = self.timed.calls if self.timed else 0
        if self.timed:
            self.timed.active = decode
        t0 = time.perf_counter()
        best = self.inner(b, *rest)
        dt = time.perf_counter() - t0
        if self.timed:
            self.timed.active = False
        if decode:
            self.n += 1
            self.seconds += dt
            self.wait += comm.wait_seconds - w0
            self.bytes += comm.bytes_sent - by0
            if self.timed:
                self.c_seconds += self.timed.seconds - c0
                self.calls += self.timed.calls - k0
        return best


_TIMED_MODULES = ("engine", "sync", "weights")   # the modules whose C calls a profile times


def _install_proxy(rec: _Recorder):
    import importlib

    from .kernels import lib

    p = _TimedLib(lib)
    p.active = False
    for name in _TIMED_MODULES:
        importlib.import_module(f"dllama_mpi.{name}").lib = p
    rec.timed = p
    return p


def _remove_proxy(rec: _Recorder):
    import importlib

    from .kernels import lib

    for name in _TIMED_MODULES:
        importlib.import_module(f"dllama_mpi.{name}").lib = lib
    rec.timed = None


# ------------------------------------------------------------------------------------------------
# helpers

def _read_prompts(path: str) -> list:
    """A prompt per line: plain text, {"prompt": text} or {"messages": [...]} (a chat, rendered later
    with the model's chat template, as `batch` does)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            s = line.rstrip("\n")
            if not s.strip():
                continue
            if s.lstrip().startswith("{"):
                try:
                    d = json.loads(s)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}: bad JSON line: {e}") from None
                if isinstance(d.get("messages"), list):
                    out.append(d["messages"])
                elif "prompt" in d:
                    out.append(str(d["prompt"]))
                else:
                    raise ConfigError(f"{path}: JSON line without a \"prompt\" or \"messages\" key")
            else:
                out.append(s)
    if not out:
        raise ConfigError(f"{path}: no prompts")
    return out


def _synthetic_lengths(spec: str) -> list[int]:
    try:
        lens = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--synthetic takes comma-separated prompt lengths, got {spec!r}") from None
    if not lens or min(lens) < 1:
        raise ConfigError(f"--synthetic lengths must be >= 1, got {spec!r}")
    return lens


def _weight_matrices(engine) -> list:
    """The matrices one rank reads per decode token (MoE: as many experts as are active)."""
    h = engine.h
    out = [engine.w.wcls] if engine.w.wcls is not None else []   # None: not the last stage
    for layer in engine.w.layers:
        for m in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w1, layer.w2, layer.w3):
            out += [] if m is None else getattr(m, "parts", [m])   # --as-nodes: wo / w2 as Pieces
        for e in layer.experts[:h.n_active_experts] if layer.experts else ():
            out += list(e)
    return out


def _weight_bytes(engine) -> int:
    """Weight bytes one rank reads per decode token (its matrix slices)."""
    return int(sum(m.nbytes for m in _weight_matrices(engine)))


# read patterns the probe tries: (streams per thread, software prefetch bytes ahead)
PROBE_PATTERNS = ((1, 0), (2, 0), (4, 0), (4, 512), (8, 0), (8, 512))


class _BandwidthProbe:
    """GB/s this rank reads its own weight buffers (every matrix a decode token reads, as one job
    over its thread pool) while every rank does the same, each pass timed from a barrier to the end
    of the slowest rank's. The weights themselves, not a scratch buffer: on the VMs measured here
    a buffer's read bandwidth depends on where its pages landed (one core: 14 to 26 GB/s over fresh
    buffers of 384-896 MB). `choose` keeps the fastest of several read patterns (which one wins
    differs between machines); `passes` reads with it, called right before and right after the
    timed decode runs, and the ceiling is the median of those passes: this host's bandwidth drifts
    by tens of percent within minutes, so it is measured in the decode's own window. Collective."""

    def __init__(self, comm, engine):
        from .kernels import ffi

        self.comm = comm
        bufs = [m.data for m in _weight_matrices(engine)]
        self.ptrs = ffi.new("void *[]", [ffi.cast("void *", b.ctypes.data) for b in bufs])
        self.sizes = ffi.new("size_t[]", [int(b.nbytes) for b in bufs])
        self.n = len(bufs)
        self.total = sum(int(b.nbytes) // 8 * 8 for b in bufs)
        self.pattern = PROBE_PATTERNS[0]
        self.samples: list[float] = []

    def _pass(self, streams: int, prefetch: int) -> float:
        from .kernels import lib

        self.comm.barrier()
        t = time.perf_counter()
        lib.dl_read_spans(self.ptrs, self.sizes, self.n, streams, prefetch)
        self.comm.barrier()   # until the slowest rank is done: no rank reads alone
        return self.total / (time.perf_counter() - t) / 1e9

    def choose(self) -> None:
        if not self.total:
            return
        self._pass(*self.pattern)
        best = 0.0
        for pat in PROBE_PATTERNS:
            g = statistics.median([self._pass(*pat) for _ in range(2)])
            if g > best:
                best, self.pattern = g, pat

    def passes(self, k: int = 3) -> None:
        if self.total:
            self.samples += [self._pass(*self.pattern) for _ in range(k)]

    def gbps(self) -> float:
        return statistics.median(self.samples) if self.samples else 0.0


def _cpu_info() -> dict:
    from . import kernels as K

    model, flags = platform.processor() or "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith(("flags", "Features")):
                    fl = set(line.split(":", 1)[1].split())
                    flags = sorted(fl & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                         "avx512_vnni", "avx_vnni", "asimd", "asimddp", "sve"})
                    if model:
                        break
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "flags": flags, "machine": platform.machine(),
            "kernel_isa": K.isa_name(), "supported_isas": [K.isa_name(i) for i in K.supported_isas()]}


def _versions() -> dict:
    import mpi4py

    from . import __version__ as ver
    from .comm import library_version
    return {"dllama_mpi": ver, "git_revision": _git_revision(), "python": platform.python_version(),
            "numpy": np.__version__, "mpi4py": mpi4py.__version__, "mpi_library": library_version()}


def _git_revision() -> str | None:
    """The commit of the checkout this package runs from ('+dirty' with local changes), or None
    (an installed copy, or no git)."""
    import subprocess

    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + ("+dirty" if dirty else "")


def _slurm() -> dict | None:
    """The Slurm job this run is a step of (None outside Slurm)."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return None
    keys = {"job_id": "SLURM_JOB_ID", "step_id": "SLURM_STEP_ID", "job_name": "SLURM_JOB_NAME",
            "cluster": "SLURM_CLUSTER_NAME", "partition": "SLURM_JOB_PARTITION",
            "nodelist": "SLURM_STEP_NODELIST", "job_nodelist": "SLURM_JOB_NODELIST",
            "ntasks": "SLURM_STEP_NUM_TASKS", "tasks_per_node": "SLURM_STEP_TASKS_PER_NODE",
            "cpus_per_task": "SLURM_CPUS_PER_TASK", "mpi_type": "SLURM_MPI_TYPE"}
    return {k: env[v] for k, v in keys.items() if v in env}


def _stats(xs: list[float]) -> dict:
    a = np.asarray(xs, np.float64)
    if a.size == 0:
        return {"median": 0.0, "min": 0.0, "max": 0.0, "p10": 0.0, "p90": 0.0, "n": 0}
    return {"median": round(float(np.median(a)), 3), "min": round(float(a.min()), 3),
            "max": round(float(a.max()), 3), "p10": round(float(np.percentile(a, 10)), 3),
            "p90": round(float(np.percentile(a, 90)), 3), "n": int(a.size)}


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2 ** 20


def _rss_now_mb() -> tuple[float, float]:
    """(anonymous, file-backed) resident MB now (Linux /proc/self/status; 0 elsewhere): after the
    runs, the weight copies, KV pages and Python against the model file's pages still mapped."""
    out = {"RssAnon:": 0.0, "RssFile:": 0.0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k = line.split(":")[0] + ":"
                if k in out:
                    out[k] = float(line.split()[1]) / 1024
    except OSError:
        pass
    return out["RssAnon:"], out["RssFile:"]


def _phase_counters(engine) -> np.ndarray:
    """This rank's running totals: compute seconds (passes outside collectives), wait seconds,
    process CPU seconds (every thread), passes."""
    s = engine.stats
    return np.array([s.seconds - s.sync_seconds, engine.comm.wait_seconds, time.process_time(), s.forward_calls],
                    np.float64)


def _decode_bytes_model(engine) -> int:
    """Bytes this rank should send per greedy decode token: its residual syncs (2 per layer it
    holds), the root's broadcast of the embedding row to its group, a worker's (value, id) pair of
    the distributed argmax (16 bytes, not its logits slice); with pipeline stages a stage root's
    [control | row] message to the next stage, or the last one's id to rank 0."""
    h, comm = engine.h, engine.comm
    b = engine.sync.bytes_per_sync(1) * 2 * len(engine.w.layers)
    if comm.is_root and comm.size > 1:
        b += 4 * h.dim * (comm.size - 1)
    last = getattr(engine, "last", True)
    if last and not comm.is_root:
        b += 16
    if getattr(engine, "depth", 1) > 1 and comm.is_root:
        b += 8 if last else engine.ctrl_bytes + engine.row_bytes
    return b


def _per_stage(per_rank: list[dict]) -> list[dict]:
    """Per pipeline stage: its ranks, layers, slowest rank's decode time split, bytes sent."""
    out = []
    for s in sorted({r["stage"] for r in per_rank}):
        rs = [r for r in per_rank if r["stage"] == s]
        out.append({"stage": s, "ranks": [r["rank"] for r in rs], "layers": rs[0]["layers"],
                    "ms_per_token_max": max(r["ms_per_token_instrumented"] for r in rs),
                    "c_ms_max": max(r["c_ms"] for r in rs), "mpi_wait_ms_max": max(r["mpi_wait_ms"] for r in rs),
                    "bytes_sent_per_token": sum(r["bytes_sent_per_token"] for r in rs)})
    return out


def message_rounds(engine) -> int:
    """Message rounds on the critical path of one greedy decode token: per stage (or the one group)
    the control broadcast, the embedding-row broadcast, 2 residual syncs per layer (ring: reduce-
    scatter + all-gather = 2 rounds; dllama: 1) and, in the last stage, the argmax gather; with S > 1
    stages S point-to-point hops ([control | row] to each next stage, the ids back to rank 0)."""
    layout = getattr(engine, "layout", None)
    groups = [(engine.comm.size, engine.h.n_layers, True)] if layout is None or layout.n_stages == 1 else \
        [(len(s.ranks), s.n_layers, s.index == layout.n_stages - 1) for s in layout.stages]
    per_sync = 1 if engine.sync_scheme == "dllama" else 2
    rounds = 0
    for size, layers, last in groups:
        if size > 1:
            rounds += 2 + 2 * layers * per_sync + (1 if last else 0)
    return rounds + (len(groups) if len(groups) > 1 else 0)


def _one_way_us(comm, n: int = 40) -> float:
    """Median one-way time of a 64-byte message between ranks 0 and 1 (half a ping-pong), 0 alone."""
    if comm.size < 2:
        return 0.0
    buf = np.zeros(64, np.uint8)
    times = []
    if comm.rank < 2:
        for _ in range(n):
            t = time.perf_counter()
            if comm.rank == 0:
                comm.wait(comm.isend(buf, 1, 99))
                comm.wait(comm.irecv(buf, 1, 99))
            else:
                comm.wait(comm.irecv(buf, 0, 99))
                comm.wait(comm.isend(buf, 0, 99))
            times.append(time.perf_counter() - t)
    return 1e6 * float(np.median(times)) / 2 if times else 0.0


def _split_text() -> str:
    from .startup import _options

    sp = _options.get("split") or "even"
    return sp


# ------------------------------------------------------------------------------------------------
# the root's runs

@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the runs sample (--temperature, --topp, --seed, --sampled-rows): greedy by default."""

    temperature: float = 0.0
    topp: float = 0.9
    seed: int = 1
    sampled_rows: str = "summaries"


def _request(sched, ids: list[int], steps: int, sampling: Sampling):
    """A run's request: greedy by default, else seeded sampling; with --sampled-rows whole its
    top-p rows come back whole (what every sampled row did before the summaries)."""
    from .sampler import Sampler
    from .scheduler import Request, WholeRowRequest

    cls = WholeRowRequest if sampling.sampled_rows == "whole" else Request
    sampler = Sampler(sched.engine.h.vocab_size, sampling.temperature, sampling.topp, sampling.seed)
    return cls(ids, steps + 1, sampler, ignore_eos=True)


def _one_run(sched, ids: list[int], steps: int, sampling: Sampling):
    """One request (greedy: what `inference --temperature 0` runs): prefill ids, then `steps` tokens;
    (prefill seconds = time to the first token, per-token seconds after it, its RunStats). With
    speculation a pass gives several tokens at one instant: each gets an equal share of the pass."""
    from .scheduler import run_to_completion

    req = _request(sched, ids, steps, sampling)
    sched.drop_cached()   # every run evaluates its whole prompt
    run_to_completion(sched, [req])
    per, k = [], 0
    for ms in req.stats.token_ms + [1.0]:   # a pass = a token after a gap and those at the same instant
        if ms > 0 and per:
            per[k:] = [per[k] / (len(per) - k)] * (len(per) - k)
            k = len(per)
        per.append(ms / 1000)
    return req.stats.prompt_seconds, per[:-1], req.stats


def _parallel_run(sched, prompts: list[list[int]], steps: int, sampling: Sampling) -> dict:
    """len(prompts) streams (greedy unless --temperature) submitted together, `steps` tokens each after the first. Decode
    throughput counts only the passes in which every running sequence decodes (no prompt rows): the
    aggregate generation speed llama-batched-bench reports as S_TG."""
    from .scheduler import DECODE

    reqs = [_request(sched, p, steps, sampling) for p in prompts]
    sched.drop_cached()
    d0, a0 = sched.draft_tokens, sched.accepted_tokens
    pc = time.perf_counter
    t0 = pc()
    for r in reqs:
        sched.submit(r)
    dec_tokens, dec_seconds, peak_pages = 0, 0.0, 0
    while any(not r.done for r in reqs):
        peak_pages = max(peak_pages, sched.kv.pages_in_use)
        decode_only = not sched.waiting and all(r.state == DECODE for r in sched.running)
        g0 = sched.tokens_generated    # a pipelined step collects one pass: a share of the streams
        t = pc()
        sched.step()
        if decode_only:
            dec_seconds += pc() - t
            dec_tokens += sched.tokens_generated - g0
    wall = pc() - t0
    gen = sum(r.stats.generated_tokens for r in reqs)
    return {"streams": len(reqs), "steps": steps, "prompt_tokens": len(prompts[0]),
            "aggregate_decode_tok_s": round(dec_tokens / dec_seconds, 3) if dec_seconds else None,
            "aggregate_tok_s": round(gen / wall, 3),
            "per_stream_decode_tok_s": _stats([r.stats.generate_tps for r in reqs]),
            "ttft_s": {"p50": round(float(np.percentile([r.stats.ttft_seconds for r in reqs], 50)), 4),
                       "p99": round(float(np.percentile([r.stats.ttft_seconds for r in reqs], 99)), 4)},
            "wall_seconds": round(wall, 3),
            "tokens_per_pass": round(sum(r.stats.generated_tokens - 1 for r in reqs) /
                                     max(sum(r.stats.decode_passes for r in reqs), 1), 4),
            "acceptance": round((sched.accepted_tokens - a0) / max(sched.draft_tokens - d0, 1), 4),
            # the most KV pages held at once, and their bytes on each rank (the full-attention layers)
            "kv_pages_peak": peak_pages,
            "kv_bytes_peak_per_rank": [peak_pages * sched.kv.ps * b for b in _kv_bytes_per_token(sched.engine)]}


def _spec_doc(spec) -> dict:
    doc = {"method": spec.method, "draft_max": spec.draft_max, "draft_min": spec.draft_min, "draft_fixed": spec.fixed}
    if spec.method == "draft":
        doc.update(draft_model=spec.draft_model, draft_p_min=spec.p_min)
    return doc


def _kv_bytes_per_token(engine) -> list[int]:
    from .metrics import engine_kv_bytes_per_token

    return engine_kv_bytes_per_token(engine)


def _pass_cost(sched) -> dict | None:
    if sched is None or sched.pass_cost.w == 0:
        return None
    a, b = sched.pass_cost.model()
    return {"one_row": round(1000 * a, 3), "extra_row": round(1000 * b, 3), "extra_row_ratio": round(b / a, 3)}


def _parallel_list(spec: str | None) -> list[int]:
    if not spec:
        return []
    try:
        ps = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--parallel takes comma-separated stream counts, got {spec!r}") from None
    if not ps or min(ps) < 1:
        raise ConfigError(f"--parallel stream counts must be >= 1, got {spec!r}")
    return ps


# ------------------------------------------------------------------------------------------------

def register(group) -> None:
    """Add `benchmark` to the CLI group."""

    @click.command("benchmark")
    @model_options
    @spec_options
    @click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False), default=None,
                  help="JSONL ({\"prompt\": ...} or {\"messages\": [...]}, rendered with the model's chat "
                       "template, per line) or plain text, one prompt per line.")
    @click.option("--chat-template", default=None, help="Override the tokenizer's chat template (for 'messages').")
    @click.option("--synthetic", default=None, help="Prompt lengths in tokens, comma-separated (default 128).")
    @click.option("--steps", type=int, default=64, show_default=True, help="Decode steps per run.")
    @click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs first.")
    @click.option("--repeat", type=int, default=3, show_default=True, help="Timed runs per prompt.")
    @click.option("--bandwidth", type=float, default=None, help="Aggregate read bandwidth in GB/s (default: measure).")
    @click.option("--profile", is_flag=True, help="Also report C time per kernel function (ms per decode token).")
    @click.option("--parallel", "parallel_spec", default=None,
                  help="Also sweep concurrent streams, e.g. 1,2,4,8,16: aggregate decode tok/s, per-stream tok/s "
                       "and time to first token at each count (greedy, one synthetic or file prompt per stream).")
    @click.option("--temperature", type=float, default=0.0, show_default=True,
                  help="Sample at this temperature (0: greedy, the speed usually quoted).")
    @click.option("--topp", type=float, default=0.9, show_default=True, help="Top-p when sampling.")
    @click.option("--seed", type=int, default=1, show_default=True, help="Every run's sampler seed.")
    @click.option("--sampled-rows", type=click.Choice(["summaries", "whole"]), default="summaries", show_default=True,
                  help="How sampled top-p rows reach rank 0: the ranks' summaries, or whole (to measure what the "
                       "summaries save; such rows count as full rows, not in the JSON's sampled_rows_*).")
    @click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
                  help="Draw charts from the JSON files given as arguments into this PNG (no model run).")
    @click.argument("json_files", nargs=-1, type=click.Path(exists=True, dir_okay=False))
    @spmd
    def benchmark(comm, *args, **kwargs):
        """Measure prompt and decode speed (JSON on stdout, a table on stderr)."""
        run_benchmark(comm, *args, **kwargs)

    group.add_command(benchmark)


def run_benchmark(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len, sync_scheme, load,
                  max_batch, prompts_path, synthetic, steps, warmup, repeat, bandwidth, profile, parallel_spec,
                  plot_path, json_files, chat_template=None, temperature=0.0, topp=0.9, seed=1,
                  sampled_rows="summaries"):
    """Measure prompt and decode speed (JSON on stdout, a table on stderr)."""
    if plot_path:
        if comm.is_root:
            plot(json_files, plot_path)
        return
    if json_files:
        raise ConfigError("JSON file arguments are only read with --plot")
    # the root checks (one line, then it aborts the job); the workers wait at the first collective
    if comm.is_root and (steps < 1 or repeat < 1 or warmup < 0):
        raise ConfigError("--steps and --repeat must be >= 1, --warmup >= 0")
    if comm.is_root and prompts_path and synthetic:
        raise ConfigError("give --prompts or --synthetic, not both")
    if comm.is_root and (temperature < 0 or not 0 <= topp <= 1):
        raise ConfigError(f"--temperature must be >= 0 and --topp in [0, 1], got {temperature} and {topp}")
    sampling = Sampling(temperature, topp, seed, sampled_rows)
    lens = _synthetic_lengths(synthetic or "128") if not prompts_path else None
    parallel = _parallel_list(parallel_spec)
    spec = spec_config()
    if prompts_path and comm.is_root and not os.path.isfile(prompts_path):
        raise ConfigError(f"{prompts_path}: prompts file not found")

    # context: what the runs need (synthetic) or 4096, capped by the model (decided on the root)
    if max_seq_len is None:
        need = np.zeros(1, np.int64)
        if comm.is_root and model_path:
            from .weights import open_model_file

            m = open_model_file(model_path)
            want = (max(lens) + steps + 1) if lens else 4096
            need[0] = min(m.header.max_seq_len, want)
            m.close()
        if comm.size > 1:
            comm.bcast_array(need)
        max_seq_len = int(need[0]) or None


    engine, tokenizer = start(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len,
                              sync_scheme, load, max_batch, quiet=not comm.is_root, n_slots=max(parallel or [1]))
    rec = _Recorder(engine)
    h = engine.h
    sched = None
    if comm.is_root:
        from .scheduler import Scheduler

        sched = Scheduler(engine, tokenizer, spec=spec)

    # ---- phase 0: prompts and warm-up (workers follow; every phase ends with stop_workers) ----
    prompt_sets = []
    if comm.is_root:
        try:
            if prompts_path:
                template = None
                for p in _read_prompts(prompts_path):
                    if isinstance(p, list):   # a chat: the model's own template
                        from .chat import render_prompt, template_for

                        template = template or template_for(tokenizer, chat_template)
                        text = render_prompt(template, p, prompts_path)
                        prompt_sets.append(("prompt", text, tokenizer.encode(text, add_bos=False)))
                    else:
                        prompt_sets.append(("prompt", p, tokenizer.encode(p)))
            else:
                r = np.random.default_rng(0)
                for n in lens:
                    ids = r.integers(0, min(h.vocab_size, tokenizer.vocab_size), n).tolist()
                    prompt_sets.append(("synthetic", n, ids))
            for kind, what, ids in prompt_sets:
                if len(ids) + steps > engine.max_seq_len:
                    raise ConfigError(f"prompt of {len(ids)} tokens + {steps} steps exceeds the context "
                                      f"({engine.max_seq_len}); raise --max-seq-len")
            for _ in range(warmup):
                _one_run(sched, prompt_sets[0][2], min(steps, 8), sampling)
        finally:
            engine.stop_workers()
    else:
        engine.serve()
    comm.barrier()
    probe = _BandwidthProbe(comm, engine) if bandwidth is None else None
    if probe:
        probe.choose()
        probe.passes()
    rec.reset()
    comm.bytes_sent = 0

    # ---- phase 1: timed runs (no instrumentation) ----
    runs = []
    timed_tokens = 0   # the root's: tokens its decode passes emitted (every rank took part in them)
    if comm.is_root:
        try:
            for kind, what, ids in prompt_sets:
                pre, per, tpp, acc = [], [], [], []
                for _ in range(repeat):
                    p_s, d_s, st = _one_run(sched, ids, steps, sampling)
                    pre.append(len(ids) / p_s)
                    per.extend(d_s)
                    timed_tokens += len(d_s)
                    tpp.append(st.tokens_per_pass)
                    acc.append(st.acceptance)
                tps = [1.0 / s for s in per]
                runs.append({
                    "prompt": what if kind == "prompt" else None, "prompt_tokens": len(ids), "steps": steps,
                    "repeat": repeat,
                    "prefill_tok_s": _stats(pre),
                    "decode_tok_s": _stats(tps),
                    "decode_tok_s_mean": round(len(per) / sum(per), 3),
                    "decode_ms_per_token": _stats([1000 * s for s in per]),
                    "tokens_per_pass": round(statistics.mean(tpp), 4),
                    "acceptance": round(statistics.mean(acc), 4),
                })
        finally:
            engine.stop_workers()
    else:
        engine.serve()
    base = np.array([rec.n, rec.seconds, rec.wait, rec.bytes], np.float64)
    if probe:
        probe.passes()
    base_all = comm.gather_floats(base)

    # ---- phase 1b: concurrent streams (--parallel), one phase per count: each rank's compute, wait
    # and CPU time over it (CPU / wall near 1 on every rank of a host = its cores are saturated) ----
    sweep = []
    r = np.random.default_rng(1)
    for p in parallel:
        before = _phase_counters(engine)
        if comm.is_root:
            try:
                n_tok = len(prompt_sets[0][2])
                if prompts_path:   # the file's prompts, one per stream, cycled
                    prompts = [prompt_sets[i % len(prompt_sets)][2] for i in range(p)]
                else:              # distinct random prompts: no shared prefix to reuse
                    prompts = [r.integers(0, min(h.vocab_size, tokenizer.vocab_size), n_tok).tolist()
                               for _ in range(p)]
                sweep.append(_parallel_run(sched, prompts, steps, sampling))
            finally:
                engine.stop_workers()
        else:
            engine.serve()
        spent = comm.gather_floats(_phase_counters(engine) - before)
        if comm.is_root:
            wall = sweep[-1]["wall_seconds"]
            sweep[-1]["per_rank"] = [{"rank": k, "compute_s": round(float(x[0]), 3), "wait_s": round(float(x[1]), 3),
                                      "cpu_s": round(float(x[2]), 3), "cpu_per_wall": round(float(x[2]) / wall, 2),
                                      "passes": int(x[3])} for k, x in enumerate(spent)]

    # ---- phase 2: one instrumented run (C time per rank) ----
    from .kernels import lib

    overhead = _proxy_overhead_s(lib)
    comm.barrier()
    rec.reset()
    proxy = _install_proxy(rec)
    root_wall, inst_tokens = 0.0, 0
    try:
        if comm.is_root:
            try:
                _, per, _ = _one_run(sched, prompt_sets[0][2], steps, sampling)
                root_wall, inst_tokens = sum(per), len(per)
            finally:
                engine.stop_workers()
        else:
            engine.serve()
    finally:
        _remove_proxy(rec)
    names = sorted(proxy.by_name)
    tok_s = root_wall if comm.is_root else rec.seconds
    inst = np.array([tok_s, rec.wait, rec.c_seconds, rec.calls, overhead], np.float64)
    inst_all = comm.gather_floats(inst)
    prof = comm.gather_floats(np.array([proxy.by_name.get(n, 0.0) for n in names], np.float64)) if profile else None

    # ---- memory, bandwidth, weights ----
    rss = comm.gather_floats(np.array([_peak_rss_mb(), *_rss_now_mb()], np.float64))
    from . import kernels as K
    isa_all = comm.gather_floats(np.array([K.get_isa()], np.float64))   # ranks may differ (mixed CPUs)
    wbytes = comm.gather_floats(np.array([_weight_bytes(engine)], np.float64))
    held = comm.gather_floats(np.array([engine.w.nbytes(), engine.w.share], np.float64))
    bw_rank = [probe.gbps(), min(probe.samples, default=0.0), max(probe.samples, default=0.0),
               *probe.pattern] if probe else [0.0] * 5
    bw_all = comm.gather_floats(np.array(bw_rank, np.float64))
    model_bytes_all = comm.gather_floats(np.array([_decode_bytes_model(engine)], np.float64))
    stage_of = [0] * comm.size
    layers_of = [(0, h.n_layers)] * comm.size
    if getattr(engine, "layout", None) is not None:
        for st in engine.layout.stages:
            for k in st.ranks:
                stage_of[k], layers_of[k] = st.index, st.layers
    scatter = comm.gather_floats(np.array([comm.scatter_seconds, comm.scatter_bytes], np.float64))
    hosts = comm.gather_object(platform.node())
    one_way_us = _one_way_us(comm)

    if not comm.is_root:
        return

    agg_bw = float(bandwidth) if bandwidth is not None else float(bw_all[:, 0].sum())
    weights_total = float(wbytes[:, 0].sum())
    weights_max_rank = float(wbytes[:, 0].max())
    per_rank = []
    for r in range(comm.size):
        passes_b, s_b, wait_b, by_b = base_all[r]
        tok_i, wait_i, c_i, calls_i, ovh = inst_all[r]
        n_b, n_i = max(timed_tokens, 1), max(inst_tokens, 1)   # per token, on every rank
        tok_ms = 1000 * tok_i / n_i
        c_ms, mpi_ms = 1000 * c_i / n_i, 1000 * wait_i / n_i
        py_raw = tok_ms - c_ms - mpi_ms
        py = max(py_raw - 1000 * ovh * calls_i / n_i, 0.0)
        row = {
            "rank": r, "host": hosts[r], "stage": stage_of[r], "layers": f"{layers_of[r][0]}-{layers_of[r][1] - 1}",
            "kernel_isa": K.isa_name(int(isa_all[r, 0])), "decode_tokens": timed_tokens, "decode_passes": int(passes_b),
            "ms_per_token_instrumented": round(tok_ms, 3),
            "c_ms": round(c_ms, 3), "mpi_wait_ms": round(mpi_ms, 3),
            "python_ms": round(py, 3), "python_ms_raw": round(py_raw, 3),
            "python_pct": round(100 * py / max(tok_ms - 1000 * ovh * calls_i / n_i, 1e-9), 2),
            "c_calls_per_token": round(calls_i / n_i, 1),
            "mpi_wait_ms_uninstrumented": round(1000 * wait_b / n_b, 3),
            "bytes_sent_per_token": int(round(by_b / n_b)),
            "bytes_sent_per_token_model": int(model_bytes_all[r, 0]),
            "peak_rss_mb": round(float(rss[r, 0]), 1),
            "rss_anon_mb": round(float(rss[r, 1]), 1), "rss_file_mb": round(float(rss[r, 2]), 1),
            "weight_bytes_per_token": int(wbytes[r, 0]),
            # the weights this rank holds (slices as repacked, the root's embedding as mapped) and
            # its share of the model's tensor bytes in their stored types (their ratio: what
            # repacking adds, padding each matrix slice to whole 16-row groups)
            "weights_held_mb": round(float(held[r, 0]) / 2**20, 1),
            "weights_share_mb": round(float(held[r, 1]) / 2**20, 1),
            "bandwidth_gbps": round(float(bw_all[r, 0]), 2) if bandwidth is None else None,
            # the probe's passes around the timed runs (min, max) and its read pattern
            "bandwidth_range_gbps": [round(float(bw_all[r, 1]), 2), round(float(bw_all[r, 2]), 2)]
            if bandwidth is None else None,
            "bandwidth_pattern": {"streams": int(bw_all[r, 3]), "prefetch": int(bw_all[r, 4])}
            if bandwidth is None else None,
        }
        if prof is not None:
            row["c_ms_by_function"] = {nm: round(1000 * float(prof[r, i]) / n_i, 3) for i, nm in enumerate(names)
                                       if prof[r, i] > 0}
        per_rank.append(row)

    # ceiling: the slowest rank's share of the weights over its share of the bandwidth
    share_bw = agg_bw / comm.size
    ceiling = share_bw * 1e9 / weights_max_rank if weights_max_rank else 0.0
    # a speculative run's tokens come in bursts (a pass emits several, its time charged to the first):
    # its speed is tokens over time, not the median of per-token rates
    dec = statistics.median([r["decode_tok_s_mean"] if spec.on else r["decode_tok_s"]["median"] for r in runs])
    pre = statistics.median([r["prefill_tok_s"]["median"] for r in runs])
    tpp = statistics.mean([r.get("tokens_per_pass") or 1.0 for r in runs])
    rounds = message_rounds(engine)
    doc = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"path": os.path.abspath(model_path) if model_path else None, "arch": h.arch_name,
                  "dim": h.dim, "hidden_dim": h.hidden_dim, "n_layers": h.n_layers, "n_heads": h.n_heads,
                  "n_kv_heads": h.n_kv_heads, "vocab_size": h.vocab_size, "n_experts": h.n_experts,
                  "weights": h.weights_name,
                  "weight_bytes_per_token": int(weights_total)},
        "config": {"nodes": comm.size, "pp": max(stage_of) + 1, "split": _split_text(),
                   "nthreads": engine.nthreads, "buffer_float_type": engine.buffer_type,
                   "sync": engine.sync.scheme, "as_nodes": engine.plan.as_nodes, "batch": engine.max_batch, "load": load,
                   "max_seq_len": engine.max_seq_len, "steps": steps, "warmup": warmup, "repeat": repeat,
                   "spec": _spec_doc(spec), "sampling": dataclasses.asdict(sampling),
                   "repack": bool(getattr(engine.w.layers[0].wq, "repacked", False))},
        "system": {"versions": _versions(), "cpu": _cpu_info(), "hostname": platform.node(),
                   "hosts": sorted(set(hosts)), "slurm": _slurm(),
                   "bandwidth_gbps": round(agg_bw, 2), "bandwidth_source": "option" if bandwidth else "measured"},
        "load_seconds": round(getattr(engine, "load_seconds", 0.0), 3),
        # weight slices through Scatterv (0 with --load local or one rank): bytes every rank
        # received / the longest time a rank spent in Scatterv (root packing included)
        "scatter": {"bytes": int(scatter[:, 1].sum()), "seconds_max": round(float(scatter[:, 0].max()), 3),
                    "gbps": round(float(scatter[:, 1].sum() / scatter[:, 0].max() / 1e9), 2)
                    if scatter[:, 0].max() > 0 else None},
        "runs": runs,
        "parallel": sweep,
        "per_rank": per_rank,
        "stages": _per_stage(per_rank),
        "summary": {"decode_tok_s": dec, "prefill_tok_s": pre,
                    "decode_ms_per_token": round(1000 / dec, 3) if dec else None,
                    "ceiling_tok_s": round(ceiling, 2),
                    "pct_of_bandwidth_ceiling": round(100 * dec / ceiling, 1) if ceiling else None,
                    "kernel_isa": "/".join(sorted({r["kernel_isa"] for r in per_rank})),
                    "python_pct_max": max(r["python_pct"] for r in per_rank),
                    # latency: message rounds on a decode pass's critical path x one link's one-way time;
                    # a speculative pass emits tokens_per_pass tokens for the rounds of one
                    "message_rounds_per_pass": rounds,
                    "tokens_per_pass": round(tpp, 3),
                    "message_rounds_per_token": round(rounds / tpp, 2),
                    "one_way_us": round(one_way_us, 1),
                    # speculation's cost model as the scheduler fitted it from this job's verify passes
                    # (speculative.PassCost): a one-row pass and each extra row, ms (scripts/spec_bound.py)
                    "pass_cost_ms": _pass_cost(sched) if spec.on else None,
                    # sampled top-p rows of every run (warm-up included): from summaries / whole
                    "sampled_rows_summarised": engine.sampled_rows_summarised,
                    "sampled_rows_whole": engine.sampled_rows_whole},
        "method": __doc__.split("\n\n", 1)[1].strip(),
    }
    print(json.dumps(doc, indent=1))
    sys.stdout.flush()
    _table(doc)


def _table(doc: dict) -> None:
    c, s = doc["config"], doc["summary"]
    m = doc["model"]
    log(f"\n{m['arch']} dim {m['dim']} x {m['n_layers']} layers, {m['weights']}, "
        f"{m['weight_bytes_per_token'] / 1e6:.0f} MB/token | {c['nodes']} rank(s) x {c['nthreads']} thread(s), "
        f"sync {c['sync']}, batch {c['batch']}, isa {doc['system']['cpu']['kernel_isa']}, "
        f"repack {c['repack']}, load {doc['load_seconds']:.2f} s"
        + (f" (Scatterv {doc['scatter']['bytes'] / 1e6:.0f} MB at {doc['scatter']['gbps']:.1f} GB/s)"
           if doc["scatter"]["gbps"] else ""))
    spec = c.get("spec", {}).get("method", "none") != "none"
    log(f"{'prompt':>8} {'prefill tok/s':>22} {'decode tok/s (p10-p90)':>28} {'ms/token':>9}"
        + (f" {'tok/pass':>8} {'accepted':>8} {'tokens/s':>8}" if spec else ""))
    for r in doc["runs"]:
        p, d = r["prefill_tok_s"], r["decode_tok_s"]
        log(f"{r['prompt_tokens']:>8} {p['median']:>10.1f} ({p['min']:.1f}-{p['max']:.1f}) "
            f"{d['median']:>14.2f} ({d['p10']:.2f}-{d['p90']:.2f}) {r['decode_ms_per_token']['median']:>9.2f}"
            + (f" {r['tokens_per_pass']:>8.2f} {100 * r['acceptance']:>7.0f}% {r['decode_tok_s_mean']:>8.1f}"
               if spec else ""))
    log(f"{'rank':>4} {'stage':>5} {'layers':>7} {'ms/tok':>7} {'C':>7} {'MPI':>7} {'Python':>7} {'Py %':>5} "
        f"{'kB sent/tok':>11} {'RSS MB':>8} {'GB/s':>6} {'weights MiB (share)':>20}")
    for r in doc["per_rank"]:
        bw = r["bandwidth_gbps"]
        log(f"{r['rank']:>4} {r['stage']:>5} {r['layers']:>7} {r['ms_per_token_instrumented']:>7.2f} {r['c_ms']:>7.2f} {r['mpi_wait_ms']:>7.2f} "
            f"{r['python_ms']:>7.2f} {r['python_pct']:>5.1f} {r['bytes_sent_per_token'] / 1e3:>11.1f} "
            f"{r['peak_rss_mb']:>8.0f} {bw if bw is not None else '-':>6} "
            f"{r['weights_held_mb']:>11.1f} ({r['weights_share_mb']:.1f})")
        if "c_ms_by_function" in r:
            for nm, v in sorted(r["c_ms_by_function"].items(), key=lambda kv: -kv[1]):
                log(f"{'':>6}{nm:<28} {v:8.3f} ms/token")
    if doc.get("parallel"):
        log(f"{'streams':>8} {'aggregate decode tok/s':>23} {'end-to-end tok/s':>17} {'per stream (median)':>20} "
            f"{'TTFT p50 / p99 s':>18}")
        for p in doc["parallel"]:
            agg = p["aggregate_decode_tok_s"]
            log(f"{p['streams']:>8} {agg if agg is not None else '-':>23} {p['aggregate_tok_s']:>17.2f} "
                f"{p['per_stream_decode_tok_s']['median']:>20.2f} {p['ttft_s']['p50']:>8.3f} / {p['ttft_s']['p99']:.3f}"
                + (f"   {p['tokens_per_pass']:.2f} tok/pass" if spec else "") +
                "   CPU/wall per rank " + " ".join(f"{x['cpu_per_wall']:.2f}" for x in p.get("per_rank", [])))
    log(f"decode {s['decode_tok_s']:.2f} tok/s ({s['kernel_isa']} kernels) = {s['pct_of_bandwidth_ceiling']}% of the bandwidth ceiling "
        f"{s['ceiling_tok_s']:.1f} tok/s ({doc['system']['bandwidth_gbps']} GB/s "
        f"{doc['system']['bandwidth_source']}); prefill {s['prefill_tok_s']:.1f} tok/s")


# ------------------------------------------------------------------------------------------------
# charts

def plot(files, out_path: str) -> None:
    """Bar charts from benchmark JSON files: decode and prefill tok/s per configuration, and the
    per-rank ms/token split (C / MPI / Python)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib (pip install matplotlib)") from None
    if not files:
        raise ConfigError("--plot needs one or more benchmark JSON files as arguments")
    docs = []
    for f in files:
        with open(f) as fh:
            d = json.load(fh)
        if d.get("schema") != SCHEMA:
            raise ConfigError(f"{f}: not a dllama-mpi benchmark JSON")
        docs.append(d)
    labels = [f"{d['config']['nodes']}x{d['config']['nthreads']}\n{os.path.basename(d['model']['path'] or '')[:18]}"
              for d in docs]
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.8))
    x = np.arange(len(docs))
    dec = [d["summary"]["decode_tok_s"] for d in docs]
    ceil = [d["summary"]["ceiling_tok_s"] for d in docs]
    ax[0].bar(x, dec, color="tab:blue", label="decode")
    ax[0].plot(x, ceil, "k_", markersize=30, label="bandwidth ceiling")
    ax[0].set_title("decode tok/s")
    ax[0].legend()
    ax[1].bar(x, [d["summary"]["prefill_tok_s"] for d in docs], color="tab:green")
    ax[1].set_title("prefill tok/s")
    for a in ax[:2]:
        a.set_xticks(x, labels, fontsize=8)
    # per-rank split
    bars, names = [], []
    for i, d in enumerate(docs):
        for r in d["per_rank"]:
            bars.append((r["c_ms"], r["mpi_wait_ms"], r["python_ms"]))
            names.append(f"{labels[i].splitlines()[0]} r{r['rank']}")
    b = np.array(bars) if bars else np.zeros((0, 3))
    xs = np.arange(len(names))
    bottom = np.zeros(len(names))
    for k, (lab, col) in enumerate((("C kernels", "tab:blue"), ("MPI wait", "tab:orange"), ("Python", "tab:red"))):
        ax[2].bar(xs, b[:, k], bottom=bottom, color=col, label=lab)
        bottom += b[:, k]
    ax[2].set_xticks(xs, names, rotation=60, fontsize=7)
    ax[2].set_title("ms per decode token, per rank")
    ax[2].legend()
    # scaling (a sweep's files): decode tok/s against ranks, one line per threads per rank
    lines: dict[int, list] = {}
    for d in docs:
        lines.setdefault(d["config"]["nthreads"], []).append((d["config"]["nodes"], d["summary"]["decode_tok_s"]))
    for t, pts in sorted(lines.items()):
        pts.sort()
        ax[3].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{t} thread{'s' if t > 1 else ''} per rank")
    ax[3].set_xticks(sorted({d["config"]["nodes"] for d in docs}))
    ax[3].set_xlabel("ranks")
    ax[3].set_title("decode tok/s scaling")
    ax[3].legend()
    fig.suptitle(_where(docs), fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    log(f"wrote {out_path}")


def _where(docs: list[dict]) -> str:
    """Where the runs were made (host, MPI library, Slurm job, git revision), each when the files
    agree on it, for the chart's title."""
    def common(get):
        vals = {get(d) for d in docs}
        return vals.pop() if len(vals) == 1 else None

    hosts = common(lambda d: ",".join(d["system"].get("hosts") or [d["system"]["hostname"]]))
    mpi = common(lambda d: " ".join(d["system"]["versions"]["mpi_library"].split(",")[0].split()))
    job = common(lambda d: (d["system"].get("slurm") or {}).get("job_id"))
    rev = common(lambda d: d["system"]["versions"].get("git_revision"))
    isa = common(lambda d: d["summary"]["kernel_isa"])
    parts = [f"host {hosts}" if hosts else None, f"{isa} kernels" if isa else None, mpi,
             f"Slurm job {job}" if job else None, f"git {rev[:12]}{'+dirty' if rev.endswith('+dirty') else ''}"
             if rev else None]
    return " | ".join(p for p in parts if p)
