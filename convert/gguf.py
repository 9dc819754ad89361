"""GGUF file -> Distributed Llama `.m` model and `.t` tokenizer.

Architectures: `llama` (Llama, SmolLM2, Mistral-style dense models), `qwen3`, `qwen3moe`, `gemma3`
(FORMATS-EXT.md; llama.cpp's converter already stores Gemma's norms as 1 + w and does not permute
q/k, since ggml runs Gemma with NeoX rope: everything is copied as is).
Any GGML tensor type that `gguf.quants.dequantize` knows is read (dequantized to float32 row chunk
by row chunk), then written as q40 / q80 (FORMATS §2), f16 or f32; Q4_0, Q8_0, F16 and F32 tensors
whose .m type is the same block layout are copied bit for bit. `--weights auto` (the default) picks
per matrix the type that keeps the file's quality (AUTO_TYPES). q40 from other types: DL's exact
encoder for float tensors; tensors that were already quantized get the error-minimizing encoder
(common.quantize_q40_rmse).

Q/K row order. llama.cpp's `convert_hf_to_gguf.py` permutes the rows of q_proj / k_proj of llama
models with `reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)` (n_head
= n_kv_heads for k) so that ggml's normal (adjacent-pair) rope reproduces HF's rotate_half rope. That
is exactly DL's permutation (FORMATS §1.5), and DL's LLAMA rope is the same adjacent-pair rope, so
`blk.N.attn_q` / `attn_k` of a llama GGUF are already in DL's order and are copied unchanged. Qwen3
GGUFs are not permuted (ggml uses NeoX rope for them), which is DL's FALCON rope: also copied unchanged.

llama3 rope scaling is not stored as metadata by llama.cpp; it writes a `rope_freqs.weight` tensor
of per-frequency divisors instead. The four DL header values are recovered from it by matching the
tensor against llama3's formula for the usual parameter values.
"""

from __future__ import annotations

import os

import numpy as np

from dllama_mpi.errors import ConvertError
from dllama_mpi.formats import (ACT_GELU, ACT_SILU, ARCH_GEMMA3, ARCH_LLAMA, ARCH_QWEN3, ARCH_QWEN3_MOE, F16, F32,
                                HEADER_KEY_OF, MATRIX_NAMES, Q40, Q80, ROPE_LLAMA3_1, TOKEN_NORMAL, ModelHeader,
                                TokenizerData, float_type_name, tensor_layout, write_tokenizer)

from .common import (TensorSource, byte_level_token_bytes, check_header_for_weights, parse_weights_type,
                     sentencepiece_vocab, summarize_stats, write_model)
from .hf import eps_code

ARCHS = {"llama": ARCH_LLAMA, "qwen3": ARCH_QWEN3, "qwen3moe": ARCH_QWEN3_MOE, "gemma3": ARCH_GEMMA3}


def _open(path: str):
    import gguf as _gguf

    if not os.path.isfile(path):
        raise ConvertError(f"{path}: file not found")
    try:
        return _gguf.GGUFReader(path)
    except Exception as e:  # gguf's reader raises anything (IndexError, struct/numpy errors) on damage
        raise ConvertError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e})") from None


class GGUFFile:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.reader = _open(self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.get("general.architecture")
        if arch not in ARCHS:
            raise ConvertError(f"{self.path}: unsupported architecture {arch!r} in general.architecture "
                               f"(supported: {', '.join(ARCHS)})")
        self.arch = arch

    def get(self, key: str, default=None):
        f = self.reader.get_field(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:
            raise ConvertError(f"{self.path}: cannot read metadata {key} ({e})") from None

    def need(self, key: str):
        v = self.get(key)
        if v is None:
            raise ConvertError(f"{self.path}: missing metadata {key}")
        return v

    # -- tensors ----------------------------------------------------------------------------

    def source(self, *names: str) -> TensorSource:
        for name in names:
            t = self.tensors.get(name)
            if t is not None:
                return self._source(t)
        raise ConvertError(f"{self.path}: tensor {names[0]} not found")

    def _source(self, t, expert: int | None = None) -> TensorSource:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        dims = [int(d) for d in t.shape]          # ggml order: ne0 = columns first
        data = t.data
        name = t.name
        if expert is not None:
            if len(dims) != 3:
                raise ConvertError(f"{self.path}: tensor {t.name} has {len(dims)} dims, expected 3 (experts)")
            data = data[expert]
            dims = dims[:2]
            name = f"{t.name}[{expert}]"
        if len(dims) == 1:
            rows, cols = 1, dims[0]
            data = data.reshape(1, -1)
        elif len(dims) == 2:
            cols, rows = dims
        else:
            raise ConvertError(f"{self.path}: tensor {t.name} has shape {dims}, expected 1-D or 2-D")
        qtype = t.tensor_type
        if qtype in (Q.F64, Q.I8, Q.I16, Q.I32, Q.I64):
            def read(r0, r1):
                return np.asarray(data[r0:r1], dtype=np.float32)
        else:
            try:
                dequantize(np.zeros((0,) + tuple(data.shape[1:]), dtype=data.dtype), qtype)
            except NotImplementedError:
                raise ConvertError(f"{self.path}: tensor {t.name} has unsupported type {qtype.name}") from None
            except Exception:
                pass

            def read(r0, r1):
                try:
                    a = dequantize(np.asarray(data[r0:r1]), qtype)
                except NotImplementedError:
                    raise ConvertError(f"{self.path}: tensor {t.name} has unsupported type {qtype.name}") from None
                return np.asarray(a, dtype=np.float32).reshape(r1 - r0, cols)
        float_types = (Q.F32, Q.F16, Q.BF16, Q.F64, Q.I8, Q.I16, Q.I32, Q.I64)
        same = {Q.F32: F32, Q.F16: F16, Q.Q4_0: Q40, Q.Q8_0: Q80}.get(qtype)   # identical block layouts

        def raw(r0, r1):
            return np.ascontiguousarray(data[r0:r1]).tobytes()

        return TensorSource(name, rows, cols, read, quantized=qtype not in float_types, raw_ftype=same,
                            raw=raw if same is not None else None, source_type=qtype.name)

    def expert_source(self, name: str, e: int) -> TensorSource:
        t = self.tensors.get(name)
        if t is None:
            raise ConvertError(f"{self.path}: tensor {name} not found")
        return self._source(t, expert=e)

    def read_all(self, name: str) -> np.ndarray:
        s = self.source(name)
        return s.read(0, s.rows)


# ---------------------------------------------------------------------------------------------
# header

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

    (orig, low, high) and (k·orig, k·low, k·high) give the same factors for every k (only orig/low,
    orig/high and the smoothing ratio matter), so a match is scaled to the smallest integer triple
    the .m header can store; the canonical llama3 values (low 1, high 4) are tried first, so Llama 3.1
    / 3.2 files come back as factor 8 / 32, low 1, high 4, original 8192."""
    rf = g.read_all("rope_freqs.weight").reshape(-1).astype(np.float64)
    if rf.size != head_dim // 2:
        raise ConvertError(f"{g.path}: rope_freqs.weight has {rf.size} values, expected {head_dim // 2}")
    if np.allclose(rf, 1.0):
        return None
    factor = float(rf.max())
    meta = g.get(f"{g.arch}.rope.scaling.original_context_length")
    origs = ([int(meta)] if meta else []) + [8192, 4096, 2048, 16384, 32768, 65536, 131072, 1024, 512, 256, 128]
    for low in (1, 2, 4, 0.5):
        for high in (4, 2, 8, 16, 32, 1):
            if high <= low:
                continue
            for orig in origs:
                ref = _llama3_rope_factors(head_dim, theta, factor, low, high, orig)
                if not np.allclose(ref, rf, rtol=1e-4, atol=1e-6):
                    continue
                while low != int(low) or high != int(high):   # the equivalent integer triple
                    orig, low, high = orig * 2, low * 2, high * 2
                if factor != int(factor):
                    raise ConvertError(f"{g.path}: llama3 rope scaling factor {factor} is not an integer "
                                       f"(the .m header stores integers)")
                return int(factor), int(low), int(high), int(orig)
    raise ConvertError(f"{g.path}: rope_freqs.weight does not match llama3 rope scaling with usual parameters; "
                       f"cannot express it in a .m header")


def gguf_header(g: GGUFFile, weights_float_type: int) -> ModelHeader:
    a = g.arch
    P = f"{a}."

    def need_int(key):
        v = g.need(P + key)
        return int(v)

    n_heads = need_int("attention.head_count")
    kv = g.get(P + "attention.head_count_kv")
    if isinstance(kv, list):
        raise ConvertError(f"{g.path}: per-layer {P}attention.head_count_kv is not supported")
    tokens = g.get("tokenizer.ggml.tokens")
    vocab = g.get(P + "vocab_size")
    if vocab is None:
        emb = g.tensors.get("token_embd.weight")
        vocab = int(emb.shape[1]) if emb is not None and len(emb.shape) == 2 else (len(tokens) if tokens else None)
    if vocab is None:
        raise ConvertError(f"{g.path}: cannot determine the vocabulary size")
    ff = g.get(P + "feed_forward_length")
    if isinstance(ff, list):
        raise ConvertError(f"{g.path}: per-layer {P}feed_forward_length is not supported")
    v = dict(version=0, arch_type=ARCHS[a], hidden_act=ACT_SILU, dim=need_int("embedding_length"),
             hidden_dim=int(ff) if ff is not None else 0, n_layers=need_int("block_count"), n_heads=n_heads,
             n_kv_heads=int(kv) if kv is not None else n_heads, weights_float_type=weights_float_type,
             max_seq_len=need_int("context_length"), vocab_size=int(vocab), n_experts=0, n_active_experts=0)
    present = ["version", "arch_type", "hidden_act", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
               "weights_float_type", "max_seq_len", "vocab_size", "n_experts", "n_active_experts"]
    if a == "qwen3moe":
        v["n_experts"] = need_int("expert_count")
        v["n_active_experts"] = need_int("expert_used_count")
        if not v["hidden_dim"]:
            v["hidden_dim"] = need_int("expert_feed_forward_length")
    elif not v["hidden_dim"]:
        raise ConvertError(f"{g.path}: missing metadata {P}feed_forward_length")

    theta = g.get(P + "rope.freq_base")
    if theta is not None:
        v["rope_theta"] = int(theta)
        present.append("rope_theta")

    head_dim = g.get(P + "attention.key_length") or g.get(P + "rope.dimension_count")
    hd = int(head_dim) if head_dim else v["dim"] // n_heads
    vlen = g.get(P + "attention.value_length")
    if vlen is not None and int(vlen) != hd:
        raise ConvertError(f"{g.path}: {P}attention.value_length {vlen} differs from the key length {hd}")
    rdim = g.get(P + "rope.dimension_count")
    if rdim is not None and int(rdim) != hd:
        raise ConvertError(f"{g.path}: partial rope ({P}rope.dimension_count {rdim} < head size {hd}) is not supported")

    stype = g.get(P + "rope.scaling.type")
    if stype not in (None, "none") and not (a == "gemma3" and stype == "linear"):
        raise ConvertError(f"{g.path}: unsupported {P}rope.scaling.type {stype!r}")
    if "rope_freqs.weight" in g.tensors:
        fit = _fit_llama3_scaling(g, hd, float(theta) if theta is not None else 10000.0)
        if fit is not None:
            (v["rope_scaling_factor"], v["rope_scaling_low_freq_factor"], v["rope_scaling_high_freq_factor"],
             v["rope_scaling_orig_max_seq_len"]) = fit
            v["rope_type"] = ROPE_LLAMA3_1
            present += ["rope_scaling_factor", "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor",
                        "rope_scaling_orig_max_seq_len", "rope_type"]
    if head_dim:
        v["head_dim"] = hd
        present.append("head_dim")
    eps = g.get(P + "attention.layer_norm_rms_epsilon")
    if eps is not None:
        v["norm_epsilon"] = eps_code(eps, f"{g.path}: metadata {P}attention.layer_norm_rms_epsilon")
        present.append("norm_epsilon")
    if a == "qwen3moe":
        v["moe_hidden_dim"] = need_int("expert_feed_forward_length")
        present.append("moe_hidden_dim")
    if a == "gemma3":
        _gemma3_header(g, v, present, hd)
    h = ModelHeader(**v, present=tuple(HEADER_KEY_OF[n] for n in present))
    if h.n_heads % h.n_kv_heads:
        raise ConvertError(f"{g.path}: head_count {h.n_heads} is not a multiple of head_count_kv {h.n_kv_heads}")
    check_header_for_weights(h, g.path)
    return h


def _gemma3_header(g: GGUFFile, v: dict, present: list, head_dim: int) -> None:
    """The Gemma 3 keys (FORMATS-EXT.md), with llama.cpp's defaults and rules (src/models/gemma3.cpp):
    sliding-window pattern 6, local rope base 10000, attention scale 1/sqrt(head_dim) except the
    27B (62 layers: 1/sqrt(dim / n_heads)), rope scaling (linear) on the global layers only."""
    P = "gemma3."
    v["hidden_act"] = ACT_GELU
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        cap = g.get(P + key)
        if cap:
            raise ConvertError(f"{g.path}: {P}{key} {cap} is not supported (Gemma 3 has none)")
    window = g.get(P + "attention.sliding_window")
    v["sliding_window"] = int(window) if window else 0
    pattern = g.get(P + "attention.sliding_window_pattern")
    n_layers = v["n_layers"]
    if isinstance(pattern, list):         # per-layer flags (true = sliding window): must be periodic
        flags = [bool(x) for x in pattern]
        n = next((p for p in range(1, n_layers + 1)
                  if flags == [l % p < p - 1 for l in range(n_layers)]), None)
        if n is None:
            raise ConvertError(f"{g.path}: {P}attention.sliding_window_pattern {pattern} is not "
                               f"'every n-th layer global'; the .m header cannot express it")
        pattern = n
    v["sliding_window_pattern"] = int(pattern) if pattern else 6
    base = g.get(P + "rope.freq_base_swa")
    v["rope_theta_local"] = _integer(g, P + "rope.freq_base_swa", base) if base is not None else 10000
    v["query_pre_attn_scalar"] = v["dim"] // v["n_heads"] if n_layers == 62 else head_dim
    factor = g.get(P + "rope.scaling.factor") if g.get(P + "rope.scaling.type") == "linear" else None
    v["rope_linear_factor"] = _integer(g, P + "rope.scaling.factor", factor) if factor else 1
    present += ["sliding_window", "sliding_window_pattern", "rope_theta_local", "query_pre_attn_scalar",
                "rope_linear_factor"]


def _integer(g: GGUFFile, key: str, value) -> int:
    if float(value) != int(value) or int(value) <= 0:
        raise ConvertError(f"{g.path}: {key} {value} is not a positive integer (the .m header stores integers)")
    return int(value)


# .m tensor name (formats.tensor_layout) -> GGUF name inside a block; experts are slices of one 3-D tensor
GGUF_LAYER_NAMES = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w1": "ffn_gate",
                    "w2": "ffn_down", "w3": "ffn_up", "router": "ffn_gate_inp", "q_norm": "attn_q_norm",
                    "k_norm": "attn_k_norm", "attn_norm": "attn_norm", "ffn_norm": "ffn_norm",
                    "attn_post_norm": "post_attention_norm", "ffn_post_norm": "post_ffw_norm"}


def gguf_sources(g: GGUFFile, h: ModelHeader):
    """The GGUF tensors in .m order (formats.tensor_layout). No q/k permutation: see the module docstring."""
    for t in tensor_layout(h, 0):
        if t.name == "embed":
            yield g.source("token_embd.weight")
        elif t.name == "norm":
            yield g.source("output_norm.weight")
        elif t.name == "wcls":
            yield g.source("output.weight", "token_embd.weight")     # tied embeddings
        elif t.expert >= 0:
            yield g.expert_source(f"blk.{t.layer}.{GGUF_LAYER_NAMES[t.name]}_exps.weight", t.expert)
        else:
            yield g.source(f"blk.{t.layer}.{GGUF_LAYER_NAMES[t.name]}.weight")


# `--weights auto`: the .m type that keeps each GGUF type's values. Q4_0 and Q8_0 are DL's q40 / q80
# blocks byte for byte (copied), F16 / F32 too; BF16 becomes f16 (same size, 3 more mantissa bits,
# narrower range); every other type (Q4_1, Q5_x, K-quants, IQ...) is dequantized and stored as q80,
# whose 8-bit codes per 32 values keep them to within the q80 rounding of the source values.
AUTO_TYPES = {"F32": F32, "F64": F32, "F16": F16, "BF16": F16, "Q4_0": Q40, "Q8_0": Q80}


def matrix_types(g: GGUFFile, h: ModelHeader, weights: str) -> list[int]:
    """The .m type of every matrix (tensor_layout order) for `weights` auto / q40 / q80 / f16 / f32."""
    out = []
    for t, src in zip(tensor_layout(h, 0), gguf_sources(g, h)):
        if t.name in MATRIX_NAMES:
            out.append(AUTO_TYPES.get(src.source_type, Q80) if weights == "auto" else parse_weights_type(weights))
    return out


def convert_gguf_model(path: str | os.PathLike, out_path: str | os.PathLike, weights: str = "auto",
                       quiet: bool = False, g: GGUFFile | None = None, q40_method: str = "auto") -> ModelHeader:
    """Convert the model. `weights`: "auto" (default) keeps each matrix's quality (AUTO_TYPES; a file
    whose matrices end up with different types gets the per-matrix type table, FORMATS-EXT.md), or
    one type for every matrix. A matrix already stored in its .m type is copied bit for bit.
    `q40_method` "auto" (default): tensors stored quantized in the GGUF (Q4_1, Q8_0, K-quants...)
    are re-quantized to q40 with the error-minimizing encoder (quantize_q40_rmse), because DL's
    max/-8 rule on top of an earlier quantization loses more; float tensors use DL's exact encoder.
    "dllama" / "rmse" force one encoder for every tensor."""
    import collections
    import sys

    g = g or GGUFFile(path)
    weights = weights.lower() if isinstance(weights, str) else float_type_name(weights)
    if weights != "auto":
        parse_weights_type(weights)
    h = gguf_header(g, F32)
    for unsupported in ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"):
        if f"blk.0.{unsupported}" in g.tensors:
            raise ConvertError(f"{g.path}: tensor blk.0.{unsupported} (attention bias) is not supported")
    types = matrix_types(g, h, weights)   # also checks that every tensor exists and has a readable type
    h.weights_float_type = collections.Counter(types).most_common(1)[0][0]
    if len(set(types)) > 1:
        h.tensor_types = tuple(types)
        h.n_tensor_types = len(types)
    check_header_for_weights(h, g.path)
    stats: dict = {}
    write_model(out_path, h, gguf_sources(g, h), quiet=quiet, desc=os.path.basename(os.fspath(out_path)),
                q40_method=q40_method, stats=stats)
    if not quiet:
        for line in summarize_stats(stats):
            print(f"{os.path.basename(os.fspath(out_path))}: {line}", file=sys.stderr)
    return h


# ---------------------------------------------------------------------------------------------
# tokenizer

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


def gguf_tokenizer_data(g: GGUFFile) -> TokenizerData:
    model = g.get("tokenizer.ggml.model")
    tokens = g.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConvertError(f"{g.path}: no tokenizer.ggml.tokens (vocabulary) in the file")
    if model == "gpt2":
        vocab = [byte_level_token_bytes(t) for t in tokens]
        scores = _bpe_scores(tokens, g.get("tokenizer.ggml.merges"))
    elif model == "llama":
        s = g.get("tokenizer.ggml.scores")
        scores = np.asarray(s, dtype=np.float32) if s is not None else -np.arange(len(tokens), dtype=np.float32)
        if scores.size != len(tokens):
            raise ConvertError(f"{g.path}: tokenizer.ggml.scores has {scores.size} values for {len(tokens)} tokens")
        tt = g.get("tokenizer.ggml.token_type")
        types = np.asarray(tt, dtype=np.int64) if tt is not None else np.full(len(tokens), TOKEN_NORMAL)
        if types.size != len(tokens):
            raise ConvertError(f"{g.path}: tokenizer.ggml.token_type has {types.size} values for {len(tokens)} tokens")
        vocab, token_types = sentencepiece_vocab(tokens, types, g.path)
    else:
        raise ConvertError(f"{g.path}: unsupported tokenizer.ggml.model {model!r} (supported: gpt2, llama)")
    for i, t in enumerate(vocab):
        if not t:
            raise ConvertError(f"{g.path}: token {i} is empty")

    bos = g.get("tokenizer.ggml.bos_token_id")
    if bos is None:
        raise ConvertError(f"{g.path}: missing metadata tokenizer.ggml.bos_token_id")
    eos = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        e = g.get(key)
        if e is not None and int(e) not in eos:
            eos.append(int(e))
    if not eos:
        raise ConvertError(f"{g.path}: missing metadata tokenizer.ggml.eos_token_id")
    if model == "llama" and "tokenizer.ggml.eot_token_id" not in g.reader.fields:
        # llama.cpp finds Gemma's end-of-turn token by its text (no metadata key for it): a chat
        # answer ends there (HF's generation_config lists it next to <eos> too)
        eot = next((i for i, t in enumerate(tokens) if t == "<end_of_turn>"), None)
        if eot is not None and eot not in eos:
            eos.append(eot)
    n = len(vocab)
    for what, i in [("bos", int(bos))] + [("eos", e) for e in eos]:
        if not 0 <= i < n:
            raise ConvertError(f"{g.path}: {what} id {i} is outside the vocabulary (size {n})")
    add_bos = g.get("tokenizer.ggml.add_bos_token")
    template = g.get("tokenizer.chat_template")
    data = TokenizerData(vocab=vocab, scores=scores, bos_id=int(bos), eos_ids=eos,
                         add_bos=True if add_bos is None else bool(add_bos), chat_template=template,
                         max_token_length=max(len(t) for t in vocab))
    if model == "llama":            # llama.cpp's SPM defaults: add_space_prefix unless the file says no
        data.token_types = token_types
        data.add_space_prefix = bool(g.get("tokenizer.ggml.add_space_prefix", True))
    return data


def convert_gguf_tokenizer(path, out_path, g: GGUFFile | None = None) -> TokenizerData:
    g = g or GGUFFile(path)
    data = gguf_tokenizer_data(g)
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(out_path))), exist_ok=True)
    write_tokenizer(out_path, data)
    return data


def convert_gguf(path, out_model=None, out_tokenizer=None, weights: str = "auto", quiet: bool = False,
                 q40_method: str = "auto"):
    """Convert a GGUF file's model and/or tokenizer. Returns (header or None, tokenizer data or None)."""
    g = GGUFFile(path)
    h = t = None
    if out_tokenizer is not None:
        t = convert_gguf_tokenizer(path, out_tokenizer, g)
    if out_model is not None:
        h = convert_gguf_model(path, out_model, weights, quiet, g, q40_method=q40_method)
    return h, t


__all__ = ["GGUFFile", "convert_gguf", "convert_gguf_model", "convert_gguf_tokenizer", "gguf_header",
           "gguf_sources", "gguf_tokenizer_data"]
