"""Exact byte-level BPE tokenizer over a Distributed Llama `.t` vocabulary (FORMATS.md §3-§4).

Distributed Llama's own encoder (§4.2) has no pre-tokenizer split, so BPE merges cross word
boundaries and it disagrees with Hugging Face / llama.cpp on about a third of llama.cpp's test
vectors. This encoder does what HF does:

1. special tokens in the text are cut out first (longest match at each position) when
   ``parse_special`` is true;
2. every stretch between them is (for ``qwen2``) NFC-normalised, then split by the model's
   pre-tokenizer regex (the ``regex`` module);
3. each piece is UTF-8 encoded and BPE'd tiktoken-style: repeatedly merge the adjacent pair whose
   concatenation is a regular token of best rank. Rank order = higher score first, lower id on
   ties; converted HF files store ``score = -id``, so the rank is the id (= merge order).
   For ``llama3`` a piece that is itself a token is emitted as is (HF ``ignore_merges``).

``pretokenizer="spm"`` (chosen whenever the `.t` file carries token types, FORMATS-EXT.md) is
llama.cpp's SentencePiece tokenizer (``tokenizer.ggml.model = llama``, e.g. Gemma 3), see
`SentencePiece`.

``pretokenizer="dllama"`` instead copies dllama's exact algorithm (§4.2: specials = ids >= bos_id
matched first-in-id-order, no split, no NFC, merges across words) to reproduce its ids.

Pre-tokenizer auto-detection (the `.t` format has no field for it), first rule that applies:

* ``<|begin_of_text|>`` in the vocabulary -> ``llama3`` (Llama 3.x);
* ``<|endoftext|>`` is token 0 and ``<|im_start|>`` exists -> ``smollm`` (SmolLM / SmolLM2:
  specials at ids 0-16, digits split one by one, then the GPT-2 regex);
* ``<|im_start|>`` and ``<|endoftext|>`` in the vocabulary -> ``qwen2`` (Qwen 1.5/2/2.5/3,
  DeepSeek-R1-Distill-Qwen: single-digit split + NFC);
* scores are not exactly ``-id`` (a SentencePiece conversion, e.g. Llama 2) -> ``none``
  (BPE by score over each text stretch, no split);
* otherwise by the longest all-digit regular token: 3 -> ``llama3`` (a Llama 3 derived
  vocabulary, e.g. DeepSeek-R1-Distill-Llama), 1 -> ``qwen2``, anything else -> ``gpt2``.

Special tokens (never produced by BPE, matched literally when ``parse_special``): the union of

* every id >= bos_id when bos_id >= 256 (dllama's rule, right for Llama 3, Qwen and the tiny
  fixtures whose added tokens are appended at the end; skipped when bos sits at the start of the
  vocabulary, as in SmolLM2 or SentencePiece files, where it would mark everything special);
* bos and every eos id;
* every token whose text looks like a control token: ``<|...|>`` or ``<｜...｜>`` without
  whitespace inside (e.g. SmolLM2's ``<|im_start|>`` wherever it sits);
* the leading block of ids 0, 1, 2, ... whose texts all are ``<...>`` without whitespace
  (SmolLM2's 17 specials ``<|endoftext|>`` ... ``<empty_output>``; SentencePiece's
  ``<unk>``, ``<s>``, ``</s>``); the block ends at the first token that is not of that form.

Decoding: bos decodes to nothing, other special tokens to their text (unless ``skip_special``),
regular tokens to their raw bytes; bytes are joined and decoded as UTF-8 with U+FFFD for invalid
sequences. Ids outside ``[0, vocab_size)`` raise ``ValueError`` (never silently replaced: such an
id means a bug in the caller, e.g. a model whose vocab is larger than the tokenizer's).
"""

from __future__ import annotations

import codecs
import heapq
import os
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import regex

from .errors import ConfigError
from .formats import TokenizerData, read_tokenizer

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
DIGIT_PATTERN = r"\p{N}"

PRETOKENIZERS = ("llama3", "qwen2", "smollm", "gpt2", "none", "dllama", "spm")

_CONTROL_RE = regex.compile(r"<\|[^\s]+\|>|<｜[^\s]+｜>")
_ANGLE_RE = regex.compile(r"<[^\s<>]+>")

_CACHE_MAX = 100_000
_LONG_PIECE = 48          # pieces longer than this (bytes) use the heap-based merge loop


def _text(b: bytes) -> str | None:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def detect_pretokenizer(data: TokenizerData) -> str:
    """The pre-tokenizer kind for a vocabulary (rules in the module docstring)."""
    if data.token_types is not None:
        return "spm"
    vocab = data.vocab
    present = {b"<|begin_of_text|>": False, b"<|im_start|>": False, b"<|endoftext|>": False}
    for tok in vocab:
        if tok in present:
            present[tok] = True
    if present[b"<|begin_of_text|>"]:
        return "llama3"
    if present[b"<|im_start|>"] and vocab and vocab[0] == b"<|endoftext|>":
        return "smollm"
    if present[b"<|im_start|>"] and present[b"<|endoftext|>"]:
        return "qwen2"
    n = len(vocab)
    if not np.array_equal(np.asarray(data.scores, dtype=np.float32), -np.arange(n, dtype=np.float32)):
        return "none"
    longest = max((len(t) for t in vocab if t.isdigit()), default=0)
    if longest == 3:
        return "llama3"
    if longest == 1:
        return "qwen2"
    return "gpt2"


def _special_ids(data: TokenizerData) -> set[int]:
    n = len(data.vocab)
    special: set[int] = set()
    if 256 <= data.bos_id < n:
        special.update(range(data.bos_id, n))
    for i in [data.bos_id, *data.eos_ids]:
        if 0 <= i < n:
            special.add(i)
    for i, tok in enumerate(data.vocab):
        if tok[:1] == b"<" and len(tok) >= 4:
            t = _text(tok)
            if t is not None and _CONTROL_RE.fullmatch(t):
                special.add(i)
    for i, tok in enumerate(data.vocab):
        t = _text(tok)
        if t is None or not _ANGLE_RE.fullmatch(t):
            break
        special.add(i)
    return special


class Tokenizer:
    """Encoder/decoder over a `.t` vocabulary. See the module docstring for the rules."""

    def __init__(self, data: TokenizerData, pretokenizer: str | None = None, nfc: bool | None = None):
        if pretokenizer is None:
            pretokenizer = detect_pretokenizer(data)
        if pretokenizer not in PRETOKENIZERS:
            raise ConfigError(f"unknown pre-tokenizer {pretokenizer!r} (choose from {', '.join(PRETOKENIZERS)})")
        self.data = data
        self.pretokenizer = pretokenizer
        self.vocab: list[bytes] = data.vocab
        self.vocab_size = len(data.vocab)
        self.bos_id = data.bos_id
        self.eos_ids = list(data.eos_ids)
        self.add_bos = bool(data.add_bos)
        self.chat_template = data.chat_template
        n = self.vocab_size

        self._spm = None
        if pretokenizer == "spm":
            if data.token_types is None:
                raise ConfigError("pre-tokenizer 'spm' needs a tokenizer file with token types (FORMATS-EXT.md)")
            self._spm = SentencePiece(data)
            self._special = self._spm.special_ids
        elif pretokenizer == "dllama":
            self._special = set(range(max(data.bos_id, 0), n)) if data.bos_id >= 0 else set()
        else:
            self._special = _special_ids(data)
        self._special_flags = np.zeros(n, dtype=bool)
        if self._special:
            self._special_flags[np.fromiter(self._special, dtype=np.int64)] = True

        self._decode_bytes: list[bytes] = list(data.vocab)
        if 0 <= self.bos_id < n:
            self._decode_bytes[self.bos_id] = b""
        sflags = self._special_flags.tolist()
        self._decode_bytes_skip = [b"" if sflags[i] else tok for i, tok in enumerate(self._decode_bytes)]
        if self._spm is not None:
            self._lookup = self._spm.lookup
            return

        # Rank of every token: higher score first, lower id on ties (dllama mode: score only, the
        # leftmost pair wins ties, which the merge loop already does for equal ranks).
        scores = np.asarray(data.scores, dtype=np.float64)
        ids = np.arange(n)
        if pretokenizer == "dllama":
            _, rank_arr = np.unique(-scores, return_inverse=True)
        else:
            order = np.lexsort((ids, -scores))
            rank_arr = np.empty(n, dtype=np.int64)
            rank_arr[order] = ids
        rank_list = rank_arr.tolist()

        # Regular tokens: bytes -> rank and bytes -> id, inserted worst rank first, best rank last, so
        # that the best-ranked of duplicate byte strings wins.
        order = np.argsort(rank_arr, kind="stable")[::-1]
        order = order[~self._special_flags[order]].tolist()
        vocab = data.vocab
        toks = [vocab[i] for i in order]
        self._ranks: dict[bytes, int] = dict(zip(toks, [rank_list[i] for i in order]))
        self._encoder: dict[bytes, int] = dict(zip(toks, order))
        self._byte_tokens = [bytes([b]) in self._encoder for b in range(256)]
        self._all_bytes = all(self._byte_tokens)
        # All tokens: bytes -> lowest id (token_to_id).
        self._lookup: dict[bytes, int] = dict(zip(reversed(vocab), range(n - 1, -1, -1)))

        # Special tokens matched in text.
        specials = []
        for i in sorted(self._special):
            t = _text(data.vocab[i])
            if t:
                specials.append((t, i))
        if pretokenizer == "dllama":
            self._special_list = specials                     # id order, first match wins
            self._special_map = {}
            self._special_re = None
        else:
            self._special_list = specials
            self._special_map = {}
            for t, i in specials:
                self._special_map.setdefault(t, i)
            alts = sorted(self._special_map, key=lambda s: (-len(s), s))
            self._special_re = re.compile("|".join(re.escape(s) for s in alts)) if alts else None

        self._ignore_merges = pretokenizer == "llama3"
        # NFC as Hugging Face's Qwen2 tokenizer does (the default); a GGUF's tokenizer passes False,
        # since llama.cpp does not normalise and its ids are what that file is expected to give
        self._nfc = pretokenizer == "qwen2" if nfc is None else nfc
        self._digits_re = regex.compile(DIGIT_PATTERN) if pretokenizer == "smollm" else None
        pattern = {"llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN, "smollm": GPT2_PATTERN,
                   "gpt2": GPT2_PATTERN}.get(pretokenizer)
        self._split_re = regex.compile(pattern) if pattern else None
        self._cache: dict[bytes, tuple[int, ...]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, pretokenizer: str | None = None) -> "Tokenizer":
        return cls(read_tokenizer(path), pretokenizer)

    # ------------------------------------------------------------------ info

    def is_special(self, token_id: int) -> bool:
        return bool(self._special_flags[self._check(token_id)])

    @property
    def special_ids(self) -> list[int]:
        return sorted(self._special)

    def token_bytes(self, token_id: int) -> bytes:
        return self.vocab[self._check(token_id)]

    def token_to_id(self, text: str | bytes) -> int | None:
        """The id of the token whose text is exactly `text` (lowest id if several), else None."""
        b = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return self._lookup.get(b)

    def id_of(self, text: str | bytes) -> int:
        i = self.token_to_id(text)
        if i is None:
            raise KeyError(f"no token {text!r} in the vocabulary")
        return i

    @property
    def eos_texts(self) -> list[str]:
        return [self.vocab[i].decode("utf-8", errors="replace") for i in self.eos_ids if 0 <= i < self.vocab_size]

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, pretokenizer={self.pretokenizer!r}, "
                f"bos_id={self.bos_id}, eos_ids={self.eos_ids}, specials={len(self._special)})")

    # ------------------------------------------------------------------ encode

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; bos first when `add_bos` (default: the file's add_bos flag)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(f"prompt is not valid UTF-8 (unpaired surrogate {text[e.start]!r} at index {e.start})") from None
        if add_bos is None:
            add_bos = self.add_bos
        out: list[int] = []
        if add_bos and 0 <= self.bos_id < self.vocab_size:
            out.append(self.bos_id)
        if self._spm is not None:
            self._spm.encode(text, parse_special, out)
            return out
        if self.pretokenizer == "dllama":
            self._encode_dllama(text, parse_special, out)
            return out
        if parse_special and self._special_re is not None:
            pos = 0
            for m in self._special_re.finditer(text):
                if m.start() > pos:
                    self._encode_ordinary(text[pos:m.start()], out)
                out.append(self._special_map[m.group()])
                pos = m.end()
            if pos < len(text):
                self._encode_ordinary(text[pos:], out)
        else:
            self._encode_ordinary(text, out)
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode without bos and without special-token parsing."""
        return self.encode(text, add_bos=False, parse_special=False)

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        if self._split_re is None:
            out.extend(self._bpe(text.encode("utf-8")))
            return
        if self._digits_re is not None:
            pieces = []
            pos = 0
            for m in self._digits_re.finditer(text):
                if m.start() > pos:
                    pieces.extend(self._split_re.findall(text[pos:m.start()]))
                pieces.append(m.group())
                pos = m.end()
            if pos < len(text):
                pieces.extend(self._split_re.findall(text[pos:]))
        else:
            pieces = self._split_re.findall(text)
        cache = self._cache
        for piece in pieces:
            b = piece.encode("utf-8")
            ids = cache.get(b)
            if ids is None:
                ids = self._bpe(b)
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                cache[b] = ids
            out.extend(ids)

    def _initial_parts(self, piece: bytes) -> list[bytes]:
        if self._all_bytes:
            return [piece[i:i + 1] for i in range(len(piece))]
        # Vocabularies without every single byte (SentencePiece without byte fallback): grow a
        # pending buffer until it is a token, as dllama does.
        parts, start = [], 0
        for end in range(1, len(piece) + 1):
            if piece[start:end] in self._ranks:
                parts.append(piece[start:end])
                start = end
        if start < len(piece):
            raise ConfigError(f"cannot encode bytes {piece[start:]!r}: no token in the vocabulary covers them")
        return parts

    def _bpe(self, piece: bytes) -> tuple[int, ...]:
        enc = self._encoder
        if not piece:
            return ()
        if self._ignore_merges or len(piece) == 1:
            i = enc.get(piece)
            if i is not None:
                return (i,)
        parts = self._initial_parts(piece)
        if len(parts) > _LONG_PIECE:
            parts = self._merge_heap(parts)
        else:
            ranks = self._ranks
            while len(parts) > 1:
                best = None
                bi = -1
                for i in range(len(parts) - 1):
                    r = ranks.get(parts[i] + parts[i + 1])
                    if r is not None and (best is None or r < best):
                        best, bi = r, i
                if best is None:
                    break
                parts[bi:bi + 2] = [parts[bi] + parts[bi + 1]]
        return tuple(enc[p] for p in parts)

    def _merge_heap(self, parts: list[bytes]) -> list[bytes]:
        """Same result as the simple loop (best rank first, leftmost on ties) in O(n log n)."""
        ranks = self._ranks
        n = len(parts)
        val = list(parts)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            r = ranks.get(val[i] + val[i + 1])
            if r is not None:
                heap.append((r, i, val[i], val[i + 1]))
        heapq.heapify(heap)
        while heap:
            r, i, left, right = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or val[i] is not left or val[j] is not right:
                continue                      # stale entry
            merged = left + right
            val[i] = merged
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            p = prv[i]
            if p >= 0:
                r2 = ranks.get(val[p] + merged)
                if r2 is not None:
                    heapq.heappush(heap, (r2, p, val[p], merged))
            k = nxt[i]
            if k < n:
                r2 = ranks.get(merged + val[k])
                if r2 is not None:
                    heapq.heappush(heap, (r2, i, merged, val[k]))
        return [val[i] for i in range(n) if alive[i]]

    def _encode_dllama(self, text: str, parse_special: bool, out: list[int]) -> None:
        """dllama's Tokenizer::encode (FORMATS §4.2): first special in id order, no split."""
        if not parse_special or not self._special_list:
            out.extend(self._bpe(text.encode("utf-8")))
            return
        specials = self._special_list
        firsts = {t[0] for t, _ in specials}
        pos, seg = 0, 0
        while pos < len(text):
            if text[pos] in firsts:
                for t, i in specials:
                    if text.startswith(t, pos):
                        out.extend(self._bpe(text[seg:pos].encode("utf-8")))
                        out.append(i)
                        pos += len(t)
                        seg = pos
                        break
                else:
                    pos += 1
            else:
                pos += 1
        out.extend(self._bpe(text[seg:].encode("utf-8")))

    # ------------------------------------------------------------------ decode

    def _check(self, token_id) -> int:
        try:
            i = int(token_id)
        except (TypeError, ValueError):
            raise ValueError(f"token id {token_id!r} is not an integer") from None
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is out of range: the vocabulary has {self.vocab_size} tokens (0..{self.vocab_size - 1})")
        return i

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        table = self._decode_bytes_skip if skip_special else self._decode_bytes
        return b"".join(table[self._check(i)] for i in ids)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`: bos -> nothing, specials -> their text unless skip_special, U+FFFD for invalid UTF-8."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def piece_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes `token_id` contributes to decoded text (b"" for bos)."""
        table = self._decode_bytes_skip if skip_special else self._decode_bytes
        return table[self._check(token_id)]

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)


class SentencePiece:
    """llama.cpp's SentencePiece ("SPM", ``tokenizer.ggml.model = llama``) encoder, exactly
    (llama-vocab.cpp: tokenizer_st_partition, then llm_tokenizer_spm_session per text fragment):

    1. partition: every CONTROL / UNKNOWN token (only when ``parse_special``) and every
       USER_DEFINED token (always: Gemma's runs of spaces, tabs and newlines, HTML tags) is cut out
       of the raw text, longest token text first, each one's occurrences left to right;
    2. each remaining fragment gets a space in front when ``add_space_prefix`` and it starts the
       text or follows a cut-out token; spaces become U+2581 ("▁");
    3. the fragment is split into characters and the adjacent pair whose concatenation is a token
       of highest score is merged, leftmost on ties, until no pair forms a token (merges by score,
       not by BPE rank);
    4. a final piece that is a token is emitted; one that is not (a single character) becomes its
       UTF-8 bytes as byte tokens ``<0xNN>`` (byte fallback).

    llama.cpp looks token texts up as the GGUF stores them; the `.t` file stores decoded bytes
    (FORMATS-EXT.md), so they are rebuilt here: BYTE tokens are ``<0xNN>``, NORMAL / UNKNOWN /
    UNUSED ones have their spaces turned back into "▁", CONTROL / USER_DEFINED ones are verbatim.
    llama.cpp sorts the partition tokens with an unstable sort by length; equal-length tokens are
    kept in id order here (no two of Gemma 3's overlap, so the order among them cannot matter).
    """

    _VERBATIM = (3, 4)          # TOKEN_CONTROL, TOKEN_USER_DEFINED

    def __init__(self, data: TokenizerData):
        types = np.asarray(data.token_types, dtype=np.uint8)
        n = len(data.vocab)
        self.add_space_prefix = bool(data.add_space_prefix)
        texts = []
        for i, (tok, t) in enumerate(zip(data.vocab, types.tolist())):
            if t == 6:                                   # TOKEN_BYTE
                texts.append(f"<0x{tok[0]:02X}>")
                continue
            try:
                s = tok.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"token {i} of the SentencePiece vocabulary is not valid UTF-8") from None
            texts.append(s if t in self._VERBATIM else s.replace(" ", "\u2581"))
        self.texts = texts
        self.text_to_id = {s: i for i, s in enumerate(texts)}    # a later duplicate wins, as in llama.cpp
        self.scores = np.asarray(data.scores, dtype=np.float32).tolist()
        self.byte_ids = []
        for b in range(256):
            i = self.text_to_id.get(f"<0x{b:02X}>")
            if i is None:
                i = self.text_to_id.get(chr(b)) if b < 128 else None
            self.byte_ids.append(i)
        part = [i for i in range(n) if types[i] in (2, 3, 4)]          # UNKNOWN, CONTROL, USER_DEFINED
        part.sort(key=lambda i: -len(texts[i].encode("utf-8")))          # stable: id order on ties
        self.partition = [(texts[i], i, types[i] != 4) for i in part if texts[i]]
        self.special_ids = {i for i in range(n) if types[i] in (2, 3, 5)}  # skipped by decode(skip_special)
        # bytes -> id for token_to_id: non-byte tokens first (lowest id), byte tokens fill the gaps
        self.lookup: dict[bytes, int] = {}
        for i in range(n - 1, -1, -1):
            if types[i] != 6:
                self.lookup[data.vocab[i]] = i
        for i in np.flatnonzero(types == 6).tolist():
            self.lookup.setdefault(data.vocab[i], i)

    def encode(self, text: str, parse_special: bool, out: list[int]) -> None:
        frags: list = [text]
        for tok, tid, special in self.partition:
            if special and not parse_special:
                continue
            if not any(type(f) is str and tok in f for f in frags):
                continue
            nxt = []
            for f in frags:
                if type(f) is not str or tok not in f:
                    nxt.append(f)
                    continue
                pieces = f.split(tok)
                for j, p in enumerate(pieces):
                    if j:
                        nxt.append(tid)
                    if p:
                        nxt.append(p)
            frags = nxt
        prev_special = True
        for f in frags:
            if type(f) is str:
                if self.add_space_prefix and prev_special:
                    f = " " + f
                self._encode_fragment(f.replace(" ", "\u2581"), out)
                prev_special = False
            else:
                out.append(f)
                prev_special = True

    def _encode_fragment(self, text: str, out: list[int]) -> None:
        """llm_tokenizer_spm_session::tokenize on one fragment (spaces already escaped)."""
        sym = list(text)
        n = len(sym)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        t2i, scores = self.text_to_id, self.scores
        heap = []

        def add(left, right):
            if left < 0 or right >= n:
                return
            s = sym[left] + sym[right]
            i = t2i.get(s)
            if i is not None:
                heap.append((-scores[i], left, len(s)))    # best score first, then leftmost

        for i in range(n - 1):
            add(i, i + 1)
        heapq.heapify(heap)
        push = heapq.heappush
        while heap:
            _, left, size = heapq.heappop(heap)
            right = nxt[left]
            if not sym[left] or right >= n or not sym[right] or len(sym[left]) + len(sym[right]) != size:
                continue                                     # stale: one side merged since
            sym[left] += sym[right]
            sym[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] < n:
                prv[nxt[right]] = left
            for a, b in ((prv[left], left), (left, nxt[left])):
                if a >= 0 and b < n:
                    s = sym[a] + sym[b]
                    i = t2i.get(s)
                    if i is not None:
                        push(heap, (-scores[i], a, len(s)))
        i = 0
        while i < n:
            piece = sym[i]
            tid = t2i.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                for b in piece.encode("utf-8"):
                    bid = self.byte_ids[b]
                    if bid is None:
                        raise ConfigError(f"cannot encode byte {b:#04x}: the vocabulary has no byte token for it")
                    out.append(bid)
            i = nxt[i]


class StreamDecoder:
    """Incremental decode: `push(id)` returns the text completed so far, never half a character.

    The concatenation of every push and the final `flush()` equals `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self.tokenizer.piece_bytes(token_id, self.skip_special))

    def push_many(self, ids: Sequence[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """Return what is pending (an incomplete sequence becomes U+FFFD) and reset."""
        s = self._dec.decode(b"", final=True)
        self._dec.reset()
        return s

    @property
    def pending(self) -> bytes:
        return self._dec.getstate()[0]
