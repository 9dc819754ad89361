import lzma
import os
import shutil
import tempfile
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny"


def _under_mpiexec() -> bool:
    return any(v in os.environ for v in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"))


# The collective tests only make sense inside mpiexec (scripts/test.sh runs them there).
collect_ignore = [] if any(v in os.environ for v in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")) \
    else ["test_mpi.py"]


# The float32 tiny models are not kept in git (tests/data stays under ~10 MB): they are made from the
# tiny HF checkpoints by this project's converter on first use, and must hash to Distributed Llama's
# own convert-hf.py output (commit 8d624a7), which is what tests/data once held.
F32_MODELS = {"tiny_llama": "a02163353b0922f550c1db547225e117f8773b17e868b618639ebfba93bd226a",
              "tiny_qwen3": "6d2fe676b448b64208779e51a5a03810b8d69dc323c09624d10e826baf1dfa6c"}


def _sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_f32_models() -> None:
    for name, want in F32_MODELS.items():
        dst = TINY / "m" / f"dllama_model_{name}_f32.m"
        if dst.exists() and _sha256(dst) == want:
            continue
        from dllama_mpi.convert.hf import convert_hf_model   # only when a model is missing

        # each process (every rank of an mpiexec run) writes its own file, then renames: same bytes
        tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
        convert_hf_model(TINY / "hf" / name, tmp, "f32", quiet=True)
        got = _sha256(tmp)
        if got != want:
            tmp.unlink()
            raise pytest.UsageError(f"{dst.name}: made from tests/data/tiny/hf/{name} it hashes to {got}, "
                                    f"not to Distributed Llama's {want}")
        os.replace(tmp, dst)


def pytest_configure(config):
    ensure_f32_models()
    # Under mpiexec every rank is a full pytest session: give each rank its own basetemp, or they
    # race while cleaning the shared one (MPI.md §3).
    if not _under_mpiexec():
        return
    from mpi4py import MPI

    c = MPI.COMM_WORLD
    if c.size > 1 and config.option.basetemp is None:
        job = c.bcast(os.getpid() if c.rank == 0 else None, root=0)
        parent = os.path.join(tempfile.gettempdir(), f"pytest-mpi-{job}")
        os.makedirs(parent, exist_ok=True)
        config.option.basetemp = os.path.join(parent, f"rank{c.rank}")
        config._dllama_mpi_basetemp = config.option.basetemp


def pytest_unconfigure(config):
    # pytest keeps an explicit basetemp, and the job's directory above is never reused (a new pid each
    # run): without this every collective run left its files for good (~600 MB, converted models, on
    # rank 0) and repeated runs filled the disk. Each rank removes its own; the last one, the parent.
    base = getattr(config, "_dllama_mpi_basetemp", None)
    if base:
        shutil.rmtree(base, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(base))
        except OSError:   # another rank's directory is still there: that rank removes the parent
            pass


def default_smollm2_or_skip() -> tuple[str, str]:
    """The default model's (model, tokenizer) paths, installed by the install command; the test
    skips where neither the network nor a cached copy has it."""
    try:
        from dllama_mpi.convert.smollm2 import default_models_dir, ensure_default_model

        return ensure_default_model(default_models_dir())
    except Exception as e:  # noqa: BLE001 (no network and no cached copy)
        pytest.skip(f"the default SmolLM2 model is not available: {e}")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def real_tokenizers(tmp_path_factory) -> dict:
    """The real Llama 3 and Qwen2 .t files, unpacked from their .xz copies."""
    out = tmp_path_factory.mktemp("tokenizers")
    paths = {}
    for name in ("llama3", "qwen2"):
        dst = out / f"dllama_tokenizer_{name}.t"
        with lzma.open(DATA / "tokenizers" / f"dllama_tokenizer_{name}.t.xz") as src, open(dst, "wb") as f:
            shutil.copyfileobj(src, f)
        paths[name] = dst
    return paths
