#!/usr/bin/env bash
# Command 2 of the README: the whole test suite. Plain pytest (single-rank tests, and tests that
# launch mpiexec themselves), then the collective tests inside mpiexec at 2 and 4 ranks (4 is
# oversubscribed on a 2-core machine). `timeout` guards against a rank left blocked.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
timeout 1200 .venv/bin/python -m pytest -q "$@"
for n in 2 4; do
    echo "== mpiexec -n $n: collective tests"
    timeout 600 .venv/bin/mpiexec -n $n .venv/bin/python -m pytest -q --with-mpi -m mpi \
        -p no:cacheprovider tests/test_mpi.py
done
