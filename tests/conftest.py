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


def pytest_configure(config):
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
