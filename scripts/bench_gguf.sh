#!/usr/bin/env bash
# GGUF files run as they are: dllama-mpi next to llama.cpp on the same files, alternating, in one window
# (scripts/BENCHMARKS.md "GGUF models").
#
#   LCP_BIN=/path/to/llama.cpp/bin scripts/bench_gguf.sh [OUT_DIR]
#
# Models (MODELS, default all four): gemma3 (Gemma 3 270M Q4_K_M, `download gemma3-270m`), smollm2
# (SmolLM2-135M-Instruct Q4_1, the default model), 1b-q4_k_m and 1b-q6_k (the Llama-3.2-1B shape with
# random weights: scripts/make_gguf_q4_0.py --type bf16, then llama-quantize; made once in WORK).
# ROUNDS (3) rounds, each model in turn: llama-bench -p 128 -n 32 -r 3 -t 1,2, then dllama-mpi
# benchmark --synthetic 128 --steps 32 --repeat 2 at 1 rank x 1 thread, 1 x 2 and 2 ranks x 1 (the
# 2x1 run also reports every rank's weights held against its share of the file, and peak RSS).
# DLLAMA_ISA (e.g. avx2) forces dllama-mpi's kernels; say which llama.cpp build LCP_BIN is.
# Prints medians over rounds and the ratios to llama.cpp at the same thread count (2x1: against t2).
# Keep the machine otherwise idle while it measures.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-/tmp/gguf-bench-$(date +%Y%m%d-%H%M%S)}"
rounds="${ROUNDS:-3}"
work="${WORK:-/tmp/gguf-bench-models}"
models="${MODELS:-gemma3 smollm2 1b-q4_k_m 1b-q6_k}"
bin="$here/.venv/bin"
lcp="${LCP_BIN:?LCP_BIN: a folder with llama-bench and llama-quantize (scripts/bench_llamacpp.sh builds them)}"
mkdir -p "$out" "$work"

path_of() {
    case "$1" in
        gemma3) "$bin/python" -c "from dllama_mpi.convert.gemma3 import gemma3_gguf; print(gemma3_gguf())" ;;
        smollm2) "$bin/python" -c "from dllama_mpi.convert.smollm2 import find_gguf; print(find_gguf())" ;;
        1b-*)
            q=$(echo "${1#1b-}" | tr a-z A-Z)
            f="$work/llama3.2-1b-random-$q.gguf"
            if [ ! -s "$f" ]; then
                [ -s "$work/bf16.gguf" ] || "$bin/python" "$here/scripts/make_gguf_q4_0.py" "$work/bf16.gguf" --type bf16 >&2
                "$lcp/llama-quantize" "$work/bf16.gguf" "$f" "$q" 2 > "$work/quantize-$q.log" 2>&1
            fi
            echo "$f" ;;
        *) echo "unknown model $1" >&2; exit 2 ;;
    esac
}

declare -A path
for m in $models; do path[$m]=$(path_of "$m"); done
{ echo "# $(date -Is) $(uname -n) nproc=$(nproc) DLLAMA_ISA=${DLLAMA_ISA:-} load: $(cut -d' ' -f1-3 /proc/loadavg)"
  lscpu | grep -i "model name"; "$lcp/llama-bench" --version 2>&1 | tail -1
  for m in $models; do echo "$m ${path[$m]} $(stat -L -c %s "${path[$m]}") bytes"; done; } >> "$out/env.txt"
ours=(benchmark --synthetic 128 --steps 32 --repeat 2)
for r in $(seq 1 "$rounds"); do
    for m in $models; do
        echo "== round $r/$rounds $m (load $(cut -d' ' -f1 /proc/loadavg))" >&2
        "$lcp/llama-bench" -m "${path[$m]}" -p 128 -n 32 -r 3 -t 1,2 -o jsonl > "$out/${m}_lcp_r$r.jsonl" 2>/dev/null
        "$bin/dllama-mpi" "${ours[@]}" --model "${path[$m]}" --nthreads 1 > "$out/${m}_1x1_r$r.json" 2>/dev/null
        "$bin/dllama-mpi" "${ours[@]}" --model "${path[$m]}" --nthreads 2 > "$out/${m}_1x2_r$r.json" 2>/dev/null
        "$bin/mpiexec" -n 2 "$bin/dllama-mpi" "${ours[@]}" --model "${path[$m]}" --nthreads 1 \
            > "$out/${m}_2x1_r$r.json" 2>/dev/null
    done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/env.txt"
"$bin/python" - "$out" $models <<'PY' | tee "$out/summary.md"
import glob, json, sys
from statistics import median as med

out, models = sys.argv[1], sys.argv[2:]
print("| model | engine | config | decode tok/s (rounds) | ratio | prefill tok/s | ratio | ISA |")
print("|---|---|---|---|---|---|---|---|")
for m in models:
    lcp = {}
    for f in sorted(glob.glob(f"{out}/{m}_lcp_r*.jsonl")):
        for line in open(f):
            d = json.loads(line)
            lcp.setdefault((d["n_threads"], "pp" if d["n_prompt"] else "tg"), []).append(d["avg_ts"])
    for t in (1, 2):
        tg, pp = lcp.get((t, "tg"), [0]), lcp.get((t, "pp"), [0])
        print(f"| {m} | llama.cpp | t{t} | {med(tg):.1f} ({', '.join(f'{x:.1f}' for x in tg)}) | | {med(pp):.0f} | | |")
    for cfg, t in (("1x1", 1), ("1x2", 2), ("2x1", 2)):
        runs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/{m}_{cfg}_r*.json"))]
        if not runs:
            continue
        dec = [r["summary"]["decode_tok_s"] for r in runs]
        pre = [r["summary"]["prefill_tok_s"] for r in runs]
        lt, lp = med(lcp.get((t, "tg"), [float("nan")])), med(lcp.get((t, "pp"), [float("nan")]))
        print(f"| {m} | dllama-mpi | {cfg} | {med(dec):.1f} ({', '.join(f'{x:.1f}' for x in dec)}) | "
              f"{med(dec) / lt:.2f}x | {med(pre):.0f} | {med(pre) / lp:.2f}x | {runs[-1]['summary']['kernel_isa']} |")
print()
print("| model | 2 ranks x 1: rank | weights held MiB | share of the file MiB | peak RSS MB | RSS after, anon / file MB |")
print("|---|---|---|---|---|---|")
for m in models:
    f = sorted(glob.glob(f"{out}/{m}_2x1_r*.json"))
    if f:
        for r in json.load(open(f[-1]))["per_rank"]:
            print(f"| {m} | {r['rank']} | {r['weights_held_mb']} | {r['weights_share_mb']} | {r['peak_rss_mb']:.0f} | "
                  f"{r['rss_anon_mb']:.0f} / {r['rss_file_mb']:.0f} |")
PY
echo "results in $out" >&2
