"""Hugging Face folder -> Distributed Llama `.m` model and `.t` tokenizer (FORMATS.md §1–§3).

Byte-compatible with DL's `convert-hf.py` / `convert-tokenizer-hf.py` (commit 8d624a7), with these
deliberate differences:
- transformers-5 configs (`rope_parameters` instead of `rope_theta` / `rope_scaling`,
  `num_local_experts` instead of `num_experts`) are read correctly; DL silently drops them;
- bf16 / f16 / f32 checkpoints are read without torch, one tensor (and one row chunk) at a time;
- the tokenizer's eos list comes from `generation_config.json` when it has `eos_token_id`
  (DL reads `config.json` only), then `config.json`, then `tokenizer_config.json`'s `eos_token`;
- a `chat_template.jinja` file is used when `tokenizer_config.json` has no `chat_template`;
- every problem is a one-line ConvertError naming the file and the field.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from dllama_mpi.errors import ConvertError
from dllama_mpi.formats import (ACT_GELU, ACT_SILU, ARCH_GEMMA3, ARCH_LLAMA, ARCH_QWEN2, ARCH_QWEN3, ARCH_QWEN3_MOE,
                                HEADER_KEY_OF, ROPE_LLAMA3_1, ModelHeader, TokenizerData, tensor_layout,
                                write_tokenizer)

from .common import (TensorSource, byte_level_token_bytes, check_header_for_weights, parse_weights_type,
                     permute_rows_source, sentencepiece_token_bytes, write_model)

ARCHS = {"llama": ARCH_LLAMA, "mistral": ARCH_LLAMA, "qwen2": ARCH_QWEN2, "qwen3": ARCH_QWEN3,
         "qwen3_moe": ARCH_QWEN3_MOE}
ACTS = {"gelu": ACT_GELU, "silu": ACT_SILU}


def _load_json(path: str, required: bool = True):
    if not os.path.isfile(path):
        if required:
            raise ConvertError(f"{path}: file not found")
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: cannot read JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# config.json -> header (FORMATS §1.2)

def eps_code(eps, where: str) -> int:
    """RMSNorm epsilon -> DL's code (5 = 1e-5, 6 = 1e-6); exact, or equal as float32 (GGUF)."""
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise ConvertError(f"{where}: epsilon {eps!r} is not a number") from None
    for code, ref in ((5, 1e-5), (6, 1e-6)):
        if e == ref or np.float32(e) == np.float32(ref):
            return code
    raise ConvertError(f"{where}: unsupported RMSNorm epsilon {eps!r} (Distributed Llama supports only 1e-5 and 1e-6)")


def header_from_config(config: dict, weights_float_type: int, where: str = "config.json") -> ModelHeader:
    """Map an HF config dict to the .m header exactly as DL's converter does (FORMATS §1.2)."""

    def need(key):
        v = config.get(key)
        if v is None:
            raise ConvertError(f"{where}: missing field {key!r}")
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ConvertError(f"{where}: field {key!r} must be a number, got {v!r}")
        return int(v)

    model_type = config.get("model_type")
    if model_type == "gemma3_text":
        return gemma3_header_from_config(config, weights_float_type, where)
    if model_type == "gemma3":
        raise ConvertError(f"{where}: model_type 'gemma3' is the multimodal Gemma3ForConditionalGeneration; "
                           f"only the text model (Gemma3ForCausalLM, model_type 'gemma3_text') is supported")
    if model_type not in ARCHS:
        raise ConvertError(f"{where}: unsupported model_type {model_type!r} (supported: {', '.join(ARCHS)})")
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise ConvertError(f"{where}: field 'use_sliding_window' is true; Qwen2's sliding-window attention is not "
                           f"supported (the released Qwen2 / Qwen2.5 models have it off)")
    act = config.get("hidden_act", config.get("hidden_activation"))
    if act not in ACTS:
        raise ConvertError(f"{where}: unsupported hidden_act {act!r} (supported: gelu, silu)")

    v = dict(version=0, arch_type=ARCHS[model_type], hidden_act=ACTS[act], dim=need("hidden_size"),
             hidden_dim=need("intermediate_size"), n_layers=need("num_hidden_layers"),
             n_heads=need("num_attention_heads"),
             n_kv_heads=need("num_key_value_heads") if config.get("num_key_value_heads") is not None
             else need("num_attention_heads"),
             weights_float_type=weights_float_type, max_seq_len=need("max_position_embeddings"),
             vocab_size=need("vocab_size"))
    present = ["version", "arch_type", "hidden_act", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
               "weights_float_type", "max_seq_len", "vocab_size", "n_experts", "n_active_experts"]

    n_exp = config.get("num_experts")
    if n_exp is None:
        n_exp = config.get("num_local_experts")          # transformers 5 / Mixtral name
    n_act = config.get("num_experts_per_tok")
    if n_act is None:
        n_act = config.get("num_active_local_experts")
    v["n_experts"] = int(n_exp) if n_exp is not None else 0
    v["n_active_experts"] = int(n_act) if n_act is not None else 0
    if model_type == "qwen3_moe" and v["n_experts"] <= 0:
        raise ConvertError(f"{where}: qwen3_moe config without 'num_experts' / 'num_local_experts'")
    if model_type != "qwen3_moe" and v["n_experts"] > 0:
        raise ConvertError(f"{where}: model_type {model_type!r} with experts (num_experts "
                           f"{v['n_experts']}) is not supported")

    rope_params = config.get("rope_parameters")
    if rope_params is not None and not isinstance(rope_params, dict):
        raise ConvertError(f"{where}: field 'rope_parameters' must be an object")
    rope_theta = config.get("rope_theta")
    if rope_theta is None and rope_params:
        rope_theta = rope_params.get("rope_theta")
    if rope_theta is not None:
        v["rope_theta"] = int(rope_theta)
        present.append("rope_theta")

    scaling = config.get("rope_scaling")
    field = "rope_scaling"
    if scaling is None and rope_params and rope_params.get("rope_type", rope_params.get("type")) not in (None, "default"):
        scaling, field = rope_params, "rope_parameters"
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ConvertError(f"{where}: field {field!r} must be an object")
        rtype = scaling.get("rope_type", scaling.get("type"))
        if rtype != "llama3":
            raise ConvertError(f"{where}: unsupported {field}.rope_type {rtype!r} (only 'llama3' is supported)")
        for key, name in (("factor", "rope_scaling_factor"), ("low_freq_factor", "rope_scaling_low_freq_factor"),
                          ("high_freq_factor", "rope_scaling_high_freq_factor"),
                          ("original_max_position_embeddings", "rope_scaling_orig_max_seq_len")):
            if scaling.get(key) is None:
                raise ConvertError(f"{where}: {field} has no {key!r}")
            v[name] = int(scaling[key])
            present.append(name)
        v["rope_type"] = ROPE_LLAMA3_1
        present.append("rope_type")

    if config.get("head_dim") is not None:
        v["head_dim"] = int(config["head_dim"])
        present.append("head_dim")
    if config.get("rms_norm_eps") is not None:
        v["norm_epsilon"] = eps_code(config["rms_norm_eps"], f"{where}: field 'rms_norm_eps'")
        present.append("norm_epsilon")
    if config.get("moe_intermediate_size") is not None:
        v["moe_hidden_dim"] = int(config["moe_intermediate_size"])
        present.append("moe_hidden_dim")
    if model_type == "qwen3_moe" and "moe_hidden_dim" not in v:
        raise ConvertError(f"{where}: qwen3_moe config without 'moe_intermediate_size'")

    return _checked_header(v, present, where)


def _checked_header(v: dict, present: list, where: str) -> ModelHeader:
    h = ModelHeader(**v, present=tuple(HEADER_KEY_OF[n] for n in present))
    for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
        if getattr(h, name) <= 0:
            raise ConvertError(f"{where}: {name} is {getattr(h, name)}, must be positive")
    if h.n_heads % h.n_kv_heads:
        raise ConvertError(f"{where}: num_attention_heads {h.n_heads} is not a multiple of num_key_value_heads {h.n_kv_heads}")
    return h


def _number(config: dict, key: str, where: str, default=None):
    v = config.get(key, default)
    if v is None:
        raise ConvertError(f"{where}: missing field {key!r}")
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ConvertError(f"{where}: field {key!r} must be a number, got {v!r}")
    return v


def _positive_int(value, what: str, where: str) -> int:
    if float(value) != int(value) or int(value) <= 0:
        raise ConvertError(f"{where}: {what} {value!r} is not a positive integer (the .m header stores integers)")
    return int(value)


def gemma3_header_from_config(config: dict, weights_float_type: int, where: str = "config.json") -> ModelHeader:
    """Gemma3ForCausalLM's config (model_type gemma3_text; transformers 4 and 5 spellings) -> the
    .m header with the Gemma 3 keys of FORMATS-EXT.md."""
    act = config.get("hidden_activation", config.get("hidden_act"))
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConvertError(f"{where}: unsupported hidden_activation {act!r} (Gemma 3 uses gelu_pytorch_tanh)")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if config.get(key) is not None:
            raise ConvertError(f"{where}: field {key!r} is {config[key]!r}; softcapping is not supported (Gemma 3 has none)")
    num = lambda key, default=None: _number(config, key, where, default)  # noqa: E731
    n_layers, n_heads = int(num("num_hidden_layers")), int(num("num_attention_heads"))
    dim = int(num("hidden_size"))
    head_dim = int(num("head_dim", dim // n_heads if n_heads else 0))
    # rope: transformers 4 has rope_theta / rope_local_base_freq / rope_scaling, transformers 5
    # rope_parameters per layer type ({"full_attention": {...}, "sliding_attention": {...}})
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConvertError(f"{where}: field 'rope_parameters' must be an object")
    full = params.get("full_attention", params if "rope_theta" in params else {})
    local = params.get("sliding_attention", {})
    theta = config.get("rope_theta", full.get("rope_theta", 1_000_000))
    local_theta = config.get("rope_local_base_freq", local.get("rope_theta", 10_000))
    scaling = config.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
    factor = 1
    if scaling:
        rtype = scaling.get("rope_type", scaling.get("type"))
        if rtype != "linear":
            raise ConvertError(f"{where}: unsupported Gemma 3 rope scaling {rtype!r} (only 'linear' is supported)")
        factor = _positive_int(scaling.get("factor"), "rope scaling factor", where)
    if local and local.get("rope_type", "default") != "default":
        raise ConvertError(f"{where}: rope scaling on the sliding-window layers is not supported")
    window = config.get("sliding_window") or 0
    pattern = config.get("sliding_window_pattern", 6)
    layer_types = config.get("layer_types")
    if layer_types is not None:
        flags = [t == "sliding_attention" for t in layer_types]
        if len(flags) != n_layers or any(t not in ("sliding_attention", "full_attention") for t in layer_types):
            raise ConvertError(f"{where}: field 'layer_types' must list {n_layers} sliding_attention / full_attention")
        pattern = next((p for p in range(1, n_layers + 1) if flags == [l % p < p - 1 for l in range(n_layers)]), None)
        if pattern is None:
            raise ConvertError(f"{where}: field 'layer_types' is not 'every n-th layer is full_attention'; "
                               f"the .m header cannot express it")
    v = dict(version=0, arch_type=ARCH_GEMMA3, hidden_act=ACT_GELU, dim=dim,
             hidden_dim=int(num("intermediate_size")), n_layers=n_layers, n_heads=n_heads,
             n_kv_heads=int(num("num_key_value_heads", n_heads)), weights_float_type=weights_float_type,
             max_seq_len=int(num("max_position_embeddings")), vocab_size=int(num("vocab_size")),
             n_experts=0, n_active_experts=0, rope_theta=_positive_int(theta, "rope_theta", where),
             head_dim=head_dim, norm_epsilon=eps_code(num("rms_norm_eps", 1e-6), f"{where}: field 'rms_norm_eps'"),
             sliding_window=int(window), sliding_window_pattern=int(pattern),
             rope_theta_local=_positive_int(local_theta, "rope_local_base_freq", where),
             query_pre_attn_scalar=_positive_int(num("query_pre_attn_scalar", head_dim), "query_pre_attn_scalar", where),
             rope_linear_factor=factor)
    present = ["version", "arch_type", "hidden_act", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
               "weights_float_type", "max_seq_len", "vocab_size", "n_experts", "n_active_experts", "rope_theta",
               "head_dim", "norm_epsilon", "sliding_window", "sliding_window_pattern", "rope_theta_local",
               "query_pre_attn_scalar", "rope_linear_factor"]
    return _checked_header(v, present, where)


def load_header(folder: str, weights: str | int = "q40") -> ModelHeader:
    wtype = parse_weights_type(weights) if isinstance(weights, str) else weights
    path = os.path.join(folder, "config.json")
    h = header_from_config(_load_json(path), wtype, path)
    check_header_for_weights(h, path)
    return h


# ---------------------------------------------------------------------------------------------
# safetensors

_NP_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


class Checkpoint:
    """The tensors of an HF folder (single file or sharded via model.safetensors.index.json).

    Shapes and offsets come from each file's safetensors header; data is read row chunk by row
    chunk: F32 / F16 / F64 through `safetensors.safe_open(framework="numpy").get_slice`, BF16 (which
    numpy cannot represent) from the raw bytes, widened to float32 by a 16-bit shift.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.where: dict[str, str] = {}           # tensor name -> file path
        self.meta: dict[str, tuple[str, list, int]] = {}   # name -> (dtype, shape, absolute byte offset)
        self._handles: dict[str, object] = {}
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            wm = (_load_json(index) or {}).get("weight_map")
            if not isinstance(wm, dict):
                raise ConvertError(f"{index}: no 'weight_map' object")
            files = sorted(set(wm.values()))
        else:
            try:
                files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") and not f.startswith("."))
            except OSError as e:
                raise ConvertError(f"{folder}: cannot list folder: {e.strerror}") from None
        if not files:
            raise ConvertError(f"{folder}: no *.safetensors file found")
        for name in files:
            self._scan(os.path.join(folder, name))

    def _scan(self, path: str):
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise ConvertError(f"{path}: not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", raw)
                if n > 100_000_000:
                    raise ConvertError(f"{path}: not a safetensors file (header length {n})")
                hdr = json.loads(f.read(n))
                size = os.fstat(f.fileno()).st_size
        except OSError as e:
            raise ConvertError(f"{path}: cannot read: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConvertError(f"{path}: not a safetensors file (bad JSON header)") from None
        for name, info in hdr.items():
            if name == "__metadata__":
                continue
            b0, b1 = info["data_offsets"]
            if 8 + n + b1 > size:
                raise ConvertError(f"{path}: tensor {name} extends past the end of the file (truncated?)")
            self.where[name] = path
            self.meta[name] = (info["dtype"], list(info["shape"]), 8 + n + b0)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def source(self, *names: str) -> TensorSource:
        """The first of `names` that exists, as a TensorSource; ConvertError if none does."""
        for name in names:
            if name in self.where:
                return self._source(name)
        raise ConvertError(f"{self.folder}: tensor {names[0]} not found in the checkpoint")

    def _source(self, name: str) -> TensorSource:
        path = self.where[name]
        dtype, shape, offset = self.meta[name]
        if dtype not in _NP_DTYPES:
            raise ConvertError(f"{path}: tensor {name} has unsupported dtype {dtype} (supported: F32, F16, BF16)")
        if len(shape) == 1:
            rows, cols = 1, shape[0]
        elif len(shape) == 2:
            rows, cols = shape
        else:
            raise ConvertError(f"{path}: tensor {name} has shape {shape}, expected 1-D or 2-D")

        if dtype == "BF16":
            def read(r0, r1):
                mm = np.memmap(path, dtype="<u2", mode="r", offset=offset + 2 * r0 * cols, shape=((r1 - r0) * cols,))
                out = (mm.astype(np.uint32) << 16).view(np.float32).reshape(r1 - r0, cols)
                del mm
                return out
        else:
            sl = self._handle(path).get_slice(name)

            def read(r0, r1):
                a = sl[r0:r1] if len(shape) == 2 else sl[:].reshape(1, cols)
                return np.asarray(a, dtype=np.float32).reshape(r1 - r0, cols)

        return TensorSource(name, rows, cols, read)

    def _handle(self, path):
        h = self._handles.get(path)
        if h is None:
            from safetensors import safe_open

            try:
                h = safe_open(path, framework="numpy")
            except Exception as e:  # safetensors raises its own error types
                raise ConvertError(f"{path}: cannot open safetensors file ({e})") from None
            self._handles[path] = h
        return h


# .m tensor name (formats.tensor_layout) -> Hugging Face name inside a layer / inside an expert
HF_LAYER_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                  "wo": "self_attn.o_proj", "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj",
                  "router": "mlp.gate", "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm",
                  "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
HF_EXPERT_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
# Qwen2's attention biases
HF_BIAS_NAMES = {"q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias"}
# Gemma 3's four norms per layer: HF's post_attention_layernorm is the norm *after* attention
GEMMA3_LAYER_NAMES = {**HF_LAYER_NAMES, "attn_post_norm": "post_attention_layernorm",
                      "ffn_norm": "pre_feedforward_layernorm", "ffn_post_norm": "post_feedforward_layernorm"}


def plus_one_source(src: TensorSource) -> TensorSource:
    """Gemma's RMSNorm multiplies by (1 + w); the .m file stores 1 + w (as llama.cpp's GGUF does),
    added in float32 like transformers' Gemma3RMSNorm computes it."""
    return TensorSource(src.name, src.rows, src.cols, lambda r0, r1: src.read(r0, r1) + np.float32(1.0),
                        src.row_align, src.quantized)


def hf_sources(ck: Checkpoint, h: ModelHeader):
    """The checkpoint's tensors in .m order (formats.tensor_layout, FORMATS §1.4), lazily."""
    for t in tensor_layout(h, 0):
        if t.name == "embed":
            yield ck.source("model.embed_tokens.weight")
        elif t.name == "norm":
            src = ck.source("model.norm.weight")
            yield plus_one_source(src) if h.is_gemma3 else src
        elif t.name == "wcls":
            yield ck.source("lm_head.weight", "model.embed_tokens.weight")     # tied: DL's fallback
        elif t.expert >= 0:
            yield ck.source(f"model.layers.{t.layer}.mlp.experts.{t.expert}.{HF_EXPERT_NAMES[t.name]}.weight")
        elif t.name in HF_BIAS_NAMES:
            yield ck.source(f"model.layers.{t.layer}.{HF_BIAS_NAMES[t.name]}")
        else:
            names = GEMMA3_LAYER_NAMES if h.is_gemma3 else HF_LAYER_NAMES
            src = ck.source(f"model.layers.{t.layer}.{names[t.name]}.weight")
            if h.arch_type == ARCH_LLAMA and t.name in ("wq", "wk"):   # to DL's interleaved rope (§1.5)
                src = permute_rows_source(src, h.n_heads if t.name == "wq" else h.n_kv_heads)
            if h.is_gemma3 and t.name.endswith("norm"):
                src = plus_one_source(src)
            yield src


def convert_hf_model(folder: str | os.PathLike, out_path: str | os.PathLike, weights: str = "q40",
                     quiet: bool = False) -> ModelHeader:
    """Convert an HF folder's weights to a .m file (written to `<out>.partial`, then renamed)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ConvertError(f"{folder}: not a folder")
    h = load_header(folder, weights)
    ck = Checkpoint(folder)
    # fail early (before writing anything) on a missing tensor
    probe = hf_sources(ck, h)
    for _ in probe:
        pass
    write_model(out_path, h, hf_sources(ck, h), quiet=quiet, desc=os.path.basename(os.fspath(out_path)))
    return h


# ---------------------------------------------------------------------------------------------
# tokenizer (FORMATS §3.2)

def _token_id(vocab: dict, token, where: str):
    if token is None:
        return None
    if isinstance(token, dict):          # AddedToken serialisation
        token = token.get("content")
    return vocab.get(token)


def _eos_list(value, where: str):
    if value is None:
        return None
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConvertError(f"{where}: field 'eos_token_id' must be an id or a list of ids, got {value!r}")
    return list(ids)


def hf_tokenizer_data(folder: str | os.PathLike) -> TokenizerData:
    folder = os.fspath(folder)
    tj_path = os.path.join(folder, "tokenizer.json")
    tc_path = os.path.join(folder, "tokenizer_config.json")
    config = _load_json(os.path.join(folder, "config.json"), required=False) or {}
    if config.get("model_type") in ("gemma3_text", "gemma3"):
        # tokenizer.json has neither SentencePiece scores nor token types, which llama.cpp's exact
        # encoding needs (FORMATS-EXT.md); the GGUF of the same model has both
        raise ConvertError(f"{folder}: the Gemma 3 tokenizer converts from a GGUF of the model "
                           f"(dllama-mpi convert gguf FILE --out-tokenizer T), not from tokenizer.json")
    tj = _load_json(tj_path)
    tc = _load_json(tc_path, required=False) or {}
    gen = _load_json(os.path.join(folder, "generation_config.json"), required=False) or {}

    model = tj.get("model") or {}
    mtype = model.get("type")
    raw_vocab = model.get("vocab")
    unigram_scores = {}
    if mtype == "Unigram" and isinstance(raw_vocab, list):
        vocab = {}
        for i, (piece, score) in enumerate(raw_vocab):
            vocab.setdefault(piece, i)
            unigram_scores[i] = float(score)
    elif isinstance(raw_vocab, dict):
        vocab = dict(raw_vocab)
    else:
        raise ConvertError(f"{tj_path}: unsupported tokenizer model {mtype!r} (no vocab)")
    for t in tj.get("added_tokens") or []:
        vocab[t["content"]] = int(t["id"])        # like get_vocab(): added tokens override

    by_id: dict[int, str] = {}
    for tok, i in vocab.items():
        by_id.setdefault(i, tok)
    n = len(vocab)
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise ConvertError(f"{tj_path}: token ids are not contiguous (no token with id {missing[0]}; {n} tokens)")

    def has(node, kind):
        if not isinstance(node, dict):
            return False
        if node.get("type") == kind:
            return True
        return any(has(c, kind) for key in ("pretokenizers", "decoders") for c in (node.get(key) or []))

    byte_level = has(tj.get("pre_tokenizer"), "ByteLevel") or has(tj.get("decoder"), "ByteLevel")
    sentencepiece = not byte_level and (model.get("byte_fallback") or has(tj.get("decoder"), "ByteFallback")
                                        or has(tj.get("pre_tokenizer"), "Metaspace")
                                        or has(tj.get("decoder"), "Metaspace"))
    if not byte_level and not sentencepiece:
        raise ConvertError(f"{tj_path}: unsupported tokenizer (neither byte-level BPE nor SentencePiece-style)")
    to_bytes = byte_level_token_bytes if byte_level else sentencepiece_token_bytes
    tokens = [to_bytes(by_id[i]) for i in range(n)]
    for i, t in enumerate(tokens):
        if not t:
            raise ConvertError(f"{tj_path}: token {i} is empty")
    if unigram_scores:
        scores = np.array([unigram_scores.get(i, -float(i)) for i in range(n)], dtype=np.float32)
    else:
        scores = -np.arange(n, dtype=np.float32)         # DL: score = -id (id 0 -> -0.0)

    bos = config.get("bos_token_id")
    if bos is None:
        bos = gen.get("bos_token_id")
    if bos is None:
        bos = _token_id(vocab, tc.get("bos_token"), tc_path)
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    if bos is None:
        raise ConvertError(f"{folder}: cannot resolve the bos token (no 'bos_token_id' in config.json or "
                           f"generation_config.json, no 'bos_token' in tokenizer_config.json)")

    eos = _eos_list(gen.get("eos_token_id"), os.path.join(folder, "generation_config.json"))
    if eos is None:
        eos = _eos_list(config.get("eos_token_id"), os.path.join(folder, "config.json"))
    if eos is None:
        e = _token_id(vocab, tc.get("eos_token"), tc_path)
        eos = [e] if e is not None else None
    if eos is None:
        raise ConvertError(f"{folder}: cannot resolve the eos tokens (no 'eos_token_id' in generation_config.json or "
                           f"config.json, no 'eos_token' in tokenizer_config.json)")
    for what, i in [("bos", bos)] + [("eos", e) for e in eos]:
        if not 0 <= i < n:
            raise ConvertError(f"{folder}: {what} id {i} is outside the vocabulary (size {n})")

    add_bos = tc.get("add_bos_token")
    add_bos = True if add_bos is None else bool(add_bos)

    template = tc.get("chat_template")
    if isinstance(template, list):       # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None:
        jinja = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, "r", encoding="utf-8") as f:
                template = f.read()
    if template is not None and not isinstance(template, str):
        raise ConvertError(f"{tc_path}: field 'chat_template' must be a string")

    return TokenizerData(vocab=tokens, scores=scores, bos_id=int(bos), eos_ids=[int(e) for e in eos],
                         add_bos=add_bos, chat_template=template, max_token_length=max(len(t) for t in tokens))


def convert_hf_tokenizer(folder: str | os.PathLike, out_path: str | os.PathLike) -> TokenizerData:
    data = hf_tokenizer_data(folder)
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(out_path))), exist_ok=True)
    write_tokenizer(out_path, data)
    return data


def convert_hf(folder, out_model=None, out_tokenizer=None, weights: str = "q40", quiet: bool = False):
    """Convert the model and/or the tokenizer of an HF folder. Returns (header or None, tokenizer data or None)."""
    h = t = None
    if out_tokenizer is not None:       # cheap; fail before the long part
        t = convert_hf_tokenizer(folder, out_tokenizer)
    if out_model is not None:
        h = convert_hf_model(folder, out_model, weights, quiet)
    return h, t


__all__ = ["Checkpoint", "convert_hf", "convert_hf_model", "convert_hf_tokenizer", "eps_code",
           "header_from_config", "hf_sources", "hf_tokenizer_data", "load_header"]
