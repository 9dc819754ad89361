"""Generation on the root: prompt evaluation in batches, KV-cache prefix reuse, sampling, streamed
UTF-8-safe text, stop tokens and stop strings. Workers follow through `Engine.serve()`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence


from .engine import Engine
from .errors import ConfigError
from .sampler import Sampler


@dataclass
class Piece:
    token: int
    text: str            # text that became final with this token (may be "")


@dataclass
class RunStats:
    prompt_tokens: int = 0          # tokens of the prompt (cached ones included)
    evaluated_prompt_tokens: int = 0  # prompt tokens actually evaluated (after prefix reuse)
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0
    sync_seconds: float = 0.0       # time in collectives during generation (root's view)
    finish_reason: str = ""         # "stop" | "length" | "abort"
    token_ms: list = field(default_factory=list)

    @property
    def prompt_tps(self) -> float:
        return self.evaluated_prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generate_tps(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0

    def as_dict(self) -> dict:
        n = max(self.generated_tokens, 1)
        return {
            "prompt_tokens": self.prompt_tokens,
            "evaluated_prompt_tokens": self.evaluated_prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prompt_tokens_per_s": round(self.prompt_tps, 3),
            "generation_tokens_per_s": round(self.generate_tps, 3),
            "ms_per_token": round(1000 * self.generate_seconds / n, 3),
            "ms_per_token_sync": round(1000 * self.sync_seconds / n, 3),
            "ms_per_token_compute": round(1000 * (self.generate_seconds - self.sync_seconds) / n, 3),
            "finish_reason": self.finish_reason,
        }


class StopMatcher:
    """Holds back text that might be the beginning of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out = self.pending[:i]
                self.pending = ""
                return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generator:
    """The root's view of a conversation in the KV cache."""

    def __init__(self, engine: Engine, tokenizer):
        self.engine = engine
        self.tokenizer = tokenizer
        self.cached: list[int] = []   # tokens whose K/V rows are in the cache (positions 0..)
        self.last = RunStats()

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    def reset(self) -> None:
        self.cached = []

    def prefill(self, ids: Sequence[int], argmax: bool = False):
        """Make the cache hold exactly `ids` and return the logits after the last one (or, with
        argmax, the id of the largest). Reuses the longest common prefix with what is cached (at
        least the last token is evaluated)."""
        ids = list(ids)
        if not ids:
            raise ConfigError("empty prompt")
        if len(ids) > self.max_seq_len:
            raise ConfigError(f"prompt has {len(ids)} tokens but the context (max_seq_len) is {self.max_seq_len}")
        common = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)
        self.cached = self.cached[:common]
        logits = self.engine.forward(ids[common:], common, argmax=argmax)
        self.cached = ids
        self.last.evaluated_prompt_tokens = len(ids) - common
        return logits

    def stream(self, prompt_ids: Sequence[int], max_tokens: int, sampler: Sampler,
               stop: Sequence[str] = (), ignore_eos: bool = False,
               should_abort=None) -> Iterator[Piece]:
        """Evaluate the prompt, then yield one Piece per generated token. `self.last` holds the
        stats and finish_reason afterwards."""
        if max_tokens < 0:
            raise ConfigError(f"number of tokens to generate must be >= 0, got {max_tokens}")
        self.last = st = RunStats(prompt_tokens=len(prompt_ids))
        comm = self.engine.comm
        # greedy decoding only needs the best id: the ranks reduce it instead of gathering logits
        greedy = sampler.temperature == 0
        t0 = time.perf_counter()
        logits = self.prefill(prompt_ids, argmax=greedy)
        st.prompt_seconds = time.perf_counter() - t0
        decoder = self.tokenizer.stream_decoder()
        matcher = StopMatcher(stop)
        eos = set(self.tokenizer.eos_ids)
        st.finish_reason = "length"
        w0 = comm.wait_seconds
        t_gen = time.perf_counter()
        while st.generated_tokens < max_tokens:
            t_tok = time.perf_counter()
            token = logits if greedy else sampler.sample(logits)
            st.generated_tokens += 1
            if token in eos and not ignore_eos:
                st.finish_reason = "stop"
                tail, _ = matcher.push(decoder.flush())
                yield Piece(token, tail + matcher.flush())
                break
            text, stopped = matcher.push(decoder.push(token))
            if stopped:
                st.finish_reason = "stop"
                yield Piece(token, text)
                break
            if should_abort is not None and should_abort():
                st.finish_reason = "abort"
                yield Piece(token, text)
                break
            if st.generated_tokens >= max_tokens or len(self.cached) >= self.max_seq_len:
                if len(self.cached) >= self.max_seq_len:
                    st.finish_reason = "length"
                yield Piece(token, text + matcher.push(decoder.flush())[0] + matcher.flush())
                break
            yield Piece(token, text)
            logits = self.engine.forward([token], len(self.cached), argmax=greedy)
            self.cached.append(token)
            st.token_ms.append(1000 * (time.perf_counter() - t_tok))
        st.generate_seconds = time.perf_counter() - t_gen
        st.sync_seconds = comm.wait_seconds - w0
