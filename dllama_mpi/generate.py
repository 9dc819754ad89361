"""One conversation at a time on the root (inference, chat, single-stream benchmark): a thin
synchronous view of the scheduler for one request. Its pages stay in the KV cache's prefix cache
after the answer, so the next turn of a chat evaluates only its new tokens. Workers follow through
`Engine.serve()`."""

from __future__ import annotations

from typing import Iterator, Sequence

from .engine import Engine
from .errors import ConfigError
from .sampler import Sampler
from .scheduler import Piece, Request, RequestError, RunStats, Scheduler, StopMatcher

__all__ = ["Generator", "Piece", "RunStats", "StopMatcher"]


class Generator:
    def __init__(self, engine: Engine, tokenizer, scheduler: Scheduler | None = None, spec=None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.scheduler = scheduler or Scheduler(engine, tokenizer, spec=spec)
        self.last = RunStats()
        self.cached: list[int] = []   # tokens whose K/V rows the last answer left in the cache

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    def reset(self) -> None:
        self.cached = []

    def stream(self, prompt_ids: Sequence[int], max_tokens: int, sampler: Sampler,
               stop: Sequence[str] = (), ignore_eos: bool = False,
               should_abort=None, grammar=None) -> Iterator[Piece]:
        """Evaluate the prompt (reusing what the cache holds of it), then yield one Piece per
        generated token (constrained by `grammar`, a grammar.Matcher, when given). `self.last`
        holds the stats and finish_reason afterwards."""
        pieces: list[Piece] = []
        req = Request(prompt_ids, max_tokens, sampler, stop, ignore_eos,
                      sink=lambda kind, v: pieces.append(v) if kind == "piece" else None, grammar=grammar)
        try:
            self.scheduler.submit(req)
        except RequestError as e:
            raise ConfigError(str(e)) from None
        self.last = req.stats
        while not req.done:
            if should_abort is not None and should_abort():
                req.cancel()
            if not self.scheduler.step() and not req.done:
                raise RuntimeError("the request was neither admitted nor finished")
            yield from pieces
            pieces.clear()
        yield from pieces
        self.cached = list(req.rows)
