#!/usr/bin/env bash
# Side-by-side speed of llama.cpp (llama-bench, CPU) and dllama-mpi on the same model shape.
#
#   scripts/bench_llamacpp.sh [OUT_DIR]
#
# 1. builds llama-bench (CPU only, -DGGML_NATIVE=ON) from the llama.cpp vendored in a
#    llama-cpp-python sdist (default /tmp/lcp/llama_cpp_python-0.3.36.tar.gz; get one with
#    `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`),
# 2. writes a random-weight Q4_0 GGUF with the Llama-3.2-1B shape (scripts/make_gguf_q4_0.py),
# 3. runs, ROUNDS times, alternating: llama-bench t=1,2 with repacking on, the same with
#    --repack 0, then dllama-mpi benchmark 1 rank x 1 thread, 1 x 2, 2 ranks x 1 thread
#    (synthetic model bench/llama3.2-1b-q40.m, which scripts/make_synthetic.py writes),
# 4. prints a table of medians (pp128 = prefill tok/s, tg32 = decode tok/s).
#
# env: SDIST, WORK (build/model dir, default /tmp/lcp-bench), ROUNDS (3), REPS (3),
#      MODEL_M, TOKENIZER_T, BANDWIDTH (GB/s given to dllama-mpi, default 32), SKIP_BUILD=1.
# Keep the machine otherwise idle while it measures.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
sdist="${SDIST:-/tmp/lcp/llama_cpp_python-0.3.36.tar.gz}"
work="${WORK:-/tmp/lcp-bench}"
rounds="${ROUNDS:-3}"
reps="${REPS:-3}"
model_m="${MODEL_M:-$here/bench/llama3.2-1b-q40.m}"
tok_t="${TOKENIZER_T:-$here/bench/llama3.2-1b.t}"
bw="${BANDWIDTH:-32}"
out="${1:-$work/results-$(date +%Y%m%d-%H%M%S)}"
bin="$here/.venv/bin"
gguf_file="$work/llama3.2-1b-q4_0-random.gguf"
mkdir -p "$work" "$out"

# ---- 1. build llama-bench -------------------------------------------------------------
src="$work/$(basename "$sdist" .tar.gz)"
lb="$src/build/bin/llama-bench"
if [ ! -x "$lb" ] && [ "${SKIP_BUILD:-0}" != 1 ]; then
  [ -d "$src" ] || tar xzf "$sdist" -C "$work"
  cmake -S "$src/vendor/llama.cpp" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
  nice -n 10 cmake --build "$src/build" --target llama-bench -j"$(nproc)"
fi
"$lb" --help >/dev/null 2>&1 || { echo "llama-bench missing: $lb" >&2; exit 1; }

# ---- 2. random Q4_0 GGUF --------------------------------------------------------------
[ -s "$gguf_file" ] || "$bin/python" "$here/scripts/make_gguf_q4_0.py" "$gguf_file"

# ---- 3. measure, alternating ----------------------------------------------------------
ours=(benchmark --model "$model_m" --tokenizer "$tok_t" --synthetic 128 --steps 32
      --repeat "$reps" --bandwidth "$bw")
{ echo "# $(date -Is) $(uname -n) nproc=$(nproc)"; lscpu | grep -i "model name"; "$lb" --version 2>&1 | tail -2; } > "$out/env.txt"
for r in $(seq 1 "$rounds"); do
  echo "== round $r/$rounds" >&2
  "$lb" -m "$gguf_file" -t 1,2 -p 128 -n 32 -r "$reps" -o json > "$out/lcp_repack1_r$r.json"
  "$lb" -m "$gguf_file" -t 1,2 -p 128 -n 32 -r "$reps" --repack 0 -o json > "$out/lcp_repack0_r$r.json"
  "$bin/dllama-mpi" "${ours[@]}" --nthreads 1 > "$out/dl_1x1_r$r.json" 2> "$out/dl_1x1_r$r.log"
  "$bin/dllama-mpi" "${ours[@]}" --nthreads 2 > "$out/dl_1x2_r$r.json" 2> "$out/dl_1x2_r$r.log"
  "$bin/mpiexec" -n 2 "$bin/dllama-mpi" "${ours[@]}" --nthreads 1 > "$out/dl_2x1_r$r.json" 2> "$out/dl_2x1_r$r.log"
done

# ---- 4. summary -----------------------------------------------------------------------
"$bin/python" - "$out" <<'PY' | tee "$out/summary.md"
import glob, json, statistics as st, sys
out = sys.argv[1]
med = st.median
rows = {}  # label -> {"pp": [per-run medians], "tg": [...]}
for f in sorted(glob.glob(f"{out}/lcp_repack*_r*.json")):
    rp = "repack" if "repack1" in f else "no repack"
    for t in json.load(open(f)):
        kind = "pp" if t["n_prompt"] > 0 else "tg"
        lab = f"llama.cpp t={t['n_threads']} ({rp})"
        rows.setdefault(lab, {"pp": [], "tg": []})[kind].append(med(t["samples_ts"]))
for cfg, lab in (("1x1", "dllama-mpi 1 rank x 1 thr"), ("1x2", "dllama-mpi 1 rank x 2 thr"),
                 ("2x1", "dllama-mpi 2 ranks x 1 thr")):
    for f in sorted(glob.glob(f"{out}/dl_{cfg}_r*.json")):
        s = json.load(open(f))["summary"]
        d = rows.setdefault(lab, {"pp": [], "tg": []})
        d["pp"].append(s["prefill_tok_s"]); d["tg"].append(s["decode_tok_s"])
m = {k: (med(v["pp"]), med(v["tg"])) for k, v in rows.items() if v["pp"] and v["tg"]}
ref = {1: m.get("llama.cpp t=1 (repack)"), 2: m.get("llama.cpp t=2 (repack)")}
print("| config | pp128 tok/s | tg32 tok/s | pp / llama.cpp | tg / llama.cpp | runs (tg) |")
print("|---|---:|---:|---:|---:|---|")
for k, (pp, tg) in m.items():
    cores = 1 if ("t=1" in k or "1 rank x 1" in k) else 2
    r = ref[cores]
    rat = f"{pp / r[0]:.2f} | {tg / r[1]:.2f}" if (r and k.startswith("dllama")) else " | "
    runs = ", ".join(f"{x:.2f}" for x in rows[k]["tg"])
    print(f"| {k} | {pp:.2f} | {tg:.2f} | {rat} | {runs} |")
print("\nratios: dllama-mpi vs llama.cpp (repack on) using the same number of cores")
PY
echo "results in $out" >&2
