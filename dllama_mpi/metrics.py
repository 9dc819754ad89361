"""`GET /metrics` of `dllama-mpi api`: Prometheus text format (prometheus_client, own registry).

The server reports events (`request_done`, `generation_done`); numbers that someone else owns
(queue depth, running sequences, KV cache) are read at scrape time through callbacks registered with
`gauge`. Per-rank counters come from the workers: only the generation thread may run a collective,
so a scrape asks for them (`RankStats.refresh`) and the generation thread answers between forward
passes (`RankStats.poll`); a scrape that finds it busy in a long pass gets the last values.
"""

from __future__ import annotations

import asyncio
import threading
import time

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

prometheus_client.disable_created_metrics()   # no *_created series next to every counter

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
PREFIX = "dllama_"


def kv_bytes_per_token(header, plan) -> list[int]:
    """KV-cache bytes one position costs on each rank: K and V, f32, every full-attention layer (the
    sliding-window ones keep a fixed ring per slot), the KV heads the rank stores (a KV head shared
    by ranks is stored on each of them)."""
    n = sum(1 for l in range(header.n_layers) if header.window_of_layer(l) == 0)
    return [2 * 4 * n * plan[r].n_kv_heads * header.head_size for r in range(plan.n_nodes)]


def engine_kv_bytes_per_token(engine) -> list[int]:
    """KV-cache bytes one position costs on each rank of this engine's job."""
    if engine.depth > 1:   # pipeline stages: each rank stores its stage's layers
        from .pipeline import kv_bytes_per_token as stage_kv_bytes_per_token

        return stage_kv_bytes_per_token(engine.h, engine.layout)
    return kv_bytes_per_token(engine.h, engine.plan)


class RankStats:
    """Per-rank counters gathered on the root by a collective (`gather`, run on the generation
    thread). `refresh` (asyncio side) asks and waits a little; `poll` (generation thread, between
    passes) answers when asked and is a flag check otherwise."""

    def __init__(self, gather, fields: tuple[str, ...]):
        self.gather, self.fields = gather, fields
        self.values = None     # [ranks, len(fields)] array from the last gather, or None
        self.count = 0         # gathers done
        self._asked = threading.Event()

    def poll(self) -> None:
        if self._asked.is_set():
            self._asked.clear()
            self.values = self.gather()
            self.count += 1

    async def refresh(self, timeout: float) -> None:
        seen = self.count
        self._asked.set()
        deadline = time.monotonic() + timeout
        while self.count == seen and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = PREFIX
        self.requests = Counter(p + "requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.generations = Counter(p + "generations", "Finished generations, by finish reason",
                                   ["finish_reason"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished generations (cached ones "
                                     "included)", registry=r)
        self.evaluated_tokens = Counter(p + "prompt_evaluated_tokens", "Prompt tokens evaluated (not reused "
                                        "from the KV cache)", registry=r)
        self.generated_tokens = Counter(p + "generated_tokens", "Tokens generated", registry=r)
        self.prompt_seconds = Counter(p + "prompt_seconds", "Seconds spent evaluating prompts", registry=r)
        self.generation_seconds = Counter(p + "generation_seconds", "Seconds spent generating", registry=r)
        self.decode_passes = Counter(p + "decode_passes", "Forward passes that gave a sequence tokens after its "
                                     "first, counted per sequence (generated tokens per pass: speculation)", registry=r)
        self.draft_tokens = Counter(p + "spec_draft_tokens", "Speculative tokens drafted and verified", registry=r)
        self.accepted_tokens = Counter(p + "spec_accepted_tokens", "Speculative tokens accepted", registry=r)
        self.last_tps = {"prompt": 0.0, "generation": 0.0}
        self._gauges: list[tuple[str, str, tuple, object]] = []
        self.rank_stats: RankStats | None = None
        r.register(_Callbacks(self))

    # --- what the server reports ---------------------------------------------------------------

    def request_done(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def generation_done(self, st) -> None:
        """After a generation (a RunStats: prompt/evaluated/generated tokens, seconds, finish_reason)."""
        self.generations.labels(st.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(st.prompt_tokens)
        self.evaluated_tokens.inc(st.evaluated_prompt_tokens)
        self.generated_tokens.inc(st.generated_tokens)
        self.prompt_seconds.inc(st.prompt_seconds)
        self.generation_seconds.inc(st.generate_seconds)
        self.decode_passes.inc(st.decode_passes)
        self.draft_tokens.inc(st.draft_tokens)
        self.accepted_tokens.inc(st.accepted_tokens)
        if st.prompt_seconds > 0:
            self.last_tps["prompt"] = st.evaluated_prompt_tokens / st.prompt_seconds
        if st.generate_seconds > 0 and st.generated_tokens:
            self.last_tps["generation"] = st.generated_tokens / st.generate_seconds

    def gauge(self, name: str, help_: str, fn, labels: tuple[str, ...] = ()) -> None:
        """A gauge read at scrape time: fn() returns a number, or with labels a dict
        {label values tuple: number}."""
        self._gauges.append((PREFIX + name, help_, labels, fn))

    def set_rank_stats(self, rank_stats: RankStats) -> None:
        self.rank_stats = rank_stats

    async def render(self, refresh_timeout: float = 1.0) -> bytes:
        if self.rank_stats is not None:
            await self.rank_stats.refresh(refresh_timeout)
        return generate_latest(self.registry)


class _Callbacks:
    """The registry's view of the callback gauges and the per-rank counters."""

    def __init__(self, m: Metrics):
        self.m = m

    def describe(self):
        return []

    def collect(self):
        m = self.m
        tps = GaugeMetricFamily(PREFIX + "tokens_per_second", "Tokens per second of the last finished "
                                "generation, by phase (prompt evaluation or generation)", labels=["phase"])
        for phase, v in m.last_tps.items():
            tps.add_metric([phase], v)
        yield tps
        for name, help_, labels, fn in m._gauges:
            g = GaugeMetricFamily(name, help_, labels=list(labels))
            v = fn()
            if labels:
                for key, x in v.items():
                    g.add_metric([str(k) for k in key], float(x))
            else:
                g.add_metric([], float(v))
            yield g
        rs = m.rank_stats
        if rs is None or rs.values is None:
            return
        helps = {"compute_seconds": "Seconds in forward passes outside collectives, per rank",
                 "wait_seconds": "Seconds waiting in collectives, per rank",
                 "forward_passes": "Forward passes, per rank",
                 "tokens": "Positions evaluated in forward passes, per rank"}
        for j, field in enumerate(rs.fields):
            c = CounterMetricFamily(PREFIX + "rank_" + field, helps.get(field, field), labels=["rank"])
            for rank, row in enumerate(rs.values):
                c.add_metric([str(rank)], float(row[j]))
            yield c
