#!/usr/bin/env bash
# Command 2 of the README: the whole test suite. A one-node Slurm for tests/test_slurm.py (as root,
# scripts/slurm_local.sh; elsewhere those tests skip), plain pytest (single-rank tests, and tests
# that launch mpiexec or submit jobs themselves), then the collective tests inside mpiexec at 2 and
# 4 ranks (4 is oversubscribed on a 2-core machine): MPICH's (the venv's) and Open MPI's
# (scripts/openmpi_exec.sh). `timeout` guards against a rank left blocked.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
if [ "$(id -u)" = 0 ] && { command -v apt-get || command -v slurmctld; } >/dev/null; then
    export DLLAMA_SLURM_DIR="${TMPDIR:-/tmp}/dllama-slurm-test-$$"
    trap 'scripts/slurm_local.sh stop' EXIT
    scripts/slurm_local.sh start
    export SLURM_CONF="$DLLAMA_SLURM_DIR/slurm.conf"
fi
timeout 1200 .venv/bin/python -m pytest -q "$@"
for n in 2 4; do
    echo "== mpiexec -n $n (MPICH): collective tests"
    timeout 600 .venv/bin/mpiexec -n $n .venv/bin/python -m pytest -q --with-mpi -m mpi \
        -p no:cacheprovider tests/test_mpi.py
done
for n in 2 4; do
    echo "== mpiexec -n $n (Open MPI): collective tests"
    timeout 600 scripts/openmpi_exec.sh -n $n .venv/bin/python -m pytest -q --with-mpi -m mpi \
        -p no:cacheprovider tests/test_mpi.py
done
