"""The speculative drafters: cheap guesses of a sequence's next tokens, which the scheduler verifies
in one forward pass (its k drafted tokens become k + 1 rows of the sequence; scheduler.py).

Verification is sample-and-match (llama.cpp's `common_sampler_sample_and_accept_n`): the sampler
draws at each verified row exactly as plain decoding would, one draw per emitted token, and the run
goes on while the drawn token equals the draft; the first token that differs is emitted too. Since a
row's logits do not depend on the other rows of its pass (batch-invariant kernels), the emitted
tokens are those of plain decoding, greedy or seeded; a drafter decides only how many come per pass.

- `ngram`: prompt lookup over the sequence's own tokens (prompt + generated so far), as llama.cpp's
  `llama-lookup` / vLLM's `ngram` method: the longest of the last NGRAM_MAX..NGRAM_MIN tokens that
  occurred before proposes what followed its most recent occurrence — or, once the sequence has been
  seen copying, its occurrence nearest the place it copies from. No weights, no network.
- `draft`: a smaller (or lower-precision) model with the same vocabulary, run whole on the root
  (`DraftModel`: an Engine over a one-rank communicator with its own KV pages per sequence), so
  drafting costs no collective round. It drafts greedily, and stops where its top token's
  probability falls below --draft-p-min (llama.cpp's `common_speculative_gen_draft`).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
import time
from dataclasses import dataclass

from .errors import ConfigError, DllamaError

SPEC_METHODS = ("none", "ngram", "draft")
DRAFT_MAX = 16      # llama.cpp's --draft-max default
DRAFT_MIN = 1       # a proposal shorter than this is not verified
DRAFT_P_MIN = 0.75  # llama.cpp's --draft-p-min default (common_params_speculative.p_min)
NGRAM_MIN, NGRAM_MAX = 1, 4   # lookup n-gram sizes (llama.cpp's LLAMA_NGRAM_MAX; 4 beat 3 and 5: BENCHMARKS.md)
# What a draft's next token is believed to be accepted with before the sequence has shown its own
# rate, by source (0: the draft model; n: an n-gram match), and that belief's weight in tokens. A
# 1-token match predicts little on open text; a 3-token one mostly repeats a passage.
PRIOR_P = {0: 0.7, 1: 0.3, 2: 0.5, 3: 0.7, 4: 0.7}
# How far before / after the place a sequence copies from an n-gram's occurrence may lie to be taken
# for the copy resuming (NgramDrafter): a word or two skipped back, a sentence dropped ahead.
COPY_BEHIND, COPY_AHEAD = 4, 48
PRIOR_WEIGHT = 1.0  # the prior counts as one token
FORGET = 0.5        # evidence kept per later draft of that source: the rate follows the text's regime
IDLE_FORGET = 0.97  # ... per pass it decided not to draft: the belief drifts back to the prior (a probe)
# An extra row's cost as a fraction of a one-row pass before passes of several rows are timed: 0.2-0.25
# is the costliest case measured (SmolLM2 on 2 cores, compute-bound); memory- or network-bound passes
# are cheaper per row, which PassCost learns from the verify passes themselves.
ROW_COST_PRIOR = 0.2
SIZE_PRIOR_WEIGHT = 2.0   # PassCost.seconds: the line's weight against a size's own passes, in passes


@dataclass(frozen=True)
class SpecConfig:
    """How the scheduler speculates: method "none" (plain decoding), "ngram" or "draft" (the model of
    draft_model, loaded at start-up: startup.start); a sequence drafts at most draft_max tokens per
    pass (as many as pay by the pass's Pace, or all of them when fixed) and verifies no proposal
    shorter than draft_min; a draft model stops drafting where its top token's probability is below
    p_min."""

    method: str = "none"
    draft_max: int = DRAFT_MAX
    draft_min: int = DRAFT_MIN
    p_min: float = DRAFT_P_MIN
    draft_model: str | None = None
    fixed: bool = False   # draft draft_max tokens every pass (llama.cpp's, vLLM's rule), not what pays

    def __post_init__(self):
        check_spec(self.method, self.draft_max, self.draft_min, self.p_min, self.draft_model)

    @property
    def on(self) -> bool:
        return self.method != "none"

    def with_draft(self, n_max: int | None, n_min: int | None, p_min: float | None = None) -> "SpecConfig":
        """A request's own draft sizes and p_min (llama.cpp server's speculative.n_max / n_min / p_min):
        n_max 0 turns speculation off for it; the method stays the server's (--spec none: none)."""
        if not self.on or (n_max is None and n_min is None and p_min is None):
            return self
        if n_max == 0:
            return SpecConfig()
        n_max = self.draft_max if n_max is None else n_max
        return dataclasses.replace(self, draft_max=n_max, draft_min=min(self.draft_min if n_min is None else n_min, n_max),
                                   p_min=self.p_min if p_min is None else p_min)


def check_spec(method: str, draft_max: int, draft_min: int, p_min: float = DRAFT_P_MIN,
               draft_model: str | None = None) -> None:
    if method not in SPEC_METHODS:
        raise ConfigError(f"--spec {method!r}: not one of {', '.join(SPEC_METHODS)}")
    if draft_max < 1:
        raise ConfigError(f"--draft-max must be >= 1, got {draft_max}")
    if not 0 <= draft_min <= draft_max:
        raise ConfigError(f"--draft-min must be in 0..--draft-max ({draft_max}), got {draft_min}")
    if not 0 <= p_min <= 1:
        raise ConfigError(f"--draft-p-min must be in 0..1, got {p_min:g}")
    if method == "draft" and not draft_model:
        raise ConfigError("--spec draft needs --draft-model FILE (a model with the same vocabulary)")
    if draft_model and method != "draft":
        raise ConfigError(f"--draft-model is used by --spec draft only (--spec is {method})")


class NgramDrafter:
    """Prompt lookup for one sequence. seen[n] maps every n-gram whose next token is known to the
    positions of that next token (ascending), so feeding a token costs O(NGRAM_MAX) and proposing a
    bisection, not a scan of the context.

    Of an n-gram's occurrences the most recent proposes (llama.cpp's, vLLM's rule) until the sequence
    has been seen copying: then the one nearest the place it copies from (`copy_offset`, set by
    SeqSpec when a draft is verified: that place moves with the sequence's end), if one lies within
    COPY_BEHIND..COPY_AHEAD tokens of it. A model repeating or editing a passage skips or changes a
    word now and then; the short match that resumes the copy (" the", ", and") most recently occurred
    anywhere but there."""

    def __init__(self, n_min: int = NGRAM_MIN, n_max: int = NGRAM_MAX):
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        self.seen: list[dict] = [{} for _ in range(n_max + 1)]
        self.copy_offset: int | None = None   # the copied text's next token is at len(tokens) + this

    def extend(self, tokens) -> None:
        toks, seen = self.tokens, self.seen
        for t in tokens:
            end = len(toks)
            for n in range(self.n_min, min(self.n_max, end) + 1):   # n-grams ending at end-1: t follows them
                key = tuple(toks[end - n:end])
                at = seen[n].get(key)
                if at is None:
                    seen[n][key] = [end]
                else:
                    at.append(end)
            toks.append(int(t))

    def match(self) -> tuple[int, int]:
        """(n, j): the longest suffix of n tokens (NGRAM_MAX down to NGRAM_MIN) that occurred before,
        and the position j of what followed it (its occurrence nearest the copy point, or its most
        recent); (0, -1) if none."""
        toks = self.tokens
        end = len(toks)
        for n in range(min(self.n_max, end), self.n_min - 1, -1):
            at = self.seen[n].get(tuple(toks[end - n:end]))
            if at is not None:
                return n, self._nearest(at, end)
        return 0, -1

    def _nearest(self, at: list[int], end: int) -> int:
        if self.copy_offset is None:
            return at[-1]
        copy = end + self.copy_offset
        i = bisect.bisect_left(at, copy)
        before = at[i - 1] if i > 0 and copy - at[i - 1] <= COPY_BEHIND else None
        after = at[i] if i < len(at) and at[i] - copy <= COPY_AHEAD else None
        if before is not None and (after is None or copy - before <= after - copy):
            return before
        return at[-1] if after is None else after

    def continuation(self, j: int, k: int) -> list[int]:
        """k tokens from position j on; where they reach the end of the context, the text is taken to
        repeat with the period it has (a loop)."""
        toks = self.tokens
        end = len(toks)
        if j + k <= end:
            return toks[j:j + k]
        period = end - j
        return [toks[j + m % period] for m in range(k)]

    def propose(self, k: int) -> list[int]:
        """k tokens that followed the longest matching suffix's occurrence (match); [] when none
        occurred before."""
        n, j = self.match()
        return self.continuation(j, k) if n else []


def expected_accepted(p: float, k: int) -> float:
    """Tokens accepted from a k-token draft whose tokens are each accepted with probability p, until
    the first rejection: p + p^2 + ... + p^k."""
    return float(k) if p >= 1 else p * (1 - p ** k) / (1 - p)


class PassCost:
    """Seconds per decode pass by its rows, from the recent passes that had no prompt rows (weights
    decay by `forget` per pass), so that speculation weighs a draft's expected tokens against what its
    rows cost on this engine, this host and these links. Two views: a line, a + b * (rows - 1), fitted
    over all of them (`model`: what `benchmark` reports, and the prior for a size not seen lately;
    until passes of different sizes have been timed, b = ROW_COST_PRIOR * a); and each size's own
    mean (`seconds`), which the line misses where a pass is memory-bound at one row and compute-bound
    a few rows later (in-process passes of Gemma 3 on 2 AVX2 cores: the second row 4 % of a pass,
    rows 5-8 ~45 % each; scripts/BENCHMARKS.md): a line through them drafts too long at high
    acceptance."""

    def __init__(self, forget: float = 0.98):
        self.forget = forget
        self.w = self.sr = self.st = self.srr = self.srt = 0.0
        self.b_ratio = ROW_COST_PRIOR   # b / a: the last fit where rows varied enough, else the prior
        self.by_rows: dict[int, list[float]] = {}   # rows -> [weight, weighted seconds]

    def observe(self, rows: int, seconds: float) -> None:
        f, x = self.forget, rows - 1
        self.w = f * self.w + 1
        self.sr = f * self.sr + x
        self.st = f * self.st + seconds
        self.srr = f * self.srr + x * x
        self.srt = f * self.srt + x * seconds
        for e in self.by_rows.values():
            e[0] *= f
            e[1] *= f
        e = self.by_rows.setdefault(rows, [0.0, 0.0])
        e[0] += 1
        e[1] += seconds

    def model(self) -> tuple[float, float]:
        """(a, b): a one-row pass's seconds and an extra row's; (1, ROW_COST_PRIOR) before any pass."""
        if self.w == 0:
            return 1.0, ROW_COST_PRIOR
        mr, mt = self.sr / self.w, self.st / self.w
        var = self.srr / self.w - mr * mr
        if var > 0.25:
            b = (self.srt / self.w - mr * mt) / var
            a = mt - b * mr
            if a > 0:   # a noisy fit may say anything: an extra row costs 2 % .. 100 % of a one-row pass
                self.b_ratio = min(max(b / a, 0.02), 1.0)   # (whose classifier, syncs, dispatch it shares)
        a = mt / (1 + self.b_ratio * mr)
        return a, self.b_ratio * a

    def seconds(self, max_rows: int) -> list[float]:
        """A pass's seconds for 0 .. max_rows rows ([0] unused): each size's recent mean, weighed
        against the line as against SIZE_PRIOR_WEIGHT passes (a size seen once, or long ago, leans on
        the line), and never less than a smaller pass's."""
        a, b = self.model()
        out = [0.0] * (max_rows + 1)
        for r in range(1, max_rows + 1):
            w, t = self.by_rows.get(r, (0.0, 0.0))
            out[r] = max((t + SIZE_PRIOR_WEIGHT * (a + b * (r - 1))) / (w + SIZE_PRIOR_WEIGHT), out[r - 1])
        return out

    def pace(self, decode_rows: int, draft_seconds: float = 0.0) -> "Pace":
        a, b = self.model()
        return Pace(a, b, draft_seconds, decode_rows, self if self.by_rows else None)


class Pace:
    """One pass's speculation budget: the sequences decide in turn how many tokens to draft, each
    choosing k that maximises the pass's tokens per second, (tokens + E(k)) / seconds(rows + k), where
    E(k) is the expected accepted tokens and seconds(r) what a pass of r rows costs (PassCost: each
    size's own time, or a + b * (r - 1)), plus a draft model's passes for --spec draft. So a draft is
    as long as it pays, shorter where acceptance is low or rows are dear, and drafting fades out as
    concurrent sequences fill the pass (each of their tokens raises the bar a draft must clear)."""

    def __init__(self, a: float, b: float, draft_seconds: float, decode_rows: int, cost: PassCost | None = None):
        self.a, self.b, self.draft_seconds, self.cost = a, b, draft_seconds, cost
        self.table: list[float] = []   # cost.seconds, taken as far as the drafts reach
        self.rows = max(decode_rows, 1)
        self.drafting = 0.0   # the draft model's seconds for the drafts chosen so far
        self.tokens = float(max(decode_rows, 1))

    def _seconds(self, rows: int) -> float:
        if self.cost is None:
            return self.a + self.b * (rows - 1)
        if rows >= len(self.table):
            self.table = self.cost.seconds(max(rows, self.rows + DRAFT_MAX))
        return self.table[rows]

    @property
    def seconds(self) -> float:
        return self._seconds(self.rows) + self.drafting

    def choose(self, p: float, k_max: int, k_min: int = 1, draft_model: bool = False) -> int:
        ds = self.draft_seconds if draft_model else 0.0
        best, best_rate = 0, self.tokens / self.seconds
        for k in range(max(k_min, 1), k_max + 1):   # every length: a pass's seconds need not grow evenly
            rate = (self.tokens + expected_accepted(p, k)) / (self._seconds(self.rows + k) + self.drafting + ds * k)
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = k, rate
        if best:
            self.tokens += expected_accepted(p, best)
            self.rows += best
            self.drafting += ds * best
        return best


class SeqSpec:
    """One sequence's speculation state: its drafter (ngram: its n-gram index; draft: its pages in the
    draft model's KV cache) and its acceptance rate per draft source (the draft model, or the length
    of the n-gram match), from the recent drafts it verified over a prior (PRIOR_P); each pass the
    Pace of the pass turns that rate into how many tokens to draft (0: decode plainly)."""

    def __init__(self, cfg: SpecConfig):
        self.cfg = cfg
        self.drafter = NgramDrafter() if cfg.method == "ngram" else None
        self.draft_kv = None   # draft: this sequence's kvcache.SeqKV in the draft model's cache ...
        self.draft_synced = 0  # ... whose first rows are known to be the sequence's own tokens
        self.evidence = {}     # source -> [accepted tokens, rejections], older drafts' weighing less
        self.source = None     # the source of the draft now being verified
        self.copy_from = None  # ngram: where that draft was taken from, relative to the context's end

    def rate(self, source: int) -> float:
        """The belief that a next drafted token from `source` is accepted: accepted tokens over tokens
        tested (accepted + rejections: a draft's tokens after its first rejection were not tested),
        recent drafts weighing most, with the prior."""
        acc, rej = self.evidence.get(source, (0.0, 0.0))
        return (acc + PRIOR_WEIGHT * PRIOR_P[source]) / (acc + rej + PRIOR_WEIGHT)

    def _choose(self, source: int, k_cap: int, pace: "Pace | None") -> int:
        k_cap = min(k_cap, self.cfg.draft_max)
        k_min = max(self.cfg.draft_min, 1)
        if k_cap < k_min:
            return 0
        if self.cfg.fixed:
            self.source = source
            return k_cap
        if pace is None:
            pace = Pace(1.0, ROW_COST_PRIOR, 0.0, 1)
        k = pace.choose(self.rate(source), k_cap, k_min, draft_model=source == 0)
        if k == 0 and source in self.evidence:
            self.evidence[source] = [x * IDLE_FORGET for x in self.evidence[source]]
        self.source = source if k else None
        return k

    def next_k(self, k_cap: int, pace: "Pace | None" = None) -> int:
        """draft: how many tokens the draft model drafts for the next pass (0: decode plainly)."""
        return self._choose(0, k_cap, pace)

    def propose(self, prompt, generated, k_cap: int, pace: "Pace | None" = None) -> list[int]:
        """ngram: the draft for the next pass (tokens after generated[-1]); [] to decode plainly."""
        d = self.drafter
        n_prompt = len(prompt)
        if len(d.tokens) < n_prompt:
            d.extend(prompt[len(d.tokens):])
        d.extend(generated[len(d.tokens) - n_prompt:])
        n, j = d.match()
        if not n:
            return []
        k = self._choose(n, k_cap, pace)
        self.copy_from = j - len(d.tokens)
        return d.continuation(j, k) if k else []

    def verified(self, drafted: int, accepted: int) -> None:
        """After a verify pass: the draft's accepted tokens and its rejection (unless all were
        accepted) join its source's evidence; what earlier drafts showed weighs FORGET times less.
        ngram: the sequence copies from where the draft was taken (NgramDrafter.copy_offset)."""
        if self.source is None or drafted == 0:
            return
        if self.drafter is not None:
            self.drafter.copy_offset = self.copy_from
        acc, rej = self.evidence.get(self.source, (0.0, 0.0))
        self.evidence[self.source] = [FORGET * acc + accepted, FORGET * rej + (accepted < drafted)]
        self.source = None


# ------------------------------------------------------------------------------------------------
# the draft model

class DraftModel:
    """A model with the target's vocabulary, whole on the root: `engine` runs over a one-rank
    communicator (comm.solo) with a KV page pool of its own, one slot per sequence slot of the
    target. Each drafting sequence holds pages there (SeqSpec.draft_kv) that follow its accepted
    tokens: before drafting, the rows past the longest prefix shared with prompt + generated are
    truncated (the rejected drafts) and the missing tokens evaluated (the prompt at first, then
    the accepted and bonus tokens); then one token per pass, greedily. The drafting sequences share
    each pass: their catch-up rows together, then one row each, so k drafted tokens cost k draft
    passes whatever the number of sequences."""

    def __init__(self, engine, path: str):
        self.engine, self.path = engine, path
        self.kv = engine.kv
        self.passes = 0   # draft passes run (every row of the sequences drafting at once)
        self.seconds_per_pass = 0.0   # recent mean: what drafting one more token costs (Pace)

    def describe(self) -> str:
        h, e = self.engine.h, self.engine
        return (f"draft model {self.path}: {h.arch_name}, dim {h.dim}, {h.n_layers} layers, weights "
                f"{h.weights_name}, {e.w.nbytes() / 2**20:.1f} MiB on rank 0 (whole), its KV cache "
                f"{e.kv_plan.n_pages} pages of {e.kv_plan.page_size} tokens")

    def release(self, state: SeqSpec) -> None:
        """A sequence ended: its draft pages stay cached (the next turn of a chat shares them)."""
        if getattr(state, "draft_kv", None) is not None:   # (a test's oracle drafter has none)
            self.kv.release(state.draft_kv)
            state.draft_kv = None

    def draft(self, wants) -> list[list[int]]:
        """wants: (SeqSpec, prompt, generated, k, max_rows, p_min) per sequence; the greedy draft of
        each (tokens after generated[-1]), at most k tokens, ending before the first token whose
        probability under the draft model is below p_min (or shorter: its context, or no room in its
        pool now)."""
        from .engine import LOGITS_ARGMAX, LOGITS_STATS, Rows

        eng, kv = self.engine, self.kv
        wants = list(wants)
        out = [[] for _ in wants]
        feed = {}   # i -> tokens still to evaluate (the last one's logits give the next draft token)
        for i, (st, prompt, generated, k, max_rows, _) in enumerate(wants):
            n_prompt, total = len(prompt), len(prompt) + len(generated)
            if total + k - 1 > eng.max_seq_len:   # its rows go up to position total + k - 2
                k = eng.max_seq_len - total + 1
            if k < 1:
                continue
            if st.draft_kv is None:
                st.draft_kv = kv.admit(prompt + generated, min(max_rows, eng.max_seq_len))
                if st.draft_kv is None:   # its pool is full now: no draft this pass
                    continue
                st.draft_synced = len(st.draft_kv.tokens)
            seq = st.draft_kv
            tok = lambda j: prompt[j] if j < n_prompt else generated[j - n_prompt]  # noqa: E731
            # rows past the sequence's own tokens are drafts it rejected; the last token is evaluated
            # again in any case (its logits give the first draft token)
            n = min(st.draft_synced, len(seq.tokens), total - 1)
            while n < min(len(seq.tokens), total - 1) and seq.tokens[n] == tok(n):
                n += 1
            try:
                kv.truncate(seq, n)
            except ConfigError:   # a sliding-window ring that no longer holds the rows before n
                kv.release(seq, keep=False)
                st.draft_kv = None
                continue
            feed[i] = [tok(j) for j in range(n, total)]
            st.draft_synced = total   # once the loop below has evaluated them
            wants[i] = (st, prompt, generated, k, max_rows, wants[i][5])
        want_stats = any(w[5] > 0 for w in wants)
        mode = LOGITS_STATS if want_stats else LOGITS_ARGMAX
        t0, passes0 = time.perf_counter(), self.passes
        while feed:
            toks, slots, positions, logit_rows, logit_of, fed = [], [], [], [], [], []
            budget = eng.max_batch
            for i, rest in feed.items():
                if budget == 0:
                    break
                seq = wants[i][0].draft_kv
                take = rest[:budget]
                n0 = len(seq.tokens)
                kv.ensure(seq, n0 + len(take))
                toks += take
                slots += [seq.slot] * len(take)
                positions += range(n0, n0 + len(take))
                if len(take) == len(rest):
                    logit_rows.append(len(toks) - 1)
                    logit_of.append(i)
                fed.append((i, take))
                budget -= len(take)
            rows = Rows(toks, slots, positions, logit_rows, [mode] * len(logit_rows))
            result = eng.step(rows, *kv.take_commands())
            self.passes += 1
            for i, take in fed:
                kv.written(wants[i][0].draft_kv, take)
                feed[i] = feed[i][len(take):]
            for i, value in zip(logit_of, result):
                k, p_min = wants[i][3], wants[i][5]
                token, p = (value.argmax, math.exp(value.top[0][1])) if want_stats else (value, 1.0)
                if p < p_min:
                    del feed[i]
                    continue
                out[i].append(token)
                if len(out[i]) >= k:
                    del feed[i]
                else:
                    feed[i] = [token]
        if self.passes > passes0:
            per = (time.perf_counter() - t0) / (self.passes - passes0)
            self.seconds_per_pass = per if not self.seconds_per_pass else 0.8 * self.seconds_per_pass + 0.2 * per
        return out


def check_draft_model(path: str, vocab_size: int, vocab: list[bytes] | None) -> None:
    """On the root before anything loads (and in serve's supervisor): the --draft-model file exists,
    the loader takes it, and its vocabulary is the model's (its size, and where the file carries its
    tokens, a GGUF, every token's text); else one ConfigError line naming the file."""
    from .gguf import GGUFFile, is_gguf, tokenizer_data
    from .weights import open_model_file, runtime_header

    if os.path.isdir(path):
        raise ConfigError(f"--draft-model {path}: a directory, not a model file")
    if not os.path.isfile(path):
        raise ConfigError(f"--draft-model {path}: draft model file not found")
    try:
        m = open_model_file(path)
        h, _ = runtime_header(m)
        m.close()
        draft_vocab = None
        if is_gguf(path):
            g = GGUFFile(path)
            try:
                if h.vocab_size == vocab_size and g.strings("tokenizer.ggml.tokens"):
                    draft_vocab = tokenizer_data(g).vocab
            finally:
                g.close()
    except DllamaError as e:
        raise ConfigError(f"--draft-model: {e}") from None
    if h.vocab_size != vocab_size:
        raise ConfigError(f"--draft-model {path}: its vocabulary has {h.vocab_size} tokens, the model's "
                          f"{vocab_size} (a draft model needs the model's vocabulary)")
    if vocab is not None and draft_vocab is not None:
        for i, (a, b) in enumerate(zip(draft_vocab, vocab)):
            if a != b:
                raise ConfigError(f"--draft-model {path}: its vocabulary differs from the model's at token {i} "
                                  f"({a.decode('utf-8', 'replace')!r}, the model's "
                                  f"{b.decode('utf-8', 'replace')!r}); a draft model needs the model's vocabulary")
