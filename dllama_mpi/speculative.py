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
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

SPEC_METHODS = ("none", "ngram")
DRAFT_MAX = 16      # llama.cpp's --draft-max default
DRAFT_MIN = 1       # a proposal shorter than this is not verified
NGRAM_MIN, NGRAM_MAX = 1, 3   # lookup n-gram sizes (prompt lookup decoding's max_ngram_size 3)
START_K = 4         # drafted tokens a sequence starts with; then +2 after a fully accepted draft, -1 otherwise
MAX_BACKOFF = 16    # passes a sequence skips speculation after repeated drafts with nothing accepted


@dataclass(frozen=True)
class SpecConfig:
    """How the scheduler speculates: method "none" (plain decoding) or "ngram"; a sequence drafts at
    most draft_max tokens per pass and verifies no proposal shorter than draft_min."""

    method: str = "none"
    draft_max: int = DRAFT_MAX
    draft_min: int = DRAFT_MIN

    def __post_init__(self):
        check_spec(self.method, self.draft_max, self.draft_min)

    @property
    def on(self) -> bool:
        return self.method != "none"

    def with_draft(self, n_max: int | None, n_min: int | None) -> "SpecConfig":
        """A request's own draft sizes (llama.cpp server's speculative.n_max / n_min): n_max 0 turns
        speculation off for it; the method stays the server's (--spec none: none)."""
        if not self.on or (n_max is None and n_min is None):
            return self
        if n_max == 0:
            return SpecConfig()
        n_max = self.draft_max if n_max is None else n_max
        return SpecConfig(self.method, n_max, min(self.draft_min if n_min is None else n_min, n_max))


def check_spec(method: str, draft_max: int, draft_min: int) -> None:
    if method not in SPEC_METHODS:
        raise ConfigError(f"--spec {method!r}: not one of {', '.join(SPEC_METHODS)}")
    if draft_max < 1:
        raise ConfigError(f"--draft-max must be >= 1, got {draft_max}")
    if not 0 <= draft_min <= draft_max:
        raise ConfigError(f"--draft-min must be in 0..--draft-max ({draft_max}), got {draft_min}")


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
    """One sequence's speculation state: its drafter, how many tokens it drafts next (adaptive: +2
    after a fully accepted draft, -1 after a partly rejected one, as Hugging Face's assisted
    generation does), and a back-off after drafts that had nothing accepted (open text: the next
    1, 2, 4 ... MAX_BACKOFF passes decode plainly, so speculation that does not pay costs little)."""

    def __init__(self, cfg: SpecConfig):
        self.cfg = cfg
        self.drafter = NgramDrafter()
        self.k = min(START_K, cfg.draft_max)
        self.skip = 0       # passes left without speculation
        self.backoff = 0    # the next back-off after a draft with nothing accepted

    def propose(self, prompt, generated, k_cap: int) -> list[int]:
        """The draft for the next pass (tokens after generated[-1]); [] to decode plainly."""
        d = self.drafter
        n_prompt = len(prompt)
        if len(d.tokens) < n_prompt:
            d.extend(prompt[len(d.tokens):])
        d.extend(generated[len(d.tokens) - n_prompt:])
        if self.skip:
            self.skip -= 1
            return []
        k = min(self.k, k_cap)
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
