#!/usr/bin/env bash
# Continuous batching side by side with llama.cpp's llama-batched-bench (issue 10's numbers):
#
#   scripts/bench_batched.sh [OUT_DIR]
#
# Llama-3.2-1B shape, q40 (bench/llama3.2-1b-q40.m from scripts/make_synthetic.py) against the same
# shape as a Q4_0 GGUF (scripts/make_gguf_q4_0.py). ROUNDS rounds, alternating, each:
#   llama-batched-bench -npp 32 -ntg 32 -npl 1,2,4,8,16 -t 2      (S_TG = aggregate generation tok/s)
#   dllama-mpi benchmark --synthetic 32 --steps 32 --parallel 1,2,4,8,16, 1 rank x 2 threads
#   the same with 2 ranks x 1 thread
# then one memory run: 2 ranks, 16 streams of 480 prompt + 32 generated tokens (512 positions),
# the workers' peak RSS against their weights + the KV pages in use.
#
# env: LCP_BIN (folder with llama-batched-bench; built from SDIST into WORK when missing, with
#      explicit ISA flags and AMX off: a VM that advertises AMX without enabling it dies in a
#      GGML_NATIVE=ON build), ROUNDS (3), MODEL_M, TOKENIZER_T. Keep the machine otherwise idle.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-/tmp/bench-batched-$(date +%Y%m%d-%H%M%S)}"
rounds="${ROUNDS:-3}"
model_m="${MODEL_M:-$here/bench/llama3.2-1b-q40.m}"
tok_t="${TOKENIZER_T:-$here/bench/llama3.2-1b.t}"
work="${WORK:-/tmp/lcp-batched}"
sdist="${SDIST:-/tmp/lcp/llama_cpp_python-0.3.36.tar.gz}"
bin="$here/.venv/bin"
mkdir -p "$out" "$work"

lb="${LCP_BIN:-$work/build/bin}/llama-batched-bench"
if [ ! -x "$lb" ]; then
  src="$work/$(basename "$sdist" .tar.gz)"
  [ -d "$src" ] || tar xzf "$sdist" -C "$work"
  isa="-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  grep -q avx512_vnni /proc/cpuinfo && isa="$isa -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON"
  # shellcheck disable=SC2086
  cmake -S "$src/vendor/llama.cpp" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF $isa \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=OFF > "$out/cmake.log"
  nice -n 10 cmake --build "$work/build" --target llama-batched-bench -j"$(nproc)" > "$out/build.log"
fi
[ -s "$model_m" ] || "$bin/python" "$here/scripts/make_synthetic.py" llama3.2-1b --out "$(dirname "$model_m")"
gguf="$work/llama3.2-1b-q4_0-random.gguf"
[ -s "$gguf" ] || "$bin/python" "$here/scripts/make_gguf_q4_0.py" "$gguf"

ours=(benchmark --model "$model_m" --tokenizer "$tok_t" --synthetic 32 --steps 32 --repeat 1 --warmup 1
      --parallel 1,2,4,8,16 --bandwidth 32)
{ echo "# $(date -Is) $(uname -n) nproc=$(nproc) load: $(cut -d' ' -f1-3 /proc/loadavg)"; lscpu | grep -i "model name"; } > "$out/env.txt"
for r in $(seq 1 "$rounds"); do
  echo "== round $r/$rounds" >&2
  "$lb" -m "$gguf" -c 8192 -b 2048 -ub 512 -npp 32 -ntg 32 -npl 1,2,4,8,16 -t 2 --output-format jsonl \
    > "$out/lcp_r$r.jsonl" 2> "$out/lcp_r$r.log"
  "$bin/dllama-mpi" "${ours[@]}" --nthreads 2 > "$out/dl_1x2_r$r.json" 2> "$out/dl_1x2_r$r.log"
  "$bin/mpiexec" -n 2 "$bin/dllama-mpi" "${ours[@]}" --nthreads 1 > "$out/dl_2x1_r$r.json" 2> "$out/dl_2x1_r$r.log"
done
"$bin/mpiexec" -n 2 "$bin/dllama-mpi" benchmark --model "$model_m" --tokenizer "$tok_t" --synthetic 480 --steps 32 \
  --repeat 1 --warmup 0 --parallel 16 --max-seq-len 520 --nthreads 1 --bandwidth 32 > "$out/mem_2x1.json" 2> "$out/mem_2x1.log"

"$bin/python" - "$out" <<'PY' | tee "$out/summary.md"
import glob, json, statistics as st, sys
out = sys.argv[1]
med = st.median
lcp = {}
for f in sorted(glob.glob(f"{out}/lcp_r*.jsonl")):
    for line in open(f):
        line = line.strip()
        if line.startswith("{"):
            d = json.loads(line)
            lcp.setdefault(d["pl"], []).append(d["speed_tg"])
ours = {}
for cfg in ("1x2", "2x1"):
    for f in sorted(glob.glob(f"{out}/dl_{cfg}_r*.json")):
        d = json.load(open(f))
        for p in d["parallel"]:
            ours.setdefault(cfg, {}).setdefault(p["streams"], []).append(p["aggregate_decode_tok_s"])
print("| streams | llama.cpp S_TG (2 threads) | dllama-mpi 1 x 2 | / llama.cpp | dllama-mpi 2 x 1 | / llama.cpp |")
print("|---:|---:|---:|---:|---:|---:|")
for n in sorted(lcp):
    l = med(lcp[n])
    a, b = med(ours["1x2"][n]), med(ours["2x1"][n])
    print(f"| {n} | {l:.1f} | {a:.1f} | {a / l:.2f} | {b:.1f} | {b / l:.2f} |")
for cfg in ("1x2", "2x1"):
    one = med(ours[cfg][1])
    print(f"dllama-mpi {cfg}: 8 streams = {med(ours[cfg][8]) / one:.2f}x, 16 streams = {med(ours[cfg][16]) / one:.2f}x one stream")
m = json.load(open(f"{out}/mem_2x1.json"))
for r in m["per_rank"]:
    print(f"memory run, rank {r['rank']}: peak RSS {r['peak_rss_mb']:.0f} MB, weights {r['weight_bytes_per_token'] / 2**20:.0f} MiB")
print(f"KV pages at most in use: {m['parallel'][0]['kv_pages_peak']}, bytes per rank: {[round(b / 2**20) for b in m['parallel'][0]['kv_bytes_peak_per_rank']]} MiB")
PY
echo "results in $out" >&2
