"""Many sequences per forward pass: the root's iteration-level scheduler (as vLLM and Orca do).

Each `step()` builds one pass: one decode row from every running sequence that has sampled its next
token, then prefill chunks of admitted prompts (in admission order) up to the token budget
(`max_batch` rows), so a long prompt does not stall the running streams for its whole length. After
the pass every sequence whose row produced logits samples with its own sampler, detokenizes, checks
its stop strings, EOS and max_tokens, and reports through its `sink`. Admission is FIFO and reserves
KV pages (kvcache.KVCache.admit): a request waits while the pool cannot promise its pages, and no
running sequence is ever preempted or corrupted. A request that could never fit is refused at
`submit` (RequestError).

Everything here runs on the root's generation thread; `Request.cancel()` may be called from any
thread (it only sets a flag that the next step reads).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .engine import LOGITS_ARGMAX, LOGITS_FULL, LOGITS_SAMPLE, LOGITS_STATS, Engine, Rows, TokenStats, row_stats
from .errors import ConfigError, DllamaError
from .kvcache import KVPlan
from .sampler import Nucleus, Sampler
from .speculative import PassCost, SeqSpec, SpecConfig


class RequestError(DllamaError):
    """A request that cannot be served as asked (too long for the context or the KV pool)."""


@dataclass
class TokenLogprob:
    """A token's log-probability and the `top` alternatives [(id, logprob)], largest first."""

    token: int
    logprob: float
    top: list


@dataclass
class Piece:
    token: int
    text: str                            # text that became final with this token (may be "")
    logprob: TokenLogprob | None = None  # when the request asked for log-probabilities


@dataclass
class RunStats:
    prompt_tokens: int = 0          # tokens of the prompt (cached ones included)
    evaluated_prompt_tokens: int = 0  # prompt tokens actually evaluated (after prefix reuse)
    generated_tokens: int = 0
    prompt_seconds: float = 0.0     # admission -> first token
    generate_seconds: float = 0.0   # first token -> last token
    queue_seconds: float = 0.0      # submit -> admission (waiting for a slot or KV pages)
    sync_seconds: float = 0.0       # root's time in collectives from the first token to the last
    finish_reason: str = ""         # "stop" | "length" | "abort"
    token_ms: list = field(default_factory=list)
    decode_passes: int = 0          # passes that gave this sequence tokens after its first
    draft_tokens: int = 0           # speculative tokens verified ...
    accepted_tokens: int = 0        # ... and accepted (each saved a pass)

    @property
    def prompt_tps(self) -> float:
        return self.evaluated_prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generate_tps(self) -> float:
        n = self.generated_tokens - 1   # the first token comes with the prompt
        return n / self.generate_seconds if self.generate_seconds and n > 0 else 0.0

    @property
    def ttft_seconds(self) -> float:
        return self.queue_seconds + self.prompt_seconds

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens per decode pass (the first token comes with the prompt): 1 without speculation."""
        return (self.generated_tokens - 1) / self.decode_passes if self.decode_passes else 0.0

    def as_dict(self) -> dict:
        n = max(self.generated_tokens - 1, 1)
        return {
            "prompt_tokens": self.prompt_tokens,
            "evaluated_prompt_tokens": self.evaluated_prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prompt_tokens_per_s": round(self.prompt_tps, 3),
            "generation_tokens_per_s": round(self.generate_tps, 3),
            "ms_per_token": round(1000 * self.generate_seconds / n, 3),
            "ms_per_token_sync": round(1000 * self.sync_seconds / n, 3),
            "ms_per_token_compute": round(1000 * (self.generate_seconds - self.sync_seconds) / n, 3),
            "time_to_first_token_s": round(self.ttft_seconds, 4),
            "queue_seconds": round(self.queue_seconds, 4),
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance": round(self.acceptance, 4),
            "tokens_per_pass": round(self.tokens_per_pass, 4),
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


WAITING, PREFILL, DECODE, DONE = "waiting", "prefill", "decode", "done"


class Request:
    """One sequence to generate. `sink(kind, value)` is called on the generation thread with
    ("piece", Piece) for every generated token and once ("done", RunStats).

    logprobs=k: every generated token comes with its log-probability and the k most likely
    alternatives (k <= 20), of the distribution the sampler draws from (logits / temperature; the
    model's own distribution at temperature 0). prompt_logprobs: the same for every prompt token
    after the first, in `prompt_logprobs` (the prompt is then evaluated in full: no cached pages).
    followers: requests with the same prompt and parameters but their own samplers (the n choices of
    one API request): they take over this request's pages when its prompt is evaluated (one page
    copy) and sample their first token from the same logits.
    grammar: a grammar.Matcher (constrained decoding; each follower its own copy, made before the
    first token): every sampled row is masked by it, and the sequence stops ("stop") once the grammar
    is complete. A constrained sequence does not speculate.
    spec: a speculative.SpecConfig for this request (None: the scheduler's)."""

    def __init__(self, prompt: Sequence[int], max_tokens: int, sampler: Sampler, stop: Sequence[str] = (),
                 ignore_eos: bool = False, sink: Callable | None = None, tag=None, cancelled_by=None,
                 logprobs: int | None = None, prompt_logprobs: bool = False, followers: Sequence = (),
                 grammar=None, spec: SpecConfig | None = None):
        self.prompt = [int(t) for t in prompt]
        self.max_tokens = int(max_tokens)
        self.sampler = sampler
        self.stop = list(stop)
        self.ignore_eos = ignore_eos
        self.sink = sink or (lambda kind, value: None)
        self.tag = tag                     # the caller's (an API job, a batch line id)
        self.generated: list[int] = []
        self.state = WAITING
        self.seq = None                    # kvcache.SeqKV while admitted
        self.stats = RunStats(prompt_tokens=len(self.prompt))
        self.logprobs = logprobs
        self.prompt_logprobs: list | None = [None] if prompt_logprobs else None
        self.followers = list(followers)
        self.grammar = grammar
        self.spec = spec
        self._spec: SeqSpec | None = None   # made at its first decode row when it speculates
        self.waited_for_pages = False
        self._cancel = False
        self._cancel_event = cancelled_by      # a threading.Event another thread may set
        self.decoder = self.matcher = None   # made at the first token
        self._rows_after: list[int] = []    # seq.tokens when it ended
        self._t_submit = self._t_admit = self._t_first = self._t_last = 0.0
        self._w0 = 0.0
        self._pending = 0                   # rows in passes in flight (pipeline stages)

    def cancel(self) -> None:
        self._cancel = True

    @property
    def cancelled(self) -> bool:
        return self._cancel or (self._cancel_event is not None and self._cancel_event.is_set())

    @property
    def done(self) -> bool:
        return self.state == DONE

    @property
    def greedy(self) -> bool:
        return self.sampler.temperature == 0

    @property
    def inv_t(self) -> float:
        """1 / the temperature of the distribution log-probabilities are reported for."""
        return 1.0 / self.sampler.temperature if self.sampler.temperature > 0 else 1.0

    @property
    def sample_mode(self) -> int:
        """How the engine returns the row this request samples from."""
        if not self.greedy:
            # top-p draws (log-probabilities included) come from per-rank summaries (engine._nuclei);
            # plain multinomial draws take the row whole
            return LOGITS_SAMPLE if self.sampler.draws_nucleus else LOGITS_FULL
        return LOGITS_STATS if self.logprobs is not None else LOGITS_ARGMAX

    @property
    def max_rows(self) -> int:
        """K/V rows this sequence may hold: the prompt, and every generated token but the last."""
        return len(self.prompt) + max(self.max_tokens, 1) - 1

    @property
    def rows(self) -> list[int]:
        """The tokens whose K/V rows are in the cache (prompt + generated, in position order)."""
        return self.seq.tokens if self.seq is not None else self._rows_after


class WholeRowRequest(Request):
    """A Request whose sampled top-p rows come back whole, as every sampled row did before the ranks'
    summaries (`benchmark --sampled-rows whole`, scripts/bench_sampled.py: what the summaries save)."""

    @property
    def sample_mode(self) -> int:
        m = super().sample_mode
        return LOGITS_FULL if m == LOGITS_SAMPLE else m


def check_request(plan: KVPlan, max_seq_len: int, prompt_len: int, max_tokens: int) -> None:
    """RequestError when a request of this size could never run in a pool of this plan (context or
    KV pages). A function of the plan alone, so that serve's supervisor, which holds no engine,
    checks requests against its backend's plan exactly as the scheduler does."""
    if prompt_len < 1:
        raise RequestError("empty prompt")
    if max_tokens < 0:
        raise RequestError(f"number of tokens to generate must be >= 0, got {max_tokens}")
    if prompt_len > max_seq_len:
        raise RequestError(f"the prompt is {prompt_len} tokens; the context (max_seq_len) is {max_seq_len}")
    rows = min(prompt_len + max(max_tokens, 1) - 1, max_seq_len)
    limit = min(plan.n_pages, plan.table_stride)
    if -(-rows // plan.page_size) > limit:
        raise RequestError(f"the request needs {rows} tokens of KV cache; the pool holds "
                           f"{limit * plan.page_size} (raise --kv-memory)")


@dataclass
class _Pass:
    rows: Rows
    rows_req: list      # the request of each row
    fed: list           # (request, first row, n rows) per sequence
    logit_kind: list    # per logit row: "sample" or "prompt" (a prompt logprob)
    drafts: dict        # request -> (its decode row, the drafted tokens in the rows after it)


class Scheduler:
    def __init__(self, engine: Engine, tokenizer, max_batch: int | None = None, spec: SpecConfig | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.spec = spec or SpecConfig()
        self.kv = engine.kv
        self.draft = getattr(engine, "draft", None)   # speculative.DraftModel (--spec draft), loaded by start()
        if self.spec.method == "draft" and self.draft is None:
            raise ConfigError("--spec draft: no draft model was loaded (--draft-model)")
        self.max_batch = max_batch or engine.max_batch
        self.max_seq_len = engine.max_seq_len
        if engine.kv_plan.n_slots > self.max_batch:
            raise RequestError(f"--parallel {engine.kv_plan.n_slots} is more than the rows of one pass "
                               f"(--batch {self.max_batch}): every running sequence needs a row")
        self.eos = set(tokenizer.eos_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []    # in admission order
        self.steps = 0
        self.tokens_generated = 0
        self.prompt_tokens_evaluated = 0
        self.decode_passes = 0          # per sequence: passes that gave it tokens after its first
        self.draft_tokens = 0           # speculative tokens verified, and accepted
        self.accepted_tokens = 0
        self.waited_for_pages = 0      # requests that had to wait for KV pages (not for a slot)
        self.depth = getattr(engine, "depth", 1)   # passes in flight at once (pipeline stages)
        self.inflight: deque[_Pass] = deque()
        self.pass_cost = PassCost()    # decode passes' seconds by rows: what a drafted row costs
        self._t_collect = 0.0          # (pipelined) when the last pass was collected

    # ---- requests ---------------------------------------------------------------------------

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """RequestError when a request of this size could never run (context or KV pool)."""
        check_request(self.engine.kv_plan, self.max_seq_len, prompt_len, max_tokens)

    def submit(self, req: Request) -> None:
        """Queue a request (FIFO). Raises RequestError when it could never run."""
        if req._t_submit:
            raise ValueError("a request is submitted once")
        req.max_tokens = min(req.max_tokens, self.max_seq_len - len(req.prompt) + 1)
        self.check(len(req.prompt), req.max_tokens)
        req._t_submit = time.perf_counter()
        for f in req.followers:
            f.max_tokens, f._t_submit = req.max_tokens, req._t_submit
        self.waiting.append(req)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one pass ---------------------------------------------------------------------------

    def step(self) -> bool:
        """Admit what fits, run one pass, hand out its tokens. False when there was nothing to do.
        With pipeline stages (engine.depth > 1) see _step_pipelined."""
        if self.depth > 1:
            return self._step_pipelined()
        self._reap_cancelled()
        self._admit()
        if not self.running:
            return False
        p = self._plan(self.running)
        updates, copies = self.kv.take_commands()
        t = time.perf_counter()
        out = self.engine.step(p.rows, updates, copies)
        self._time_pass(p, time.perf_counter() - t)
        self.steps += 1
        self._hand_out(p, out)
        return True

    def _time_pass(self, p: "_Pass", seconds: float) -> None:
        """A pass of decode and verify rows only teaches PassCost what a row costs (prompt rows attend
        over other lengths and come in large chunks: not the drafts' case)."""
        if self.spec.on or p.drafts:
            if all(req.state == DECODE for req, _, _ in p.fed):
                self.pass_cost.observe(len(p.rows.tokens), seconds)

    def _step_pipelined(self) -> bool:
        """Pipeline stages: launch passes until `depth` are in flight, each on sequences that have no
        row in flight (a decode row needs the previous token; further prefill chunks of a prompt
        may follow its earlier ones, since every stage runs passes in order), the decode rows of
        the running sequences shared among `depth` groups; then collect the oldest pass."""
        self._reap_cancelled()
        self._admit()
        if not self.running and not self.inflight:
            return False
        cap = -(-len(self.running) // self.depth)
        while len(self.inflight) < self.depth:
            p = self._plan(self.running, cap)
            if p is None:
                break
            updates, copies = self.kv.take_commands()
            self.engine.launch(p.rows, updates, copies)
            for req, _, n in p.fed:
                req._pending += n
            self.inflight.append(p)
        if self.inflight:
            self._collect()
        return True

    def _collect(self) -> None:
        full = len(self.inflight) == self.depth
        p = self.inflight.popleft()
        out = self.engine.collect()
        now = time.perf_counter()
        if full and self._t_collect:   # stages busy: passes come out one pass time apart
            self._time_pass(p, now - self._t_collect)
        self._t_collect = now
        for req, _, n in p.fed:
            req._pending -= n
        self.steps += 1
        self._hand_out(p, out)

    def drain(self) -> None:
        """Collect every pass in flight (their tokens are handed out as usual)."""
        while self.inflight:
            self._collect()

    def _plan(self, candidates, decode_cap: int | None = None) -> "_Pass | None":
        """The rows of one pass: a decode row of each sequence that has sampled its next token (at
        most decode_cap), then prefill chunks up to the token budget; then, with rows to spare,
        speculative drafts (each draft's tokens are rows after its sequence's decode row); pages
        ensured for them."""
        rows_req: list[Request] = []
        tokens, slots, positions = [], [], []
        logit_rows, logit_modes, logit_targets, logit_inv_t, logit_topp = [], [], [], [], []
        logit_kind = []                           # per logit row: "sample" or "prompt" (a prompt logprob)
        fed: list[tuple[Request, int, int]] = []   # (request, first row, n rows) per sequence
        logit_masks, constrained = [], []          # per logit row its mask (-1: none); the matchers

        def want(row, req, mode, target=-1, kind="sample"):
            logit_rows.append(row)
            logit_modes.append(mode)
            logit_targets.append(target)
            logit_inv_t.append(req.inv_t)
            logit_topp.append(req.sampler.topp)
            logit_kind.append(kind)
            if kind == "sample" and req.grammar is not None:
                logit_masks.append(len(constrained))
                constrained.append(req.grammar)
            else:
                logit_masks.append(-1)

        decoding = [req for req in candidates if req.state == DECODE and not req._pending]
        decoding = decoding[:decode_cap] if decode_cap is not None else decoding
        budget = self.max_batch - len(decoding)
        chunks = []                     # prefill chunks with what is left: (request, first position, rows)
        for req in candidates:
            if budget <= 0:
                break
            n0 = len(req.seq.tokens) + req._pending   # rows in flight come first
            if req.state != PREFILL or n0 >= len(req.prompt):
                continue
            take = min(len(req.prompt) - n0, budget)
            chunks.append((req, n0, take))
            budget -= take
        drafts = self._drafts(decoding, budget) if budget > 0 else {}
        for req in decoding:            # one decode row per running sequence, and its draft's rows
            draft = drafts.get(req, ())
            n, first = len(req.seq.tokens), len(rows_req)
            tokens.append(req.generated[-1])
            tokens.extend(draft)
            k = 1 + len(draft)
            slots.extend([req.seq.slot] * k)
            positions.extend(range(n, n + k))
            for i in range(k):
                want(first + i, req, req.sample_mode)
            fed.append((req, first, k))
            rows_req.extend([req] * k)
            if draft:
                drafts[req] = (first, draft)
        for req, n0, take in chunks:
            first = len(rows_req)
            tokens.extend(req.prompt[n0:n0 + take])
            slots.extend([req.seq.slot] * take)
            positions.extend(range(n0, n0 + take))
            rows_req.extend([req] * take)
            fed.append((req, first, take))
            if req.prompt_logprobs is not None:   # each prompt row scores the next prompt token
                for k in range(take):
                    if n0 + k + 1 < len(req.prompt):
                        want(first + k, req, LOGITS_STATS, req.prompt[n0 + k + 1], "prompt")
            if n0 + take == len(req.prompt) and req.max_tokens > 0:
                # the prompt's last row: its logits give the first token
                want(first + take - 1, req, req.sample_mode)
        if not fed:
            return None
        for req, first, n in fed:
            self.kv.ensure(req.seq, positions[first + n - 1] + 1)
        rows = Rows(tokens, slots, positions, logit_rows, logit_modes, logit_targets, logit_inv_t, logit_topp)
        if constrained:   # their masks are computed on a helper thread while the pass runs
            masks = np.empty((len(constrained), constrained[0].grammars.words), np.int32)
            done = constrained[0].grammars.fill_async(constrained, masks)
            rows.logit_masks, rows.masks = logit_masks, (done.result, masks)
        return _Pass(rows, rows_req, fed, logit_kind, drafts)

    def _drafts(self, decoding, budget: int) -> dict:
        """Each speculating sequence's draft for this pass: as long as it pays by the pass's Pace (its
        acceptance rate against what a row costs, measured; the more sequences decode in the pass,
        the less a draft adds), within `budget` spare rows shared evenly. A draft
        never reaches past the request's last token (max_tokens - 1 more rows: the accepted run and
        its last token fit the pages admission reserved) nor past the context. ngram drafts come
        first and are cut to their share; a draft model's sequences get their share of rows first,
        then are drafted together (DraftModel.draft)."""
        wants = []   # (request, its ngram draft, or how many tokens the draft model may draft)
        pace = None
        for req in decoding:
            cfg = req.spec or self.spec
            if not cfg.on or req.grammar is not None:
                continue
            if pace is None:
                pace = self.pass_cost.pace(len(decoding), self.draft.seconds_per_pass if self.draft else 0.0)
            if req._spec is None:
                req._spec = SeqSpec(cfg)
            n = len(req.seq.tokens)
            cap = min(req.max_tokens - len(req.generated) - 1, self.max_seq_len - n - 1)
            if req._spec.cfg.method == "draft":
                want = req._spec.next_k(cap, pace)
            else:
                want = req._spec.propose(req.prompt, req.generated, cap, pace)
            if want:
                wants.append((req, want))
        out, by_model = {}, []
        for i, (req, want) in enumerate(wants):
            share = budget // (len(wants) - i)
            n = min(want if isinstance(want, int) else len(want), share)
            if n < max(req._spec.cfg.draft_min, 1):
                continue
            budget -= n
            if isinstance(want, int):
                by_model.append((req, n))
            else:
                out[req] = want[:n]
        if by_model:
            drafted = self.draft.draft([(r._spec, r.prompt, r.generated, n, min(r.max_rows, self.max_seq_len),
                                         r._spec.cfg.p_min) for r, n in by_model])
            for (req, _), draft in zip(by_model, drafted):
                if len(draft) >= max(req._spec.cfg.draft_min, 1):
                    out[req] = draft
                else:   # cut at --draft-p-min: counted as a rejection, so that a sequence whose drafts
                    req._spec.verified(1, 0)   # keep stopping there stops paying for draft passes
        for req, draft in out.items():
            self.kv.wrote_ahead(req.seq, len(req.seq.tokens) + 1 + len(draft))
        return out

    def _hand_out(self, p: "_Pass", out) -> None:
        """After a pass: the rows join their sequences' caches, logit rows give tokens (or prompt
        log-probabilities)."""
        rows_req, fed, tokens, positions = p.rows_req, p.fed, p.rows.tokens, p.rows.positions
        logit_rows, logit_kind, drafts = p.rows.logit_rows, p.logit_kind, p.drafts
        now = time.perf_counter()
        for req, first, n in fed:
            if req.state == DECODE:
                req.stats.decode_passes += 1
                self.decode_passes += 1
            # a draft's rows join the cache one by one below, as they are verified
            self.kv.written(req.seq, tokens[first:first + (1 if req in drafts else n)])
            if req.state == PREFILL:
                self.prompt_tokens_evaluated += n
        accepted = dict.fromkeys(drafts, 0)
        for row, value, kind in zip(logit_rows, out, logit_kind):
            req = rows_req[row]
            if req in drafts and row > drafts[req][0]:
                # verification: this row's token is the draft's; it counts (its K/V row is valid and its
                # logits give the next token) only while every token drawn so far equalled the draft
                j = row - drafts[req][0]
                d = drafts[req][1][j - 1]
                if req.done or accepted[req] != j - 1 or req.generated[-1] != d:
                    continue
                self.kv.written(req.seq, [d])
                accepted[req] += 1
            if kind == "prompt":
                req.prompt_logprobs.append(TokenLogprob(req.prompt[positions[row] + 1], value.target,
                                                        value.top[:req.logprobs or 0]))
                continue
            for f in req.followers:   # the n choices of one request: same prompt, same logits
                if self._fork(req, f, now):
                    self._sample(f, value, now)
            req.followers = []
            self._sample(req, value, now)
        for req, (first, draft) in drafts.items():
            a = accepted[req]
            req.stats.draft_tokens += len(draft)
            req.stats.accepted_tokens += a
            self.draft_tokens += len(draft)
            self.accepted_tokens += a
            req._spec.verified(len(draft), a)
        for req, first, n in fed:
            if req.state == PREFILL and req.max_tokens == 0 and len(req.seq.tokens) == len(req.prompt):
                req.stats.prompt_seconds = now - req._t_admit
                self._finish(req, "length")   # nothing to generate: the prompt is evaluated

    def _sample(self, req: Request, value, now: float) -> None:
        """The request's next token from its row's result (an id, a logits row, or TokenStats)."""
        lp = None
        if isinstance(value, TokenStats):
            token = value.argmax
            if req.logprobs is not None:
                lp = TokenLogprob(token, value.top[0][1], value.top[:req.logprobs])
        elif isinstance(value, int):
            token = value
        elif isinstance(value, Nucleus) or req.sampler.draws_nucleus:
            # a top-p row: its nucleus from the ranks' summaries, or from the row where they did not
            # decide it; log-probabilities from the same exact normalisation either way
            nuc = value if isinstance(value, Nucleus) else req.sampler.nucleus_of(value)
            token = req.sampler.pick(nuc)
            if req.logprobs is not None:
                lp = TokenLogprob(token, nuc.logprob(token), nuc.top(req.logprobs))
        else:
            token = req.sampler.sample(value)
            if req.logprobs is not None:
                s = row_stats(value, req.inv_t, token)
                lp = TokenLogprob(token, s.target, s.top[:req.logprobs])
        self._on_token(req, token, now, lp)

    def _fork(self, leader: Request, req: Request, now: float) -> bool:
        """A follower takes the leader's evaluated prompt (shared full pages, a copy of the last);
        False when there is no room now: it queues first in line, shares the cached prompt later
        and samples its first token from its own pass then."""
        seq = self.kv.fork(leader.seq, min(req.max_rows, self.max_seq_len))
        if seq is None:
            self.waiting.appendleft(req)
            return False
        req.seq, req.state = seq, PREFILL
        req._t_admit = now
        req.stats.queue_seconds = now - req._t_submit
        req.stats.evaluated_prompt_tokens = 0
        req.prompt_logprobs = leader.prompt_logprobs
        self.running.append(req)
        return True

    # ---- admission, tokens, ends ------------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting:
            req = self.waiting[0]
            seq = self.kv.admit(req.prompt, min(req.max_rows, self.max_seq_len),
                                share=req.prompt_logprobs is None)
            if seq is None:
                if self.kv.free_slots and not req.waited_for_pages:
                    req.waited_for_pages = True   # a slot is free: it is the pages it waits for
                    self.waited_for_pages += 1
                return    # FIFO: later requests wait behind this one
            self.waiting.popleft()
            req.seq, req.state = seq, PREFILL
            req._t_admit = time.perf_counter()
            req.stats.queue_seconds = req._t_admit - req._t_submit
            req.stats.evaluated_prompt_tokens = len(req.prompt) - len(seq.tokens)
            self.running.append(req)

    def _on_token(self, req: Request, token: int, now: float, lp: TokenLogprob | None = None) -> None:
        st = req.stats
        if not req.generated:
            req._t_first = now
            req._w0 = self.engine.comm.wait_seconds   # sync time is counted from the first token
            st.prompt_seconds = now - req._t_admit
            req.decoder = self.tokenizer.stream_decoder()
            req.matcher = StopMatcher(req.stop)
        else:
            st.token_ms.append(1000 * (now - req._t_last))
        req._t_last = now
        req.generated.append(token)
        req.state = DECODE
        st.generated_tokens += 1
        self.tokens_generated += 1
        if token in self.eos and not req.ignore_eos:
            tail, _ = req.matcher.push(req.decoder.flush())
            req.sink("piece", Piece(token, tail + req.matcher.flush(), lp))
            self._finish(req, "stop")
            return
        if req.grammar is not None and not req.grammar.consume(token):   # the mask makes this unreachable
            print(f"grammar: token {token} was refused ({req.grammar.error}); the sequence ends",
                  file=sys.stderr, flush=True)
            req.sink("piece", Piece(token, "", lp))
            self._finish(req, "abort")
            return
        text, stopped = req.matcher.push(req.decoder.push(token))
        if req.grammar is not None and req.grammar.stopped and not stopped:   # the value is complete
            tail = req.matcher.push(req.decoder.flush())[0] + req.matcher.flush()
            req.sink("piece", Piece(token, text + tail, lp))
            self._finish(req, "stop")
            return
        if stopped:
            req.sink("piece", Piece(token, text, lp))
            self._finish(req, "stop")
            return
        if req.cancelled:
            req.sink("piece", Piece(token, text, lp))
            self._finish(req, "abort")
            return
        if st.generated_tokens >= req.max_tokens or len(req.seq.tokens) >= self.max_seq_len:
            tail = req.matcher.push(req.decoder.flush())[0] + req.matcher.flush()
            req.sink("piece", Piece(token, text + tail, lp))
            self._finish(req, "length")
            return
        req.sink("piece", Piece(token, text, lp))

    def _finish(self, req: Request, reason: str) -> None:
        st = req.stats
        st.finish_reason = reason
        if req.generated:
            st.generate_seconds = req._t_last - req._t_first
        if req.generated:
            st.sync_seconds = self.engine.comm.wait_seconds - req._w0
        if req.seq is not None:
            req._rows_after = list(req.seq.tokens)
            self.kv.release(req.seq)
            req.seq = None
        if req._spec is not None and self.draft is not None:
            self.draft.release(req._spec)
        if req in self.running:
            self.running.remove(req)
        req.state = DONE
        req.sink("done", st)

    def _reap_cancelled(self) -> None:
        if any(r.cancelled for r in self.waiting):
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                self._finish(r, "abort")
        for r in [r for r in self.running if r.cancelled and not r._pending]:   # none with rows in flight
            self._finish(r, "abort")

    def drop_cached(self) -> None:
        """Forget the cached pages nobody uses, the draft model's too (a benchmark's repeats must
        evaluate their prompts, and a draft replayed from its cache would inflate acceptance)."""
        self.kv.drop_cached()
        if self.draft is not None:
            self.draft.kv.drop_cached()

    def abort_all(self, reason: str = "abort") -> None:
        self.drain()
        for r in list(self.waiting) + list(self.running):
            if r in self.waiting:
                self.waiting.remove(r)
            self._finish(r, reason)

    # ---- numbers for /health, /metrics and the benchmark ----------------------------------------

    def gauges(self) -> dict:
        kv = self.kv
        plan = self.engine.kv_plan
        return {"waiting": len(self.waiting), "running": len(self.running),
                "kv_pages_total": plan.n_pages, "kv_pages_in_use": kv.pages_in_use,
                "kv_pages_cached": len(kv.evictable), "kv_pages_free": len(kv.free),
                "kv_page_size": plan.page_size, "kv_bytes_per_token": plan.row_bytes,
                "waited_for_pages": self.waited_for_pages,
                "sampled_rows_summarised": self.engine.sampled_rows_summarised,
                "sampled_rows_whole": self.engine.sampled_rows_whole}


def run_to_completion(scheduler: Scheduler, requests: Sequence[Request]) -> None:
    """Submit requests and step until all are done (tests, benchmark)."""
    for r in requests:
        scheduler.submit(r)
    while any(not r.done for r in requests):
        if not scheduler.step() and not scheduler.busy:
            break
