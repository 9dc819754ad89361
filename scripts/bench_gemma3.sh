#!/usr/bin/env bash
# Gemma 3 270M decode / prefill next to llama.cpp on the same Q4_K_M GGUF (scripts/BENCHMARKS.md, earlier records):
#
#   LCP_BIN=/path/to/llama.cpp/bin scripts/bench_gemma3.sh [OUT_DIR]
#
# ROUNDS (3) alternating rounds, each: llama-bench -p 128 -n 32 -r 3 at 1 and 2 threads (its own
# Q4_K_M runtime), then dllama-mpi benchmark --synthetic 128 --steps 32 --repeat 2 on the f16 import
# (`download gemma3-270m`) and the q80 import (`--weights auto`, made in the model cache), each
# at 1 rank x 1 thread, 1 x 2 and 2 ranks x 1; medians over rounds. Keep the machine otherwise idle.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-/tmp/gemma3-bench-$(date +%Y%m%d-%H%M%S)}"
rounds="${ROUNDS:-3}"
bin="$here/.venv/bin"
lb="${LCP_BIN:?LCP_BIN: a folder with llama-bench (scripts/bench_llamacpp.sh builds one)}/llama-bench"
mkdir -p "$out"
# the default model cache ($DLLAMA_MPI_MODELS or ~/.cache/dllama-mpi/models); made on first use
read -r f16 q80 tok gguf < <("$bin/python" -c "
from dllama_mpi.convert.gemma3 import ensure_gemma3, gemma3_gguf
f16, tok = ensure_gemma3(quiet=True)
q80, _ = ensure_gemma3(quiet=True, weights='auto')
print(f16, q80, tok, gemma3_gguf())")
ours=(benchmark --tokenizer "$tok" --synthetic 128 --steps 32 --repeat 2)
for r in $(seq 1 "$rounds"); do
    echo "== round $r/$rounds (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    "$lb" -m "$gguf" -p 128 -n 32 -r 3 -t 1,2 -o jsonl > "$out/lcp_r$r.jsonl" 2>/dev/null
    for w in f16 q80; do
        m=$f16; [ $w = q80 ] && m=$q80
        "$bin/dllama-mpi" "${ours[@]}" --model "$m" --nthreads 1 > "$out/${w}_1x1_r$r.json" 2>/dev/null
        "$bin/dllama-mpi" "${ours[@]}" --model "$m" --nthreads 2 > "$out/${w}_1x2_r$r.json" 2>/dev/null
        "$bin/mpiexec" -n 2 "$bin/dllama-mpi" "${ours[@]}" --model "$m" --nthreads 1 > "$out/${w}_2x1_r$r.json" 2>/dev/null
    done
done
"$bin/python" - "$out" <<'PY'
import glob, json, sys
from statistics import median as med
out = sys.argv[1]
rows = {}
for f in sorted(glob.glob(f"{out}/lcp_r*.jsonl")):
    for line in open(f):
        d = json.loads(line)
        key = ("llama.cpp Q4_K_M", f"t{d['n_threads']}", "pp" if d["n_prompt"] else "tg")
        rows.setdefault(key, []).append(d["avg_ts"])
for f in sorted(glob.glob(f"{out}/*_[12]x[12]_r*.json")):
    name = f.rsplit("/", 1)[1]
    w, cfg = name.split("_")[0], name.split("_")[1]
    s = json.load(open(f))["summary"]
    rows.setdefault((f"dllama-mpi {w}", cfg, "tg"), []).append(s["decode_tok_s"])
    rows.setdefault((f"dllama-mpi {w}", cfg, "pp"), []).append(s["prefill_tok_s"])
print("| engine | config | decode tok/s (rounds) | prefill tok/s |")
print("|---|---|---|---|")
for (eng, cfg, kind), v in sorted(rows.items()):
    if kind == "tg":
        pp = rows.get((eng, cfg, "pp"), [0])
        print(f"| {eng} | {cfg} | {med(v):.1f} ({', '.join(f'{x:.1f}' for x in v)}) | {med(pp):.0f} |")
PY
