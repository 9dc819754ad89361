"""GGUF files (llama.cpp's format), run as they are.

`--model FILE.gguf` on any command opens the file here: the model's header comes from its metadata,
the tokenizer and chat template too, and every tensor is used from the memory-mapped file in its own
block type (formats.TYPE_BLOCK; the engine's kernels multiply them directly). A matrix type without a
kernel is converted to q80 when it is loaded, with one log line per type; nothing is refused that
the metadata describes.

The reader runs on every start, so it trusts nothing: every count, length, dimension and offset is
checked against the file before it is used (no allocation is larger than the file), and every
problem is one ModelFormatError line naming the file and the field.

Layout (llama.cpp's docs/gguf.md): "GGUF", u32 version (2 or 3), u64 tensor count, u64 key/value
count; the key/value pairs (key: u64 length + UTF-8; u32 value type; the value, arrays as u32 element
type + u64 count + elements); the tensor infos (name, u32 dimension count, u64 dimensions with the
row length first, u32 GGML type, u64 offset into the data section); zero padding to
`general.alignment` (default 32); the data section.

A split GGUF (llama.cpp's gguf-split: `NAME-00001-of-00003.gguf` ...) is one model wherever a GGUF
is opened (GGUFFile): `--model` may name any part, every part is mapped and checked, and each tensor
is read from the part that holds it.

Architectures: `llama` (Llama, SmolLM2, Mistral-style), `qwen2` (Qwen2 / Qwen2.5, QwQ,
DeepSeek-R1-Distill-Qwen: q/k/v biases, FORMATS-EXT.md), `qwen3`, `qwen3moe`, `gemma3`
(FORMATS-EXT.md; llama.cpp already stores Gemma's norms as 1 + w and keeps q/k rows unpermuted;
qwen2's too: NeoX rope, which is Distributed Llama's FALCON rope).
Q/K rows of llama GGUFs are in Distributed Llama's rope order already: llama.cpp's converter applies
the same permutation (convert/gguf.py says why).
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import ModelFormatError
from .formats import (ACT_GELU, ACT_SILU, ARCH_GEMMA3, ARCH_LLAMA, ARCH_QWEN2, ARCH_QWEN3, ARCH_QWEN3_MOE, F32,
                      HEADER_KEY_OF,
                      MATRIX_NAMES, Q80, ROPE_LLAMA3_1, TOKEN_NORMAL, ModelHeader, TensorInfo, TokenizerData,
                      drop_pages, ggml_to_type, map_model_file, norm_epsilon_code, set_matrix_types, tensor_layout, validate_header)

MAGIC = b"GGUF"
ARCHS = {"llama": ARCH_LLAMA, "qwen2": ARCH_QWEN2, "qwen3": ARCH_QWEN3, "qwen3moe": ARCH_QWEN3_MOE,
         "gemma3": ARCH_GEMMA3}
MAX_DIMS = 4
MAX_ARRAY_DEPTH = 4

# metadata value types: struct code and size of the fixed-size ones
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALARS = {_UINT8: "B", _INT8: "b", _UINT16: "H", _INT16: "h", _UINT32: "I", _INT32: "i", _FLOAT32: "f",
            _BOOL: "?", _UINT64: "Q", _INT64: "q", _FLOAT64: "d"}
_NUMPY = {_UINT8: "<u1", _INT8: "<i1", _UINT16: "<u2", _INT16: "<i2", _UINT32: "<u4", _INT32: "<i4",
          _FLOAT32: "<f4", _BOOL: "?", _UINT64: "<u8", _INT64: "<i8", _FLOAT64: "<f8"}


def _ggml_sizes() -> dict[int, tuple[int, int]]:
    """(values, bytes) per block of every GGML type gguf-py knows (the ones this build has no kernel
    for still have to be sized, skipped or converted)."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(t): tuple(v) for t, v in GGML_QUANT_SIZES.items()}


def ggml_name(ggml_type: int) -> str:
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    dims: tuple          # GGUF order: the row length (columns) first
    ggml_type: int
    offset: int          # absolute byte offset in the file (the part) that holds it
    nbytes: int
    part: int = 0        # a split GGUF's part that holds it (GGUFFile.parts)

    @property
    def type_name(self) -> str:
        return ggml_name(self.ggml_type)


def _one_line(msg: str) -> str:
    """A message with the file's own strings in it (keys, tensor names) as one printable line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)


class _Parser:
    """Bounds-checked reads from the mapped file; every failure names the field being read."""

    def __init__(self, path: str, data, size: int):
        self.path, self.data, self.size, self.pos = path, data, size, 0

    def bad(self, msg: str):
        raise ModelFormatError(_one_line(f"{self.path}: {msg}"))

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            self.bad(f"{what} needs {n} bytes at offset {self.pos}, but the file has {self.size} bytes (truncated?)")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        v = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def raw_string(self, what: str) -> bytes:
        n = self.unpack("Q", f"length of {what}")
        self.need(n, what)
        s = self.data[self.pos:self.pos + n]
        self.pos += n
        return s

    def string(self, what: str) -> str:
        b = self.raw_string(what)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError as e:
            self.bad(f"{what} is not UTF-8 ({e.reason} at byte {e.start})")

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], f"metadata {key}")
        if vtype == _STRING:
            return self.string(f"metadata {key}")
        if vtype != _ARRAY:
            self.bad(f"metadata {key} has unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            self.bad(f"metadata {key} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        etype, count = self.unpack("IQ", f"array header of metadata {key}")
        if etype in _SCALARS:
            item = struct.calcsize(_SCALARS[etype])
            self.need(count * item, f"{count} values of metadata {key}")
            a = np.frombuffer(self.data, dtype=_NUMPY[etype], count=count, offset=self.pos).copy()
            self.pos += count * item
            return a
        # strings and arrays take at least 8 bytes each: a claimed count beyond that is damage
        self.need(count * 8, f"{count} elements of metadata {key}")
        if etype == _STRING:   # the vocabulary: a tight loop, the bounds checked as one
            out, data, pos, size, u64 = [], self.data, self.pos, self.size, struct.Struct("<Q").unpack_from
            for i in range(count):
                n = u64(data, pos)[0] if pos + 8 <= size else -1
                if n < 0 or pos + 8 + n > size:
                    self.pos = pos
                    self.need(8 if n < 0 else 8 + n, f"element {i} of metadata {key}")
                out.append(data[pos + 8:pos + 8 + n])
                pos += 8 + n
            self.pos = pos
            return _Strings(out, f"{self.path}: metadata {key}")
        if etype == _ARRAY:
            return [self.value(_ARRAY, f"{key}[{i}]", depth + 1) for i in range(count)]
        self.bad(f"metadata {key} is an array of unknown value type {etype}")


class _Strings(list):
    """An array of strings, kept as bytes until asked for (a 262144-token vocabulary is most of the
    metadata, and only the root's tokenizer reads it)."""

    def __init__(self, items, where: str):
        super().__init__(items)
        self.where = where

    def decode(self) -> list[str]:
        out = []
        for i, b in enumerate(self):
            try:
                out.append(bytes(b).decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ModelFormatError(_one_line(f"{self.where}: element {i} is not UTF-8 ({e.reason} at byte {e.start})")) from None
        return out


class _Part:
    """One GGUF file, mapped and parsed: its metadata (`fields`) and tensors (offsets in this file)."""

    def __init__(self, path: str):
        self.path = path
        self.mm, self.size = map_model_file(path)
        try:
            self._parse(self.size)
        except Exception:
            self.close()
            raise

    def bad(self, msg: str):
        raise ModelFormatError(_one_line(f"{self.path}: {msg}"))

    def _parse(self, size: int) -> None:
        p = _Parser(self.path, self.mm, size)
        p.need(4, "magic")
        if self.mm[:4] != MAGIC:
            p.bad(f"not a GGUF file (magic {bytes(self.mm[:4])!r}, expected {MAGIC!r})")
        p.pos = 4
        self.version = p.unpack("I", "version")
        if self.version not in (2, 3):
            p.bad(f"GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors, n_kv = p.unpack("QQ", "tensor and metadata counts")
        # every pair takes at least 13 bytes (key length, one key byte, type), every tensor info 29
        if n_kv * 13 > size or n_tensors * 29 > size:
            p.bad(f"header claims {n_kv} metadata pairs and {n_tensors} tensors, more than {size} bytes can hold")
        self.fields: dict = {}
        for i in range(n_kv):
            key = p.string(f"key of metadata pair {i}")
            vtype = p.unpack("I", f"value type of metadata {key}")
            if key in self.fields:
                p.bad(f"metadata {key} appears twice")
            self.fields[key] = p.value(vtype, key)
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1) or align > 1 << 24:
            p.bad(f"metadata general.alignment is {align!r}, expected a power of two")
        sizes = _ggml_sizes()
        infos, names = [], set()
        for i in range(n_tensors):
            name = p.string(f"name of tensor {i}")
            n_dims = p.unpack("I", f"dimension count of tensor {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                p.bad(f"tensor {name} has {n_dims} dimensions (1..{MAX_DIMS} expected)")
            dims = p.unpack("Q" * n_dims, f"dimensions of tensor {name}")
            dims = (dims,) if n_dims == 1 else tuple(dims)
            ggml_type, offset = p.unpack("IQ", f"type and offset of tensor {name}")
            if ggml_type not in sizes:
                p.bad(f"tensor {name} has unknown GGML type {ggml_type}")
            values, block = sizes[ggml_type]
            if any(d == 0 for d in dims) or dims[0] % values:
                p.bad(f"tensor {name} has dimensions {list(dims)}: its rows are not whole {values}-value "
                      f"{ggml_name(ggml_type)} blocks")
            nbytes = math.prod(dims) // values * block
            if name in names:
                p.bad(f"tensor {name} appears twice")
            names.add(name)
            infos.append((name, dims, ggml_type, offset, nbytes))
        self.data_offset = -(-p.pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, ggml_type, offset, nbytes in infos:
            if offset % align:
                p.bad(f"tensor {name} starts at data offset {offset}, not a multiple of the alignment {align}")
            start = self.data_offset + offset
            if start + nbytes > size:
                p.bad(f"tensor {name} ({nbytes} bytes at offset {start}) ends past the end of the file "
                      f"({size} bytes; truncated?)")
            self.tensors[name] = GGUFTensor(name, dims, ggml_type, start, nbytes)

    def split_int(self, key: str, default=None) -> int:
        """A split.* value: an integer, required unless a default is given."""
        v = self.fields.get(key, default)
        if v is None:
            self.bad(f"missing metadata {key} (every part of a split GGUF has it)")
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            self.bad(f"metadata {key} is {_describe(v)}, expected an integer")
        return int(v)

    def close(self):
        mm, self.mm = getattr(self, "mm", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:   # views still alive; the map goes with them
                pass


# Split GGUFs, as llama.cpp's gguf-split writes them and its model loader reads them
# (tools/gguf-split/gguf-split.cpp, src/llama-model-loader.cpp): part i (from 0) of n is the file
# llama_split_path(PREFIX, i, n) = PREFIX-{i+1:05d}-of-{n:05d}.gguf, a whole GGUF holding the next
# tensors in its own data section; the first part holds all the metadata, and every part the keys
# split.no (u16, i), split.count (u16, n) and split.tensors.count (i32, the tensors of all parts).
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}\.gguf$")   # what a part's name adds to the model's


def split_part_path(prefix: str, no: int, count: int) -> str:
    """The file of part `no` (from 0) of `count` (llama.cpp's llama_split_path)."""
    return f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf"


class GGUFFile:
    """A parsed, memory-mapped GGUF model: `fields` (key -> value) and `tensors` (name -> GGUFTensor).

    A split GGUF is one model: `path` may name any of its parts; every part is mapped and checked
    against the one named (its number, the part count, the total tensor count, no tensor twice),
    `fields` are the first part's metadata, and each tensor is read from the map of the part that
    holds it (`GGUFTensor.part`, an index into `parts`). `path` is the first part's."""

    def __init__(self, path: str | os.PathLike):
        self.parts: list[_Part] = []
        try:
            self.parts.append(_Part(os.fspath(path)))
            self._open_other_parts()
            self.tensors: dict[str, GGUFTensor] = {}
            for i, part in enumerate(self.parts):
                for name, t in part.tensors.items():
                    if name in self.tensors:
                        part.bad(f"tensor {name} is also in {self.parts[self.tensors[name].part].path}")
                    self.tensors[name] = t if t.part == i else replace(t, part=i)
            if len(self.parts) > 1 and len(self.tensors) != self.parts[0].split_int(SPLIT_TENSORS):
                self.parts[0].bad(f"the {len(self.parts)} parts hold {len(self.tensors)} tensors, but "
                                  f"{SPLIT_TENSORS} is {self.parts[0].split_int(SPLIT_TENSORS)}")
        except Exception:
            self.close()
            raise
        first = self.parts[0]
        self.path, self.version, self.fields = first.path, first.version, first.fields

    def _open_other_parts(self) -> None:
        """A split GGUF's other parts, found by the named one's file name, and `parts` in their order."""
        named = self.parts[0]
        count = named.split_int(SPLIT_COUNT, 1)
        if count <= 1:
            return
        no, total = named.split_int(SPLIT_NO), named.split_int(SPLIT_TENSORS)
        if not 0 <= no < count:
            named.bad(f"{SPLIT_NO} is {no}, but {SPLIT_COUNT} is {count}")
        suffix = split_part_path("", no, count)
        prefix = named.path[:-len(suffix)]
        if not named.path.endswith(suffix) or not os.path.basename(prefix):
            named.bad(f"part {no + 1} of a {count}-part split GGUF must be named PREFIX{suffix} (llama.cpp's "
                      f"gguf-split names), to find the other parts")
        by_no = {no: named}
        for i in range(count):
            if i == no:
                continue
            path = split_part_path(prefix, i, count)
            if not os.path.isfile(path):
                raise ModelFormatError(_one_line(f"{path}: part {i + 1} of the {count}-part GGUF {named.path} "
                                                 f"is missing"))
            part = _Part(path)
            self.parts.append(part)
            if part.split_int(SPLIT_COUNT, 1) != count:
                part.bad(f"{SPLIT_COUNT} is {part.split_int(SPLIT_COUNT, 1)}, but {named.path} says {count}")
            if part.split_int(SPLIT_NO) != i:
                part.bad(f"{SPLIT_NO} is {part.split_int(SPLIT_NO)}, expected {i} (part {i + 1} by its name)")
            if part.split_int(SPLIT_TENSORS) != total:
                part.bad(f"{SPLIT_TENSORS} is {part.split_int(SPLIT_TENSORS)}, but {named.path} says {total} "
                         f"(a part of another model?)")
            by_no[i] = part
        self.parts = [by_no[i] for i in range(count)]

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.parts]

    # -- metadata ---------------------------------------------------------------------------

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def bad(self, msg: str):
        raise ModelFormatError(_one_line(f"{self.path}: {msg}"))

    def int(self, key: str, default=None, required: bool = False):
        v = self.fields.get(key)
        if v is None:
            if required:
                self.bad(f"missing metadata {key}")
            return default
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            self.bad(f"metadata {key} is {_describe(v)}, expected an integer")
        return int(v)

    def float(self, key: str, default=None):
        v = self.fields.get(key)
        if v is None:
            return default
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            self.bad(f"metadata {key} is {_describe(v)}, expected a number")
        return float(v)

    def str(self, key: str, default=None):
        v = self.fields.get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            self.bad(f"metadata {key} is {_describe(v)}, expected a string")
        return v

    def strings(self, key: str):
        v = self.fields.get(key)
        if v is None:
            return None
        if not isinstance(v, _Strings):
            self.bad(f"metadata {key} is {_describe(v)}, expected an array of strings")
        return v.decode()

    def numbers(self, key: str, n: int):
        v = self.fields.get(key)
        if v is None:
            return None
        if not isinstance(v, np.ndarray) or v.dtype.kind not in "iuf":
            self.bad(f"metadata {key} is {_describe(v)}, expected an array of numbers")
        if v.size != n:
            self.bad(f"metadata {key} has {v.size} values for {n} tokens")
        return v

    # -- tensor data ------------------------------------------------------------------------

    def tensor(self, name: str) -> GGUFTensor:
        t = self.tensors.get(name)
        if t is None:
            self.bad(f"tensor {name} not found")
        return t

    def data(self, part: int, offset: int, nbytes: int) -> np.ndarray:
        """The bytes [offset, offset + nbytes) of part `part` (a tensor's `part`): a read-only view of its map."""
        return np.frombuffer(self.parts[part].mm, dtype=np.uint8, count=nbytes, offset=offset)

    def drop(self, part: int, offset: int, nbytes: int) -> None:
        """formats.drop_pages on part `part`'s map."""
        drop_pages(self.parts[part].mm, offset, nbytes)

    def close(self):
        for part in getattr(self, "parts", ()):
            part.close()


def _describe(v) -> str:
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, np.ndarray)):
        return "an array"
    if isinstance(v, (bool, np.bool_)):
        return "a boolean"
    return f"{v!r}"


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether the file starts with GGUF's magic (how every command tells GGUF from .m)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# the model header from the metadata

def _llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float, orig: int):
    """llama.cpp's rope_freqs tensor for llama3 scaling (divisors of each base frequency)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wl, high_wl = orig / low, orig / high
    out = []
    for f in freqs:
        wl = 2 * np.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (orig / wl - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def _fit_llama3_scaling(g: GGUFFile, head_dim: int, theta: float):
    """(factor, low, high, original_context) of llama3 scaling that reproduce rope_freqs.weight.

    llama.cpp stores llama3 scaling only as that tensor of per-frequency divisors. (orig, low, high)
    and (k·orig, k·low, k·high) give the same factors for every k, so a match is scaled to the
    smallest integer triple the .m header can store; the canonical llama3 values (low 1, high 4) are
    tried first, so Llama 3.1 / 3.2 files come back as factor 8 / 32, low 1, high 4, original 8192."""
    t = g.tensor("rope_freqs.weight")
    if t.ggml_type != 0 or t.nbytes != 4 * (head_dim // 2):
        g.bad(f"rope_freqs.weight is {t.type_name} {list(t.dims)}, expected F32 [{head_dim // 2}]")
    rf = g.data(t.part, t.offset, t.nbytes).view("<f4").astype(np.float64)
    if np.allclose(rf, 1.0):
        return None
    factor = float(rf.max())
    meta = g.int(f"{g.get('general.architecture')}.rope.scaling.original_context_length")
    origs = ([meta] if meta else []) + [8192, 4096, 2048, 16384, 32768, 65536, 131072, 1024, 512, 256, 128]
    for low in (1, 2, 4, 0.5):
        for high in (4, 2, 8, 16, 32, 1):
            if high <= low:
                continue
            for orig in origs:
                if not np.allclose(_llama3_rope_factors(head_dim, theta, factor, low, high, orig), rf,
                                   rtol=1e-4, atol=1e-6):
                    continue
                while low != int(low) or high != int(high):   # the equivalent integer triple
                    orig, low, high = orig * 2, low * 2, high * 2
                if factor != int(factor):
                    g.bad(f"llama3 rope scaling factor {factor} is not an integer (the .m header stores integers)")
                return int(factor), int(low), int(high), int(orig)
    g.bad("rope_freqs.weight does not match llama3 rope scaling with usual parameters")


def _positive_int(g: GGUFFile, key: str, value) -> int:
    if float(value) != int(value) or int(value) <= 0:
        g.bad(f"metadata {key} is {value}, expected a positive integer (the .m header stores integers)")
    return int(value)


def _gemma3_keys(g: GGUFFile, v: dict, present: list, head_dim: int) -> None:
    """The Gemma 3 keys (FORMATS-EXT.md), with llama.cpp's defaults and rules (src/models/gemma3.cpp):
    sliding-window pattern 6, local rope base 10000, attention scale 1/sqrt(head_dim) except the
    27B (62 layers: 1/sqrt(dim / n_heads)), rope scaling (linear) on the global layers only."""
    P = "gemma3."
    v["hidden_act"] = ACT_GELU
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        cap = g.float(P + key)
        if cap:
            g.bad(f"metadata {P}{key} {cap} is not supported (Gemma 3 has none)")
    v["sliding_window"] = g.int(P + "attention.sliding_window", 0)
    pattern = g.get(P + "attention.sliding_window_pattern")
    n_layers = v["n_layers"]
    if isinstance(pattern, np.ndarray):         # per-layer flags (true = sliding window): must be periodic
        flags = [bool(x) for x in pattern]
        n = next((p for p in range(1, n_layers + 1) if flags == [l % p < p - 1 for l in range(n_layers)]), None)
        if n is None:
            g.bad(f"metadata {P}attention.sliding_window_pattern is not 'every n-th layer global'; "
                  f"the .m header cannot express it")
        pattern = n
    elif pattern is not None:
        pattern = g.int(P + "attention.sliding_window_pattern")
    v["sliding_window_pattern"] = pattern or 6
    base = g.float(P + "rope.freq_base_swa")
    v["rope_theta_local"] = _positive_int(g, P + "rope.freq_base_swa", base) if base is not None else 10000
    v["query_pre_attn_scalar"] = v["dim"] // v["n_heads"] if n_layers == 62 else head_dim
    factor = g.float(P + "rope.scaling.factor") if g.str(P + "rope.scaling.type") == "linear" else None
    v["rope_linear_factor"] = _positive_int(g, P + "rope.scaling.factor", factor) if factor else 1
    present += ["sliding_window", "sliding_window_pattern", "rope_theta_local", "query_pre_attn_scalar",
                "rope_linear_factor"]


# header fields that must be positive, and the metadata each comes from
_POSITIVE = {"dim": "{P}embedding_length", "n_layers": "{P}block_count", "n_heads": "{P}attention.head_count",
             "n_kv_heads": "{P}attention.head_count_kv", "max_seq_len": "{P}context_length",
             "vocab_size": "{P}vocab_size (or the rows of token_embd.weight)"}


def header_from_gguf(g: GGUFFile) -> ModelHeader:
    """The model's .m header from the GGUF metadata, matrix types all f32 (placeholders: the caller
    fills them in from the tensors)."""
    a = g.str("general.architecture")
    if a not in ARCHS:
        g.bad(f"unsupported architecture {a!r} in general.architecture (supported: {', '.join(ARCHS)})")
    P = f"{a}."
    for key in ("attention.head_count_kv", "feed_forward_length", "attention.head_count"):
        if isinstance(g.get(P + key), np.ndarray):
            g.bad(f"per-layer {P}{key} is not supported")
    n_heads = g.int(P + "attention.head_count", required=True)
    vocab = g.int(P + "vocab_size")
    if vocab is None:
        emb = g.tensors.get("token_embd.weight")
        if emb is not None and len(emb.dims) == 2:
            vocab = emb.dims[1]
        else:
            tokens = g.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else None
    if vocab is None:
        g.bad("cannot determine the vocabulary size")
    v = dict(version=0, arch_type=ARCHS[a], hidden_act=ACT_SILU, dim=g.int(P + "embedding_length", required=True),
             hidden_dim=g.int(P + "feed_forward_length", 0), n_layers=g.int(P + "block_count", required=True),
             n_heads=n_heads, n_kv_heads=g.int(P + "attention.head_count_kv", n_heads), weights_float_type=F32,
             max_seq_len=g.int(P + "context_length", required=True), vocab_size=int(vocab), n_experts=0,
             n_active_experts=0)
    present = ["version", "arch_type", "hidden_act", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
               "weights_float_type", "max_seq_len", "vocab_size", "n_experts", "n_active_experts"]
    for key, value in v.items():   # the .m header's fields are i32
        if isinstance(value, int) and not 0 < value < 2**31 and key in _POSITIVE:
            g.bad(f"metadata {_POSITIVE[key].format(P=P)} is {value}, expected 1 .. 2^31 - 1")
    # the tensor table (built from these before each tensor is checked) must stay as small as the
    # file: a layer has tensors of its own, an expert is a slice of a layer's 3-D tensors
    if v["n_layers"] > len(g.tensors):
        g.bad(f"metadata {P}block_count is {v['n_layers']}, but the file has only {len(g.tensors)} tensors")
    if a == "qwen3moe":
        v["n_experts"] = g.int(P + "expert_count", required=True)
        v["n_active_experts"] = g.int(P + "expert_used_count", required=True)
        if not v["hidden_dim"]:
            v["hidden_dim"] = g.int(P + "expert_feed_forward_length", required=True)
        exps = g.tensor("blk.0.ffn_gate_exps.weight")
        if len(exps.dims) != 3 or exps.dims[2] != v["n_experts"]:
            g.bad(f"metadata {P}expert_count is {v['n_experts']}, but blk.0.ffn_gate_exps.weight has dimensions "
                  f"{list(exps.dims)}")
    elif not v["hidden_dim"]:
        g.bad(f"missing metadata {P}feed_forward_length")
    theta = g.float(P + "rope.freq_base")
    if theta is not None:
        v["rope_theta"] = int(theta)
        present.append("rope_theta")
    head_dim = g.int(P + "attention.key_length") or g.int(P + "rope.dimension_count")
    hd = head_dim if head_dim else v["dim"] // max(n_heads, 1)
    vlen = g.int(P + "attention.value_length")
    if vlen is not None and vlen != hd:
        g.bad(f"{P}attention.value_length {vlen} differs from the key length {hd}")
    rdim = g.int(P + "rope.dimension_count")
    if rdim is not None and rdim != hd:
        g.bad(f"partial rope ({P}rope.dimension_count {rdim} < head size {hd}) is not supported")
    stype = g.str(P + "rope.scaling.type")
    if stype not in (None, "none") and not (a == "gemma3" and stype == "linear"):
        g.bad(f"unsupported {P}rope.scaling.type {stype!r}")
    if "rope_freqs.weight" in g.tensors:
        fit = _fit_llama3_scaling(g, hd, theta if theta is not None else 10000.0)
        if fit is not None:
            (v["rope_scaling_factor"], v["rope_scaling_low_freq_factor"], v["rope_scaling_high_freq_factor"],
             v["rope_scaling_orig_max_seq_len"]) = fit
            v["rope_type"] = ROPE_LLAMA3_1
            present += ["rope_scaling_factor", "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor",
                        "rope_scaling_orig_max_seq_len", "rope_type"]
    if head_dim:
        v["head_dim"] = hd
        present.append("head_dim")
    eps = g.float(P + "attention.layer_norm_rms_epsilon")
    if eps is not None:
        code = norm_epsilon_code(eps)
        if code is None:
            g.bad(f"metadata {P}attention.layer_norm_rms_epsilon {eps:g} is not supported (1e-5 and 1e-6 are)")
        v["norm_epsilon"] = code
        present.append("norm_epsilon")
    if a == "qwen3moe":
        v["moe_hidden_dim"] = g.int(P + "expert_feed_forward_length", required=True)
        present.append("moe_hidden_dim")
    if a == "gemma3":
        _gemma3_keys(g, v, present, hd)
    # qwen2's q/k/v biases are tensors of its layout (checked with the others); no arch has more
    allowed = ("attn_q.bias", "attn_k.bias", "attn_v.bias") if a == "qwen2" else ()
    for bias in ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"):
        if f"blk.0.{bias}" in g.tensors and bias not in allowed:
            g.bad(f"tensor blk.0.{bias} (attention bias) is not supported for architecture {a}")
    return ModelHeader(**v, present=tuple(HEADER_KEY_OF[n] for n in present))


# .m tensor name (formats.tensor_layout) -> GGUF name inside a block; experts are slices of one 3-D tensor
LAYER_NAMES = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w1": "ffn_gate",
               "w2": "ffn_down", "w3": "ffn_up", "router": "ffn_gate_inp", "q_norm": "attn_q_norm",
               "k_norm": "attn_k_norm", "attn_norm": "attn_norm", "ffn_norm": "ffn_norm",
               "attn_post_norm": "post_attention_norm", "ffn_post_norm": "post_ffw_norm"}
BIAS_NAMES = {"q_bias": "attn_q", "k_bias": "attn_k", "v_bias": "attn_v"}   # qwen2: blk.N.attn_q.bias ...


def gguf_name(t: TensorInfo, tensors) -> str:
    """The GGUF tensor that holds a .m tensor (the output matrix of a tied model is token_embd)."""
    if t.name == "embed":
        return "token_embd.weight"
    if t.name == "norm":
        return "output_norm.weight"
    if t.name == "wcls":
        return "output.weight" if "output.weight" in tensors else "token_embd.weight"
    if t.name in BIAS_NAMES:
        return f"blk.{t.layer}.{BIAS_NAMES[t.name]}.bias"
    suffix = "_exps" if t.expert >= 0 else ""
    return f"blk.{t.layer}.{LAYER_NAMES[t.name]}{suffix}.weight"


@dataclass(frozen=True)
class Source:
    """Where a .m tensor's bytes are in the GGUF: a whole tensor, or one expert of a 3-D one."""

    tensor: GGUFTensor
    offset: int
    nbytes: int
    rows: int
    ftype: int | None      # the weight type of its blocks (formats), None: a GGML type formats lacks


def sources(g: GGUFFile, h: ModelHeader) -> dict:
    """Every .m tensor of the header (tensor_layout order; types not yet known) -> its Source, after
    checking that each exists with the shape the header implies."""
    out = {}
    for t in tensor_layout(h, 0):
        name = gguf_name(t, g.tensors)
        gt = g.tensor(name)
        want = (t.cols,) if t.rows == 1 else (t.cols, t.rows)
        if t.expert >= 0:
            want = (t.cols, t.rows, h.n_experts)
        if tuple(gt.dims) != want and not (t.rows == 1 and gt.dims == (t.cols, 1)):
            g.bad(f"tensor {name} has dimensions {list(gt.dims)}, expected {list(want)} for {t.name}"
                  f"{f' of layer {t.layer}' if t.layer >= 0 else ''}")
        nbytes = gt.nbytes // (h.n_experts if t.expert >= 0 else 1)
        offset = gt.offset + (nbytes * t.expert if t.expert >= 0 else 0)
        out[t.key] = Source(gt, offset, nbytes, t.rows, ggml_to_type(gt.ggml_type))
    return out


# ---------------------------------------------------------------------------------------------
# the engine's view of a GGUF model

@dataclass
class GGUFModel:
    """A GGUF file as the engine's model source (the interface of formats.ModelFile that
    weights.py uses): `header`, a ModelHeader of the tensors as stored (a GGML type formats has no
    code for shows as q80, the type it is converted to, with a line in `notes`), and each tensor's
    stored bytes by key (`stored_rows`); a tied output matrix is token_embd's bytes."""

    path: str
    g: GGUFFile
    header: ModelHeader
    src: dict
    notes: list = field(default_factory=list)

    def info(self, name: str, layer: int = -1, expert: int = -1) -> TensorInfo:
        """The tensor's entry of the layout of `header` (as formats.ModelFile.info)."""
        if not hasattr(self, "_layout"):
            self._layout = {t.key: t for t in tensor_layout(self.header, 0)}
        return self._layout[(name, layer, expert)]

    def stored_rows(self, key: tuple, r0: int, r1: int):
        """(bytes of rows [r0, r1) as stored: a view of the map, their weight type or None, the GGML type)."""
        s = self.src[key]
        row = s.nbytes // s.rows
        return self.g.data(s.tensor.part, s.offset + r0 * row, (r1 - r0) * row), s.ftype, s.tensor.ggml_type

    @property
    def paths(self) -> list[str]:
        """The files of the model (a split GGUF's parts)."""
        return self.g.paths

    def drop(self, key: tuple) -> None:
        """Let the kernel drop the file pages of a tensor the root has copied or sent (they would
        otherwise count in its RSS next to the copies)."""
        s = self.src[key]
        self.g.drop(s.tensor.part, s.offset, s.nbytes)

    def close(self):
        self.g.close()


def _check_readable(g: GGUFFile, t: GGUFTensor) -> None:
    """A tensor of a type formats has no code for must be one gguf-py dequantizes (it is converted at
    load), else one line now, before any weight moves."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    block = _ggml_sizes()[t.ggml_type][1]
    try:
        dequantize(np.zeros((1, block), np.uint8), GGMLQuantizationType(t.ggml_type))
    except (NotImplementedError, ValueError, TypeError) as e:
        g.bad(f"tensor {t.name} is {t.type_name}, which neither dllama-mpi nor gguf can read ({e})")


def open_gguf_model(path: str | os.PathLike) -> GGUFModel:
    """Open a GGUF as the engine's model: its header from the metadata, every tensor found and its
    shape checked. Raises ModelFormatError naming the field for anything the file gets wrong."""
    g = GGUFFile(path)
    try:
        h = header_from_gguf(g)
        src = sources(g, h)
        unknown: dict = {}
        types = []
        for t in tensor_layout(h, 0):
            s = src[t.key]
            if s.ftype is None:   # only gguf-py can dequantize it (to q80 at load): can it?
                _check_readable(g, s.tensor)
                if t.name in MATRIX_NAMES or t.name == "embed":
                    unknown.setdefault(s.tensor.type_name, []).append(s.tensor.name)
            stored = s.ftype if s.ftype is not None else Q80
            if t.name in MATRIX_NAMES:
                types.append(stored)
            elif t.name == "embed":
                h.embed_type = stored
            # norms and the MoE router are f32 in the layout: another stored type is converted as read
        set_matrix_types(h, types)
        validate_header(g.path, h)
        notes = [f"{name}: no kernel reads it, {len(names)} tensor(s) converted to q80 at load ({names[0]}"
                 f"{', ...' if len(names) > 1 else ''})" for name, names in unknown.items()]
        return GGUFModel(g.path, g, h, src, notes)
    except Exception:
        g.close()
        raise


# ---------------------------------------------------------------------------------------------
# the tokenizer

def gpt2_unicode_to_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_UTB: dict | None = None


def byte_level_token_bytes(token: str) -> bytes:
    """A byte-level BPE token string -> raw bytes (chars outside the table are UTF-8 encoded, as DL does)."""
    global _UTB
    if _UTB is None:
        _UTB = gpt2_unicode_to_bytes()
    out = bytearray()
    for ch in token:
        b = _UTB.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def sentencepiece_vocab(tokens: list[str], types, where: str, error=ModelFormatError):
    """A SentencePiece vocabulary (pieces + GGUF token types) -> (.t token bytes, uint8 types).

    FORMATS-EXT.md: BYTE tokens `<0xNN>` are stored as that byte, NORMAL / UNKNOWN / UNUSED pieces
    with "▁" as a space, CONTROL / USER_DEFINED tokens verbatim (Gemma's user-defined runs of real
    spaces must not meet its "▁" pieces). The tokenizer rebuilds llama.cpp's texts from the bytes
    and the types, so the mapping must be invertible: checked here for every token."""
    out, tt = [], np.asarray(types, dtype=np.int64)
    bad = np.flatnonzero((tt < 1) | (tt > 6))
    if bad.size:
        raise error(f"{where}: token {bad[0]} has unknown token type {tt[bad[0]]} (expected 1..6)")
    for i, (tok, t) in enumerate(zip(tokens, tt.tolist())):
        if t == 6:
            if not (len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">")):
                raise error(f"{where}: byte token {i} is {tok!r}, expected <0xNN>")
            try:
                b = bytes([int(tok[3:5], 16)])
            except ValueError:
                raise error(f"{where}: byte token {i} is {tok!r}, expected <0xNN>") from None
            if f"<0x{b[0]:02X}>" != tok:
                raise error(f"{where}: byte token {i} is {tok!r}, expected upper-case <0xNN>")
            out.append(b)
        elif t in (3, 4):
            out.append(tok.encode("utf-8"))
        else:
            if " " in tok:
                raise error(f"{where}: piece {i} ({tok!r}) contains a space, which the .t file cannot tell from '\u2581'")
            out.append(tok.replace("\u2581", " ").encode("utf-8"))
        if not out[-1]:
            raise error(f"{where}: token {i} is empty")
    return out, tt.astype(np.uint8)


def _bpe_scores(tokens: list[str], merges: list[str] | None) -> np.ndarray:
    """-id (DL's rule) when merge ranks follow id order (true for SmolLM2 and Llama 3); else ranks."""
    n = len(tokens)
    scores = -np.arange(n, dtype=np.float32)
    if not merges:
        return scores
    idx = {t: i for i, t in enumerate(tokens)}
    merged = [idx.get(m.replace(" ", "", 1)) for m in merges]
    ids = [i for i in merged if i is not None]
    if all(b > a for a, b in zip(ids, ids[1:])):
        return scores
    # merge order differs from id order: score merged tokens by their first merge's rank,
    # everything else below every merge result (DL only compares scores of merge results)
    rank_scores = np.full(n, -float(len(merges)), dtype=np.float64) - np.arange(n)
    seen = set()
    for r, i in enumerate(merged):
        if i is not None and i not in seen:
            seen.add(i)
            rank_scores[i] = -float(r)
    return rank_scores.astype(np.float32)


# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> tokenizer.PRETOKENIZERS; others: detected
PRETOKENIZER_NAMES = {"llama-bpe": "llama3", "llama3": "llama3", "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
                      "smollm": "smollm", "gpt-2": "gpt2", "gpt2": "gpt2"}
# without tokenizer.ggml.add_bos_token llama.cpp (llama-vocab.cpp) adds bos for SentencePiece
# vocabularies and these BPE pre-tokenizers only: not for qwen2, smollm, gpt2 ...
ADD_BOS_PRETOKENIZERS = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                         "jina-v5-nano", "tekken", "chameleon")


# A GGUF without a chat template of its own gets its family's where the family has one template for every
# model (Gemma 3: google's pretrained uploads carry none; its instruction-tuned models all use this one).
FAMILY_TEMPLATES = {"gemma3": "gemma3"}


def tokenizer_data(g: GGUFFile) -> TokenizerData:
    """The vocabulary, specials and chat template, as a `.t` file would hold them (FORMATS §3,
    FORMATS-EXT.md for SentencePiece vocabularies)."""
    model = g.str("tokenizer.ggml.model")
    tokens = g.strings("tokenizer.ggml.tokens")
    if not tokens:
        g.bad("no tokenizer.ggml.tokens (vocabulary) in the file")
    n = len(tokens)
    token_types = None
    if model == "gpt2":
        vocab = [byte_level_token_bytes(t) for t in tokens]
        scores = _bpe_scores(tokens, g.strings("tokenizer.ggml.merges"))
    elif model == "llama":
        s = g.numbers("tokenizer.ggml.scores", n)
        scores = np.asarray(s, dtype=np.float32) if s is not None else -np.arange(n, dtype=np.float32)
        tt = g.numbers("tokenizer.ggml.token_type", n)
        types = np.asarray(tt, dtype=np.int64) if tt is not None else np.full(n, TOKEN_NORMAL)
        vocab, token_types = sentencepiece_vocab(tokens, types, f"{g.path}: tokenizer.ggml.tokens")
    else:
        g.bad(f"unsupported tokenizer.ggml.model {model!r} (supported: gpt2, llama)")
    for i, t in enumerate(vocab):
        if not t:
            g.bad(f"token {i} of tokenizer.ggml.tokens is empty")
    bos = g.int("tokenizer.ggml.bos_token_id", required=True)
    eos = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        e = g.int(key)
        if e is not None and e not in eos:
            eos.append(e)
    if not eos:
        g.bad("missing metadata tokenizer.ggml.eos_token_id")
    if model == "llama" and "tokenizer.ggml.eot_token_id" not in g.fields:
        # llama.cpp finds Gemma's end-of-turn token by its text (no metadata key for it): a chat
        # answer ends there (HF's generation_config lists it next to <eos> too)
        eot = next((i for i, t in enumerate(tokens) if t == "<end_of_turn>"), None)
        if eot is not None and eot not in eos:
            eos.append(eot)
    for what, i in [("bos", bos)] + [("eos", e) for e in eos]:
        if not 0 <= i < n:
            g.bad(f"tokenizer {what} id {i} is outside the vocabulary (size {n})")
    add_bos = g.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = model == "llama" or g.str("tokenizer.ggml.pre") in ADD_BOS_PRETOKENIZERS
    template, family = g.str("tokenizer.chat_template"), FAMILY_TEMPLATES.get(g.str("general.architecture"))
    if not template and family:
        from .chat_template import BUILTIN_TEMPLATES

        template = BUILTIN_TEMPLATES[family]
    data = TokenizerData(vocab=vocab, scores=scores, bos_id=bos, eos_ids=eos, add_bos=bool(add_bos),
                         chat_template=template, max_token_length=max(len(t) for t in vocab))
    if model == "llama":            # llama.cpp's SPM defaults: add_space_prefix unless the file says no
        data.token_types = token_types
        data.add_space_prefix = bool(g.get("tokenizer.ggml.add_space_prefix", True))
    return data


def tokenizer_of(g: GGUFFile):
    """A tokenizer.Tokenizer of the file's vocabulary, with llama.cpp's pre-tokenizer when the file
    names one we know (else detected from the vocabulary, as for .t files), and as llama.cpp no
    Unicode normalisation (a .t of a Qwen2 model NFC-normalises, as Hugging Face's tokenizer does)."""
    from .tokenizer import Tokenizer

    data = tokenizer_data(g)
    pre = None if data.token_types is not None else PRETOKENIZER_NAMES.get(g.str("tokenizer.ggml.pre") or "")
    return Tokenizer(data, pretokenizer=pre, nfc=False)   # llama.cpp's ids: it normalises nothing


__all__ = ["GGUFFile", "GGUFModel", "GGUFTensor", "ggml_name", "header_from_gguf", "is_gguf",
           "open_gguf_model", "sources", "tokenizer_data", "tokenizer_of"]
