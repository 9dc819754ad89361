#!/usr/bin/env bash
# Side-by-side speed of llama.cpp (llama-bench, CPU) and dllama-mpi on the same model shape, on one
# instruction set.
#
#   scripts/bench_llamacpp.sh [OUT_DIR]               # native: the best ISA this CPU has
#   ISA=avx2 scripts/bench_llamacpp.sh [OUT_DIR]      # AVX2 on any AVX2 host, even one with AVX-512
#   ISA=avx512 scripts/bench_llamacpp.sh [OUT_DIR]    # AVX-512 (F/BW/VL/DQ/VNNI), no AMX
#
# 1. builds llama-bench (CPU only) from the llama.cpp vendored in a llama-cpp-python sdist
#    (default /tmp/lcp/llama_cpp_python-0.3.36.tar.gz; get one with
#    `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`), always with
#    GGML_NATIVE=OFF and the ISA named flag by flag, AMX off: -DGGML_NATIVE=ON (-march=native)
#    turns AMX on wherever /proc/cpuinfo lists amx_tile, and on VMs that list it without granting
#    the tile state (such as the one these numbers were taken on) llama-bench dies with SIGILL in
#    the prompt pass. ISA=avx2: AVX/AVX2/FMA/F16C/BMI2 on, every AVX-512 and AVX-VNNI option off
#    (what an AVX2-only CPU such as Zen 2/3 runs); ISA=avx512: AVX-512 F/BW/VL/DQ/VNNI, plus VBMI
#    and BF16 where the CPU has them; ISA=native: avx512 where the CPU has what dllama-mpi's
#    AVX-512 path needs, else avx2 (non-x86 hosts: GGML_NATIVE=ON, AMX is x86 only);
# 2. writes a random-weight Q4_0 GGUF with the Llama-3.2-1B shape (scripts/make_gguf_q4_0.py);
# 3. runs, ROUNDS times, alternating: llama-bench t=1,2 with repacking on, the same with
#    --repack 0 (REPACK0=0 skips it), then dllama-mpi benchmark 1 rank x 1 thread, 1 x 2,
#    2 ranks x 1 thread (synthetic model bench/llama3.2-1b-q40.m from scripts/make_synthetic.py),
#    with DLLAMA_ISA=$ISA unless ISA=native;
# 4. prints a table of medians (pp128 = prefill tok/s, tg32 = decode tok/s), the ratios to
#    llama.cpp (repack on) on the same number of cores, and both engines' share of the bandwidth
#    roofline: weight bytes per token over the read bandwidth the dllama-mpi benchmark measured
#    in the same run (BANDWIDTH=GB/s fixes it instead).
#
# env: ISA (native|avx512|avx2), SDIST, LCP_SRC (an unpacked sdist instead), LCP_BUILD (build dir, default
#      $WORK/build-$ISA; an existing build is reused), WORK (default /tmp/lcp-bench), ROUNDS (3),
#      REPS (3), REPACK0 (1), MODEL_M, TOKENIZER_T, BANDWIDTH, SKIP_BUILD=1,
#      QUIET_LOAD (e.g. 1.0: before each round wait until the 1-minute load average is below it),
#      FIRST_ROUND (1: number of the first round; later calls with the same OUT_DIR add rounds).
# Keep the machine otherwise idle while it measures (and say so when it was not).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
isa="${ISA:-native}"
sdist="${SDIST:-/tmp/lcp/llama_cpp_python-0.3.36.tar.gz}"
work="${WORK:-/tmp/lcp-bench}"
rounds="${ROUNDS:-3}"
reps="${REPS:-3}"
model_m="${MODEL_M:-$here/bench/llama3.2-1b-q40.m}"
tok_t="${TOKENIZER_T:-$here/bench/llama3.2-1b.t}"
out="${1:-$work/results-$isa-$(date +%Y%m%d-%H%M%S)}"
bin="$here/.venv/bin"
gguf_file="$work/llama3.2-1b-q4_0-random.gguf"
mkdir -p "$work" "$out"

cpu_flags=" $(grep -m1 -E '^(flags|Features)' /proc/cpuinfo | cut -d: -f2) "
has() { case "$cpu_flags" in *" $1 "*) return 0 ;; esac; return 1; }
onoff() { if has "$1"; then echo ON; else echo OFF; fi; }
if [ "$isa" = native ] && [ "$(uname -m)" = x86_64 ]; then
  if has avx512f && has avx512bw && has avx512vl && has avx512dq && has avx512_vnni; then isa=avx512
  else isa=avx2; fi
fi
x86_common=(-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
            -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
case "$isa" in
  native) isa_flags=(-DGGML_NATIVE=ON) ;;
  avx512) isa_flags=("${x86_common[@]}" -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON
                     -DGGML_AVX512_VBMI="$(onoff avx512vbmi)" -DGGML_AVX512_BF16="$(onoff avx512_bf16)")
          export DLLAMA_ISA=avx512 ;;
  avx2)   isa_flags=("${x86_common[@]}" -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF
                     -DGGML_AVX512_BF16=OFF)
          export DLLAMA_ISA=avx2 ;;
  *) echo "error: ISA must be native, avx512 or avx2, not '$isa'" >&2; exit 2 ;;
esac

# ---- 1. build llama-bench -------------------------------------------------------------
src="${LCP_SRC:-$work/$(basename "$sdist" .tar.gz)}"
build="${LCP_BUILD:-$work/build-$isa}"
lb="$build/bin/llama-bench"
if [ ! -x "$lb" ] && [ "${SKIP_BUILD:-0}" != 1 ]; then
  [ -d "$src" ] || tar xzf "$sdist" -C "$work"
  cmake -S "$src/vendor/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${isa_flags[@]}" \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
  nice -n 10 cmake --build "$build" --target llama-bench -j"$(nproc)"
fi
"$lb" --help >/dev/null 2>&1 || { echo "llama-bench missing: $lb" >&2; exit 1; }

# ---- 2. random Q4_0 GGUF --------------------------------------------------------------
[ -s "$gguf_file" ] || "$bin/python" "$here/scripts/make_gguf_q4_0.py" "$gguf_file"

# ---- 3. measure, alternating ----------------------------------------------------------
ours=(benchmark --model "$model_m" --tokenizer "$tok_t" --synthetic 128 --steps 32 --repeat "$reps")
[ -n "${BANDWIDTH:-}" ] && ours+=(--bandwidth "$BANDWIDTH")
{ echo "# $(date -Is) $(uname -n) nproc=$(nproc) ISA=$isa DLLAMA_ISA=${DLLAMA_ISA:-} load: $(cut -d' ' -f1-3 /proc/loadavg)"
  lscpu | grep -i "model name"; "$lb" --version 2>&1 | tail -2; } >> "$out/env.txt"
first="${FIRST_ROUND:-1}"
for r in $(seq "$first" $((first + rounds - 1))); do
  if [ -n "${QUIET_LOAD:-}" ]; then
    while awk -v q="$QUIET_LOAD" '{exit !($1 >= q)}' /proc/loadavg; do sleep 15; done
  fi
  echo "== round $r ($isa, load $(cut -d' ' -f1 /proc/loadavg))" | tee -a "$out/env.txt" >&2
  "$lb" -m "$gguf_file" -t 1,2 -p 128 -n 32 -r "$reps" -o json > "$out/lcp_repack1_r$r.json"
  [ "${REPACK0:-1}" = 1 ] &&
    "$lb" -m "$gguf_file" -t 1,2 -p 128 -n 32 -r "$reps" --repack 0 -o json > "$out/lcp_repack0_r$r.json"
  "$bin/dllama-mpi" "${ours[@]}" --nthreads 1 > "$out/dl_1x1_r$r.json" 2> "$out/dl_1x1_r$r.log"
  "$bin/dllama-mpi" "${ours[@]}" --nthreads 2 > "$out/dl_1x2_r$r.json" 2> "$out/dl_1x2_r$r.log"
  "$bin/mpiexec" -n 2 "$bin/dllama-mpi" "${ours[@]}" --nthreads 1 > "$out/dl_2x1_r$r.json" 2> "$out/dl_2x1_r$r.log"
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/env.txt"

# ---- 4. summary -----------------------------------------------------------------------
"$bin/python" "$here/scripts/summarize_llamacpp.py" "$out" | tee "$out/summary.md"
echo "results in $out" >&2
