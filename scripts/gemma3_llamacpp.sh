#!/usr/bin/env bash
# llama.cpp's side of the Gemma 3 270M numbers (scripts/gemma3_reference.md) and the outputs the
# tests compare against, all on the GGUF that `dllama-mpi download gemma3-270m` assembles:
#
#   scripts/gemma3_llamacpp.sh [OUT_DIR]
#
# 1. builds llama-tokenize, llama-simple, llama-perplexity and llama-bench (CPU; GGML_FLAGS, default
#    -DGGML_NATIVE=ON) from the llama.cpp vendored in a llama-cpp-python sdist (SDIST, default
#    /tmp/lcp/llama_cpp_python-0.3.36.tar.gz; `pip download --no-deps --no-binary :all:
#    llama-cpp-python==0.3.36`), unless LCP_BIN names a folder that already has them. A VM whose
#    CPUID shows AMX without enabling it dies in ggml's AMX kernels (SIGILL at tilezero) with a
#    native build: give it GGML_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
#    -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" (no AMX);
# 2. records llama-tokenize's ids for the tokenizer test set (tests/data/tokenizers/record_gemma3.py);
# 3. records llama-simple's greedy completions of factual prompts, checked against the float64
#    reference forward pass (tests/data/record_gemma3_completions.py);
# 4. llama-perplexity -c 512 on tests/data/texts/pride_and_prejudice_1-4.txt (2 threads);
# 5. llama-bench decode (tg32) at 1 and 2 threads, REPS repetitions (default 5).
# Outputs of 4 and 5 go to OUT_DIR (default /tmp/gemma3-llamacpp-DATE). Keep the machine otherwise
# idle while step 5 measures.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
sdist="${SDIST:-/tmp/lcp/llama_cpp_python-0.3.36.tar.gz}"
work="${WORK:-/tmp/lcp-gemma3}"
out="${1:-/tmp/gemma3-llamacpp-$(date +%Y%m%d-%H%M%S)}"
reps="${REPS:-5}"
py="$here/.venv/bin/python"
mkdir -p "$out"

# ---- 1. llama.cpp tools -----------------------------------------------------------------
bin="${LCP_BIN:-}"
if [ -z "$bin" ]; then
  src="$work/$(basename "$sdist" .tar.gz)"
  bin="$src/build/bin"
  if [ ! -x "$bin/llama-bench" ]; then
    mkdir -p "$work"
    [ -d "$src" ] || tar xzf "$sdist" -C "$work"
    # shellcheck disable=SC2086
    cmake -S "$src/vendor/llama.cpp" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      ${GGML_FLAGS:--DGGML_NATIVE=ON} -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF
    nice -n 10 cmake --build "$src/build" -j"$(nproc)" \
      --target llama-tokenize llama-simple llama-perplexity llama-bench
  fi
fi
for t in llama-tokenize llama-simple llama-perplexity llama-bench; do
  [ -x "$bin/$t" ] || { echo "missing $bin/$t" >&2; exit 1; }
done
gguf="$("$py" -c 'from dllama_mpi.convert.gemma3 import gemma3_gguf; print(gemma3_gguf())')"
{ echo "# $(date -Is) $(uname -n) nproc=$(nproc)"; lscpu | grep -i "model name"; "$bin/llama-bench" --version 2>&1 | tail -2; } > "$out/env.txt"

# ---- 2, 3. recorded test data -------------------------------------------------------------
"$py" "$here/tests/data/tokenizers/record_gemma3.py" "$bin/llama-tokenize" "$gguf"
"$py" "$here/tests/data/record_gemma3_completions.py" "$bin/llama-simple" "$gguf"

# ---- 4. perplexity --------------------------------------------------------------------------
"$bin/llama-perplexity" -m "$gguf" -f "$here/tests/data/texts/pride_and_prejudice_1-4.txt" -c 512 -t 2 \
  > "$out/perplexity.log" 2>&1
grep -E "^\[1\]|Final estimate" "$out/perplexity.log"

# ---- 5. decode speed ------------------------------------------------------------------------
"$bin/llama-bench" -m "$gguf" -t 1,2 -p 0 -n 32 -r "$reps" -o md | tee "$out/bench.md"
echo "results in $out" >&2
