"""Property tests (hypothesis) over the readers a user's file reaches: the `.m` header reader, the
`.t` reader, the GGUF import and the tokenizer. Only the documented error type may escape:

    .m      ModelFormatError        .t      TokenizerFormatError
    GGUF    ModelFormatError        encode  ConfigError (lone surrogates only); decode never raises
                                            for ids in range, ValueError for ids out of range

Each test runs its property a modest number of times here (the suite must stay fast) and prints
how many inputs ran; scripts/fuzz_long.py runs the same properties with many more examples."""

from __future__ import annotations

import os
import struct
import tempfile
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dllama_mpi.errors import ConfigError, ModelFormatError, TokenizerFormatError
from dllama_mpi.formats import HEADER_KEYS, MODEL_MAGIC, TOK_KEYS, TOKENIZER_MAGIC, open_model, read_model_header, \
    read_tokenizer

TINY = Path(__file__).parent / "data" / "tiny"
MODEL = TINY / "m" / "dllama_model_tiny_qwen3_q40.m"
TOKS = {"llama3": TINY / "t" / "dllama_tokenizer_tiny_llama3.t", "qwen3": TINY / "t" / "dllama_tokenizer_tiny_qwen3.t"}

EXAMPLES = int(os.environ.get("DLLAMA_FUZZ_EXAMPLES", "150"))   # per property in the suite


# ------------------------------------------------------------------------------------------------
# strategies: random bytes, and mutations of a valid file (which reach far deeper)

INT32 = st.integers(-(2 ** 31), 2 ** 31 - 1)
INTERESTING = st.sampled_from([0, 1, -1, 2, 7, 8, 31, 32, 33, 64, 255, 256, 1 << 16, 1 << 20, 1 << 30,
                               2 ** 31 - 1, -(2 ** 31)])
VALUES = st.one_of(INTERESTING, INT32, st.integers(0, 4096))


def edits(size: int, header_len: int):
    """A few edits of a file of `size` bytes: int32 writes (mostly in the header), byte writes,
    truncation, extension. Drawn as a small list (readable when a case fails); `apply` makes the bytes."""
    hot = max(min(size, header_len + 64) - 4, 0)
    one = st.one_of(
        st.tuples(st.just("int"), st.integers(0, hot), VALUES),
        st.tuples(st.just("int"), st.integers(0, max(size - 4, 0)), VALUES),
        st.tuples(st.just("byte"), st.integers(0, max(size - 1, 0)), st.integers(0, 255)),
        st.tuples(st.just("cut"), st.integers(0, size), st.just(0)),
        st.tuples(st.just("grow"), st.just(0), st.binary(max_size=64)),
    )
    return st.lists(one, min_size=1, max_size=4)


def apply(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for kind, at, v in ops:
        if kind == "int" and at + 4 <= len(b):
            struct.pack_into("<i", b, at, v)
        elif kind == "byte" and at < len(b):
            b[at] = v
        elif kind == "cut":
            del b[at:]
        elif kind == "grow":
            b += v
    return bytes(b)


@st.composite
def model_headers(draw):
    """A well-formed header frame (magic, size, pairs) with arbitrary keys and values."""
    keys = draw(st.lists(st.one_of(st.sampled_from(sorted(HEADER_KEYS)), INT32), max_size=26))
    pairs = b"".join(struct.pack("<ii", k, draw(VALUES)) for k in keys)
    return struct.pack("<ii", MODEL_MAGIC, 8 + len(pairs)) + pairs


def _run(prop, strategy, n):
    """Run prop over n examples of strategy; returns how many ran."""
    count = [0]

    @settings(max_examples=n, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def check(x):
        count[0] += 1
        prop(x)

    check()
    return count[0]


# ------------------------------------------------------------------------------------------------
# properties (also used by scripts/fuzz_long.py)

_MODEL_BYTES = MODEL.read_bytes()
_MODEL_HSIZE = struct.unpack_from("<i", _MODEL_BYTES, 4)[0]


def prop_model_header_bytes(data: bytes) -> None:
    try:
        h, size = read_model_header("x.m", data, len(data))
    except ModelFormatError as e:
        assert "\n" not in str(e)
        return
    assert 8 <= size <= len(data)


def prop_model_file(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".m", delete=False) as f:
        f.write(data)
    try:
        m = open_model(f.name)
    except ModelFormatError as e:
        assert "\n" not in str(e)
        return
    finally:
        os.unlink(f.name)
    last = m.tensors[-1]
    assert last.offset + last.nbytes == len(data)
    m.close()


def prop_tokenizer_file(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".t", delete=False) as f:
        f.write(data)
    try:
        t = read_tokenizer(f.name)
    except TokenizerFormatError as e:
        assert "\n" not in str(e)
        return
    finally:
        os.unlink(f.name)
    assert t.vocab_size > 0 and 0 <= t.bos_id < t.vocab_size


def _tiny_gguf() -> bytes:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_convert import write_tiny_gguf

    d = Path(tempfile.mkdtemp(prefix="fuzz-gguf-"))
    p = write_tiny_gguf(TINY / "hf" / "tiny_qwen3", d / "q.gguf")
    data = Path(p).read_bytes()
    os.unlink(p)
    os.rmdir(d)
    return data


_GGUF: list[bytes] = []


def gguf_bytes() -> bytes:
    if not _GGUF:
        _GGUF.append(_tiny_gguf())
    return _GGUF[0]


def _gguf_regions(data: bytes) -> list[tuple[int, int]]:
    """[start, end) of the GGUF's header counts, its metadata and its tensor infos (where a mutation
    reaches the reader's checks; the data section only matters to its bounds)."""
    from dllama_mpi.gguf import GGUFFile

    with tempfile.NamedTemporaryFile(suffix=".gguf", delete=False) as f:
        f.write(data)
    try:
        g = GGUFFile(f.name)
        first = min(t.offset for t in g.tensors.values())
        infos = data.index(next(iter(g.tensors)).encode()) - 8   # the first tensor name's length field
        g.close()
    finally:
        os.unlink(f.name)
    return [(4, 24), (24, infos), (infos, first)]


INTERESTING64 = st.sampled_from([0, 1, 2, 4, 31, 32, 255, 1 << 16, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40,
                                 (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 1])


def gguf_edits(size: int, regions):
    """Edits of a GGUF: u64 and u32 writes inside its counts, metadata and tensor infos (lengths,
    counts, types, dimensions, offsets), byte writes anywhere, truncation, extension."""
    at = st.one_of(*[st.integers(a, max(a, b - 8)) for a, b in regions], st.integers(0, max(size - 8, 0)))
    one = st.one_of(
        st.tuples(st.just("u64"), at, st.one_of(INTERESTING64, st.integers(0, 1 << 20))),
        st.tuples(st.just("u32"), at, st.one_of(INTERESTING64.map(lambda v: v & 0xFFFFFFFF), st.integers(0, 64))),
        st.tuples(st.just("byte"), st.integers(0, max(size - 1, 0)), st.integers(0, 255)),
        st.tuples(st.just("cut"), st.integers(0, size), st.just(0)),
        st.tuples(st.just("grow"), st.just(0), st.binary(max_size=64)),
    )
    return st.lists(one, min_size=1, max_size=4)


def apply_gguf(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for kind, at, v in ops:
        if kind == "u64" and at + 8 <= len(b):
            struct.pack_into("<Q", b, at, v)
        elif kind == "u32" and at + 4 <= len(b):
            struct.pack_into("<I", b, at, v)
        else:
            b = bytearray(apply(bytes(b), [(kind, at, v)]))
    return bytes(b)


def prop_gguf(data: bytes) -> None:
    """Open a (damaged) GGUF as `--model` does and read what a start reads: the header, the
    tokenizer, the types the ranks run, and the first rows of every tensor (converted where the
    runtime type differs). Only one-line ModelFormatErrors may escape, and nothing allocates much
    more than the file (a damaged count or length must not reach an allocation)."""
    import tracemalloc

    from dllama_mpi.formats import tensor_layout
    from dllama_mpi.gguf import open_gguf_model, tokenizer_data
    from dllama_mpi.weights import runtime_header, tensor_rows

    with tempfile.NamedTemporaryFile(suffix=".gguf", delete=False) as f:
        f.write(data)
    tracemalloc.start()
    try:
        m = open_gguf_model(f.name)
        try:
            tokenizer_data(m.g)
            h, _ = runtime_header(m)
            for t in tensor_layout(h, 0):
                tensor_rows(m, t, 0, min(t.rows, 2))
        finally:
            m.close()
    except ModelFormatError as e:
        assert "\n" not in str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        os.unlink(f.name)
    assert peak < 20 * len(data) + (4 << 20), (peak, len(data))


_TOKENIZERS: dict = {}


def tokenizer(name):
    from dllama_mpi.tokenizer import Tokenizer

    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = Tokenizer.load(TOKS[name])
    return _TOKENIZERS[name]


def prop_round_trip(tok, text: str) -> None:
    ids = tok.encode(text, add_bos=False, parse_special=False)
    assert all(0 <= i < tok.vocab_size for i in ids)
    expect = unicodedata.normalize("NFC", text) if tok._nfc else text
    assert tok.decode(ids) == expect
    with_bos = tok.encode(text)              # bos and special-token parsing: still the same text
    assert tok.decode(with_bos) == expect


def prop_decode(tok, ids: list[int]) -> None:
    n = tok.vocab_size
    if all(0 <= i < n for i in ids):
        text = tok.decode(ids)
        assert isinstance(text, str)
        tok.decode(ids, skip_special=True)
        d = tok.stream_decoder()
        streamed = "".join(d.push(i) for i in ids) + d.flush()
        assert streamed == text
    else:
        with pytest.raises(ValueError):
            tok.decode(ids)


def prop_encode_any_str(tok, text: str) -> None:
    """Any Python str (lone surrogates too): token ids, or ConfigError for text that is not UTF-8."""
    try:
        text.encode("utf-8")
        valid = True
    except UnicodeEncodeError:
        valid = False
    if valid:
        tok.encode(text)
    else:
        with pytest.raises(ConfigError):
            tok.encode(text)


_TOK_BYTES = TOKS["llama3"].read_bytes()
_TOK_HSIZE = struct.unpack_from("<i", _TOK_BYTES, 4)[0]

PROPERTIES = {
    # name: (property, strategy factory)
    "m-header-random": (prop_model_header_bytes, lambda: st.binary(max_size=256)),
    "m-header-frames": (prop_model_header_bytes, model_headers),
    "m-file-mutations": (lambda ops: prop_model_file(apply(_MODEL_BYTES, ops)),
                         lambda: edits(len(_MODEL_BYTES), _MODEL_HSIZE)),
    "m-file-header-frames": (lambda h: prop_model_file(h + _MODEL_BYTES[_MODEL_HSIZE:]), model_headers),
    "t-random": (prop_tokenizer_file, lambda: st.binary(max_size=256)),
    "t-mutations": (lambda ops: prop_tokenizer_file(apply(_TOK_BYTES, ops)), lambda: edits(len(_TOK_BYTES), _TOK_HSIZE)),
    "t-header-frames": (lambda kv: prop_tokenizer_file(
        struct.pack("<ii", TOKENIZER_MAGIC, 8 + 8 * len(kv)) + b"".join(struct.pack("<ii", *p) for p in kv)
        + _TOK_BYTES[_TOK_HSIZE:]),
        lambda: st.lists(st.tuples(st.one_of(st.sampled_from(sorted(TOK_KEYS)), INT32), VALUES), max_size=12)),
    "gguf-mutations": (lambda ops: prop_gguf(apply_gguf(gguf_bytes(), ops)),
                       lambda: gguf_edits(len(gguf_bytes()), _gguf_regions(gguf_bytes()))),
    "gguf-random": (prop_gguf, lambda: st.binary(max_size=128).map(lambda b: b"GGUF" + struct.pack("<I", 3) + b)),
    "tok-round-trip-llama3": (lambda s: prop_round_trip(tokenizer("llama3"), s), lambda: st.text()),
    "tok-round-trip-qwen3": (lambda s: prop_round_trip(tokenizer("qwen3"), s), lambda: st.text()),
    "tok-decode-llama3": (lambda ids: prop_decode(tokenizer("llama3"), ids),
                          lambda: st.lists(st.integers(-3, 520), max_size=40)),
    "tok-decode-qwen3": (lambda ids: prop_decode(tokenizer("qwen3"), ids),
                         lambda: st.lists(st.integers(0, 511), max_size=40)),
    "tok-encode-any-str": (lambda s: prop_encode_any_str(tokenizer("qwen3"), s),
                           lambda: st.text(alphabet=st.characters(codec=None, exclude_categories=()))),
}


def run_property(name: str, n: int) -> int:
    prop, strategy = PROPERTIES[name]
    return _run(prop, strategy(), n)


@pytest.mark.parametrize("name", list(PROPERTIES))
def test_property(name, record_property):
    n = EXAMPLES // 3 if name.startswith("gguf") else EXAMPLES
    ran = run_property(name, n)
    record_property("examples", ran)
    print(f"{name}: {ran} inputs")
    assert ran >= min(n, 20)
