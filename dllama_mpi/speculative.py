"""The speculative drafters: cheap guesses of a sequence's next tokens, which the scheduler verifies
in one forward pass (its k drafted tokens become k + 1 rows of the sequence; scheduler.py).

Verification is sample-and-match (llama.cpp's `common_sampler_sample_and_accept_n`): the sampler
draws at each verified row exactly as plain decoding would, one draw per emitted token, and the run
goes on while the drawn token equals the draft; the first token that differs is emitted too. Since a
row's logits do not depend on the other rows of its pass (batch-invariant kernels), the emitted
tokens are those of plain decoding, greedy or seeded; a drafter decides only how many come per pass.

- `ngram`: prompt lookup over the sequence's own tokens (prompt + generated so far), as llama.cpp's
  `llama-lookup` / vLLM's `ngram` method: the longest of the last NGRAM_MAX..NGRAM_MIN tokens that
  occurred before proposes what followed its most recent occurrence. No weights, no network.
- `draft`: a smaller (or lower-precision) model with the same vocabulary, run whole on the root
  (`DraftModel`: an Engine over a one-rank communicator with its own KV pages per sequence), so
  drafting costs no collective round. It drafts greedily, and stops where its top token's
  probability falls below --draft-p-min (llama.cpp's `common_speculative_gen_draft`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from .errors import ConfigError, DllamaError

SPEC_METHODS = ("none", "ngram", "draft")
DRAFT_MAX = 16      # llama.cpp's --draft-max default
DRAFT_MIN = 1       # a proposal shorter than this is not verified
DRAFT_P_MIN = 0.75  # llama.cpp's --draft-p-min default (common_params_speculative.p_min)
NGRAM_MIN, NGRAM_MAX = 1, 3   # lookup n-gram sizes (prompt lookup decoding's max_ngram_size 3)
START_K = 4         # drafted tokens a sequence starts with; then +2 after a fully accepted draft, -1 otherwise
MAX_BACKOFF = 16    # passes a sequence skips speculation after repeated drafts with nothing accepted


@dataclass(frozen=True)
class SpecConfig:
    """How the scheduler speculates: method "none" (plain decoding), "ngram" or "draft" (the model of
    draft_model, loaded at start-up: startup.start); a sequence drafts at most draft_max tokens per
    pass and verifies no proposal shorter than draft_min; a draft model stops drafting where its top
    token's probability is below p_min."""

    method: str = "none"
    draft_max: int = DRAFT_MAX
    draft_min: int = DRAFT_MIN
    p_min: float = DRAFT_P_MIN
    draft_model: str | None = None

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
    """Prompt lookup for one sequence. index[n] maps every n-gram whose next token is known to the
    position of that next token (its most recent occurrence), so feeding a token and proposing cost
    O(NGRAM_MAX), not a scan of the context."""

    def __init__(self, n_min: int = NGRAM_MIN, n_max: int = NGRAM_MAX):
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        self.index: list[dict] = [{} for _ in range(n_max + 1)]

    def extend(self, tokens) -> None:
        toks, index = self.tokens, self.index
        for t in tokens:
            end = len(toks)
            for n in range(self.n_min, min(self.n_max, end) + 1):   # n-grams ending at end-1: t follows them
                index[n][tuple(toks[end - n:end])] = end
            toks.append(int(t))

    def propose(self, k: int) -> list[int]:
        """k tokens that followed the most recent earlier occurrence of the longest matching suffix
        (NGRAM_MAX down to NGRAM_MIN tokens); [] when none occurred before. Where that continuation
        reaches the end of the context, the text is taken to repeat with the period it has (a loop)."""
        toks = self.tokens
        end = len(toks)
        for n in range(min(self.n_max, end), self.n_min - 1, -1):
            j = self.index[n].get(tuple(toks[end - n:end]))
            if j is not None:
                if j + k <= end:
                    return toks[j:j + k]
                period = end - j
                return [toks[j + m % period] for m in range(k)]
        return []


class SeqSpec:
    """One sequence's speculation state: its drafter (ngram: its n-gram index; draft: its pages in the
    draft model's KV cache), how many tokens it drafts next (adaptive: +2 after a fully accepted
    draft, -1 after a partly rejected one, as Hugging Face's assisted generation does), and a
    back-off after drafts that had nothing accepted (the next 1, 2, 4 ... MAX_BACKOFF passes decode
    plainly, so speculation that does not pay costs little)."""

    def __init__(self, cfg: SpecConfig):
        self.cfg = cfg
        self.drafter = NgramDrafter() if cfg.method == "ngram" else None
        self.draft_kv = None   # draft: this sequence's kvcache.SeqKV in the draft model's cache ...
        self.draft_synced = 0  # ... whose first rows are known to be the sequence's own tokens
        self.k = min(START_K, cfg.draft_max)
        self.skip = 0       # passes left without speculation
        self.backoff = 0    # the next back-off after a draft with nothing accepted

    def next_k(self, k_cap: int) -> int:
        """How many tokens to draft for the next pass (0: decode plainly)."""
        if self.skip:
            self.skip -= 1
            return 0
        return max(min(self.k, k_cap), 0)

    def propose(self, prompt, generated, k_cap: int) -> list[int]:
        """ngram: the draft for the next pass (tokens after generated[-1]); [] to decode plainly."""
        d = self.drafter
        n_prompt = len(prompt)
        if len(d.tokens) < n_prompt:
            d.extend(prompt[len(d.tokens):])
        d.extend(generated[len(d.tokens) - n_prompt:])
        k = self.next_k(k_cap)
        draft = d.propose(k) if k > 0 else []
        return draft if len(draft) >= max(self.cfg.draft_min, 1) else []

    def verified(self, drafted: int, accepted: int) -> None:
        """After a verify pass: adapt k, back off after a draft that had nothing accepted."""
        if accepted == drafted:
            self.k = min(self.k + 2, self.cfg.draft_max)
        else:
            self.k = max(self.k - 1, 1)
        if accepted == 0:
            self.backoff = min(max(2 * self.backoff, 1), MAX_BACKOFF)
            self.skip = self.backoff
        else:
            self.backoff = 0


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
