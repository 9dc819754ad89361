"""The grammar masks: constrained decoding (JSON schema, JSON object) with llguidance.

Per model, one `Grammars`: an llguidance tokenizer built once from our tokenizer's token byte
strings (special tokens get llguidance's 0xFF prefix, so that no grammar literal can produce them),
its mask as wide as the logits row (the model's vocab_size may exceed the tokenizer's). Per request,
`Grammars.compile(response_format)` turns a schema into a checked grammar under size and fuel caps:
a schema that is too large, too deep, unsupported, contradictory or that admits no value is one
GrammarError naming the problem, before any token. Per sequence, a `Matcher` (one per choice: n
choices are copies of the first) writes the next token's mask (one bit per token id, llguidance's
int32 words: bit i of word i // 32) and advances on each sampled token; `rollback` undoes tokens
(speculative decoding).

The mask is applied to the logits before anything reads them (engine.Engine._logits: every rank on
its vocabulary slice, kernels/logits.c dl_apply_token_mask): temperature, top-p, the sample and the
log-probabilities all see the masked row. EOS is allowed only where the grammar accepts.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .errors import DllamaError

MAX_SCHEMA_BYTES = 64 << 10      # a schema's JSON text; larger ones are refused before compiling
MAX_SCHEMA_DEPTH = 64            # nesting of JSON objects/arrays in the schema document itself
MAX_LARK_BYTES = 256 << 10       # a tool-call grammar (tools.py): every tool's parameters schema and the markup
# a `pattern` whose counted repetitions expand past this many atoms, or that repeats a part with an
# unbounded repetition more than MAX_REPEAT_OF_UNBOUNDED times ((.*){1000}), is refused: llguidance's
# lexer would build its states lazily, token after token, and fail in the middle of an answer
MAX_PATTERN_SIZE = 100_000
MAX_REPEAT_OF_UNBOUNDED = 32
# fuel caps (llguidance's units: ~50k of lexer fuel per ms): a hostile schema fails fast instead of
# stalling the server, a legitimate one (enums of a few thousand values, nested objects) compiles
LIMITS = dict(initial_lexer_fuel=2_000_000, step_lexer_fuel=400_000, step_max_items=100_000,
              max_lexer_states=100_000, max_grammar_size=200_000, verbose_errors=False)
# the JSON text the grammar admits: separators as json.dumps writes them, no other whitespace (a
# small model cannot loop on blanks, and every answer parses the same way)
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class GrammarError(DllamaError):
    """A response format the engine cannot compile into a grammar (the message names the problem)."""


def _lib():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401 (the mask helpers)
    except ImportError as e:   # a dependency of the package; only missing in a broken install
        raise GrammarError(f"structured output needs the llguidance package ({e})") from None
    return llguidance


def _depth(x, limit: int) -> int:
    """Nesting depth of a JSON document, stopping past `limit` (no recursion: any depth is safe)."""
    stack, deepest = [(x, 1)], 0
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(v, dict):
            stack.extend((c, d + 1) for c in v.values())
        elif isinstance(v, list):
            stack.extend((c, d + 1) for c in v)
    return deepest


def _patterns(schema):
    """Every regular expression of a schema document: `pattern` values, `patternProperties` keys."""
    stack = [schema]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if isinstance(v.get("pattern"), str):
                yield v["pattern"]
            if isinstance(v.get("patternProperties"), dict):
                yield from v["patternProperties"]
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def check_pattern(pattern: str) -> None:
    """GrammarError for a pattern whose expansion is too large (MAX_PATTERN_SIZE,
    MAX_REPEAT_OF_UNBOUNDED). Read with Python's own regex parser; what it cannot read is left to
    llguidance, which refuses what it does not support."""
    try:
        from re import _parser as sre
    except ImportError:         # Python 3.10
        import sre_parse as sre
    try:
        tree = sre.parse(pattern)
    except Exception:           # noqa: BLE001 (not Python syntax: llguidance decides)
        return

    def size(sub) -> tuple[int, bool]:
        """(atoms the expansion holds, whether it repeats something without bound)"""
        total, unbounded = 0, False
        for op, av in sub:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                lo, hi, inner = av
                n, inner_unb = size(inner)
                if hi == sre.MAXREPEAT:
                    total, unbounded = total + n, True
                    continue
                if inner_unb and hi > MAX_REPEAT_OF_UNBOUNDED:
                    raise GrammarError(f"the pattern {pattern[:60]!r} repeats an unbounded part {hi} times "
                                       f"(at most {MAX_REPEAT_OF_UNBOUNDED})")
                total, unbounded = total + n * hi, unbounded or inner_unb
            elif name == "SUBPATTERN":
                n, u = size(av[-1])
                total, unbounded = total + n, unbounded or u
            elif name == "BRANCH":
                for alt in av[1]:
                    n, u = size(alt)
                    total, unbounded = total + n, unbounded or u
            else:
                total += 1
            if total > MAX_PATTERN_SIZE:
                raise GrammarError(f"the pattern {pattern[:60]!r} expands to more than {MAX_PATTERN_SIZE} "
                                   f"characters")
        return total, unbounded

    size(tree)


def check_schema(schema: dict, what: str = "the JSON schema") -> None:
    """GrammarError for a schema over the caps: its text size, its nesting, its patterns."""
    text = json.dumps(schema, separators=(",", ":"))
    if len(text) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"{what} is {len(text)} bytes; at most {MAX_SCHEMA_BYTES} are accepted")
    if _depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"{what} is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    for p in _patterns(schema):
        check_pattern(p)


def schema_of(response_format) -> dict | None:
    """The JSON schema a response_format asks for: None for {type: text} (no grammar), {type:
    object} for json_object, json_schema.schema for json_schema. GrammarError for anything else."""
    if not isinstance(response_format, dict):
        raise GrammarError("'response_format' must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema", {"type": "object"})   # llama.cpp's extension: a schema here
    elif kind == "json_schema":
        js = response_format.get("json_schema")
        if not isinstance(js, dict):
            raise GrammarError("'response_format.json_schema' must be an object with 'name' and 'schema'")
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise GrammarError("'response_format.json_schema.name' must be a string")
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise GrammarError("'response_format.json_schema.strict' must be a boolean")
        schema = js.get("schema", {})
    else:
        raise GrammarError(f"'response_format.type' must be text, json_object or json_schema, got {kind!r}")
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object")
    return schema


class Grammar:
    """A compiled, checked grammar and a fresh matcher over it (`matcher()` hands out copies)."""

    def __init__(self, grammars: "Grammars", text: str, first):
        self.grammars, self.text, self._first = grammars, text, first

    def matcher(self) -> "Matcher":
        return Matcher(self.grammars, self._first.deep_copy())


class Grammars:
    """A model's llguidance tokenizer (built on first use, ~0.5 s for 50k tokens) and compiler."""

    def __init__(self, tokenizer, n_vocab: int):
        self.tokenizer, self.n_vocab = tokenizer, int(n_vocab)
        self.words = (self.n_vocab + 31) // 32        # int32 words of one mask
        self._lt = None
        self._lock = threading.Lock()
        self._pool = None

    @property
    def lltokenizer(self):
        with self._lock:
            if self._lt is None:
                self._lt = self._build()
            return self._lt

    def _build(self):
        llg = _lib()
        tok, n_vocab = self.tokenizer, self.n_vocab
        eos = [i for i in tok.eos_ids if 0 <= i < self.n_vocab]
        if not eos:
            raise GrammarError("structured output needs an end-of-sequence token; the tokenizer has none")

        class Vocab:   # what llguidance.TokenizerWrapper reads
            # ids past the tokenizer's (logits rows may be wider) are special: no grammar allows them
            tokens = [b"\xff" + v if tok.is_special(i) else v for i, v in enumerate(tok.vocab)] + \
                [b"\xff<|pad %d|>" % i for i in range(tok.vocab_size, n_vocab)]
            eos_token_id = eos[0]
            bos_token_id = tok.bos_id if 0 <= tok.bos_id < tok.vocab_size else None
            special_token_ids = tok.special_ids

            def __call__(self, b: bytes) -> list[int]:
                return tok.encode(b.decode("utf-8", errors="replace"), add_bos=False, parse_special=False)

        lt = llg.LLTokenizer(llg.TokenizerWrapper(Vocab()), n_vocab=n_vocab, eos_token=eos)
        if lt.vocab_size != n_vocab:
            raise GrammarError(f"llguidance built a vocabulary of {lt.vocab_size} tokens for {n_vocab} logits")
        return lt

    def limits(self):
        return _lib().LLParserLimits(**LIMITS)

    def compile(self, response_format) -> Grammar | None:
        """The grammar of a response_format (None: free text). GrammarError naming the problem when
        it cannot be compiled, is over the caps, or admits no output at all. Slow for large schemas
        (the caps keep it under a second); llguidance drops the GIL meanwhile."""
        schema = schema_of(response_format)
        if schema is None:
            return None
        return self.compile_schema(schema)

    def compile_schema(self, schema: dict) -> Grammar:
        check_schema(schema)
        llg = _lib()
        text = json.dumps(schema, separators=(",", ":"))
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        except (ValueError, RuntimeError) as e:
            raise GrammarError(f"invalid JSON schema: {_first_line(e)}") from None
        return self._checked(grammar, "JSON schema")

    def compile_lark(self, text: str, what: str) -> Grammar:
        """A Lark grammar (llguidance's dialect: %json {...} inlines a schema), built by our own code
        from checked parts (tools.py); `what` names it in errors."""
        if len(text) > MAX_LARK_BYTES:
            raise GrammarError(f"the {what} make a grammar of {len(text)} bytes; at most {MAX_LARK_BYTES} "
                               f"are accepted")
        llg = _lib()
        try:
            grammar = llg.LLMatcher.grammar_from_lark(text)
        except (ValueError, RuntimeError) as e:
            raise GrammarError(f"invalid {what}: {_first_line(e)}") from None
        return self._checked(grammar, what)

    def from_text(self, text: str) -> Grammar:
        """A grammar another process compiled (Grammar.text: llguidance's serialized grammar,
        independent of the tokenizer), checked again here (serve's backend)."""
        return self._checked(text, "grammar")

    def _checked(self, grammar: str, what: str) -> Grammar:
        """The grammar validated under the caps, its first mask computed (a grammar that admits no
        output, such as a $ref loop, fails there)."""
        llg = _lib()
        lt, limits = self.lltokenizer, self.limits()
        err = llg.LLMatcher.validate_grammar(grammar, lt, limits=limits)
        if err:
            raise GrammarError(f"unsupported {what}: {_first_line(err)}")
        m = llg.LLMatcher(lt, grammar, log_level=0, limits=limits)
        if not m.is_error():   # the first mask: a schema no value satisfies (a $ref loop) fails here
            mask = np.zeros((1, self.words), np.int32)
            llg.numpy.fill_next_token_bitmask(m, mask, 0)
            if m.is_error() or m.is_stopped():
                raise GrammarError(f"the {what} admits no value ({_first_line(m.get_error()) or 'empty'})")
        if m.is_error():
            raise GrammarError(f"unsupported {what}: {_first_line(m.get_error())}")
        return Grammar(self, grammar, m)

    # ---- masks for a pass ------------------------------------------------------------------

    def fill(self, matchers, out: np.ndarray) -> None:
        """The next-token masks of matchers[i] into out[i] (int32 [n, words]), one after the other on
        the calling thread: a mask takes 10-300 µs, and llguidance's parallel fill runs a thread pool
        whose idle workers spin, taking cores from the pass's own threads (SmolLM2, 8 constrained
        streams at 2 ranks on 2 cores: 0.895 of the free streams' speed with it, see BENCHMARKS.md)."""
        fill = _lib().numpy.fill_next_token_bitmask
        for i, m in enumerate(matchers):
            fill(m.m, out, i)

    def fill_async(self, matchers, out: np.ndarray) -> Future:
        """fill() on a helper thread (llguidance drops the GIL): the root computes the masks while the
        pass runs its layers, and waits for them only when the logits need them."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        return self._pool.submit(self.fill, matchers, out)


def _first_line(e) -> str:
    """llguidance's message on one line (its regex errors span several, with a caret line)."""
    text = str(e).replace("<non-verbose/>", "")
    lines = [x.strip() for x in text.splitlines() if x.strip() and set(x.strip()) != {"^"}]
    return " ".join(lines)[:300]


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, grammars: Grammars, m):
        self.grammars, self.m = grammars, m

    def copy(self) -> "Matcher":
        return Matcher(self.grammars, self.m.deep_copy())

    def fill(self, out: np.ndarray) -> None:
        """The next token's mask into out (int32 [words])."""
        _lib().numpy.fill_next_token_bitmask(self.m, out.reshape(1, -1), 0)

    def consume(self, token: int) -> bool:
        """Advance on a sampled token; False (and the matcher in error) if the grammar forbids it."""
        return self.m.consume_token(int(token))

    def rollback(self, n: int) -> bool:
        return self.m.rollback(int(n))

    @property
    def accepting(self) -> bool:
        return self.m.is_accepting()

    @property
    def stopped(self) -> bool:
        """No token but EOS may follow (the value is complete), or the matcher is in error."""
        return self.m.is_stopped()

    @property
    def error(self) -> str:
        return _first_line(self.m.get_error()) if self.m.is_error() else ""


def read_schema(path: str, what: str) -> dict:
    """A JSON schema file (inference --json-schema, chat's /json): one ConfigError line naming the
    option and the file unless it holds a JSON object."""
    from .errors import ConfigError
    from .startup import read_text_file

    try:
        schema = json.loads(read_text_file(path))
    except ConfigError as e:   # unreadable, or not UTF-8: its line, under the option's name
        raise ConfigError(f"{what} {e}") from None
    except ValueError as e:
        raise ConfigError(f"{what} {path}: not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{what} {path}: a JSON schema must be a JSON object")
    return schema


def allowed(mask: np.ndarray, token: int) -> bool:
    """Whether a mask (int32 words) lets `token` through."""
    return bool((int(mask[token >> 5]) >> (token & 31)) & 1)
