#!/usr/bin/env bash
# Speculative decoding on one host: `benchmark --spec none` next to `--spec ngram`, alternating, on
# input-grounded prompts (repeat a passage, rename a function) and open chat prompts, SmolLM2 (the
# default model, its chat template written into the prompts), greedy, 64 steps, at 1 rank x 2 threads
# and 2 ranks x 1 (scripts/BENCHMARKS.md "Speculative decoding").
#
#   scripts/bench_spec.sh [OUT_DIR]          ROUNDS (3), MODEL (default model)
#
# Prints per set and configuration the median over rounds of decode tok/s (each run's tokens / time),
# the ratio ngram / none, tokens per pass and acceptance.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-/tmp/spec-bench-$(date +%Y%m%d-%H%M%S)}"
bin="$here/.venv/bin"
model=(); [ -n "${MODEL:-}" ] && model=(--model "$MODEL")
mkdir -p "$out"
"$bin/python" - "$out" "$here" <<'PY'
import json, sys
out, here = sys.argv[1], sys.argv[2]
passage = open(f"{here}/tests/data/text/kjv_genesis_1-6.txt").read()[:900]
code = '''def moving_average(values, window):
    """Mean of each run of `window` consecutive values."""
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n".format
sets = {"grounded": [chat(f"Repeat the following passage exactly, word for word.\n\n{passage}"),
                     chat(f"Rename the function below to rolling_mean and change nothing else. Answer with the whole code.\n\n{code}")],
        "open": [chat("Write a short story about a lighthouse keeper who finds a message in a bottle."),
                 chat("What are three good habits for learning a new language? Explain each briefly.")]}
for name, prompts in sets.items():
    with open(f"{out}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
PY
echo "# $(date -Is) $(uname -n) nproc=$(nproc) load: $(cut -d' ' -f1-3 /proc/loadavg) $(git -C "$here" rev-parse --short HEAD)" >> "$out/env.txt"
common=(benchmark "${model[@]}" --steps 64 --repeat 2 --warmup 1)
for r in $(seq 1 "${ROUNDS:-3}"); do
    for set in grounded open; do
        for spec in none ngram; do
            "$bin/dllama-mpi" "${common[@]}" --prompts "$out/$set.jsonl" --spec $spec --nthreads 2 \
                > "$out/${set}_${spec}_1x2_r$r.json" 2>/dev/null
            "$bin/mpiexec" -n 2 "$bin/dllama-mpi" "${common[@]}" --prompts "$out/$set.jsonl" --spec $spec \
                --nthreads 1 > "$out/${set}_${spec}_2x1_r$r.json" 2>/dev/null
        done
    done
done
"$bin/python" - "$out" <<'PY' | tee "$out/summary.md"
import glob, json, statistics as st, sys

out = sys.argv[1]
print("| prompts | config | --spec none tok/s (rounds) | --spec ngram tok/s (rounds) | ngram / none | tokens per pass | acceptance |")
print("|---|---|---|---|---|---|---|")
for s in ("grounded", "open"):
    for cfg in ("1x2", "2x1"):
        res = {}
        for spec in ("none", "ngram"):
            tps, tpp, acc = [], [], []
            for f in sorted(glob.glob(f"{out}/{s}_{spec}_{cfg}_r*.json")):
                runs = json.load(open(f))["runs"]
                tps.append(st.mean(r["decode_tok_s_mean"] for r in runs))
                tpp.append(st.mean(r.get("tokens_per_pass") or 1 for r in runs))
                acc.append(st.mean(r.get("acceptance") or 0 for r in runs))
            res[spec] = (st.median(tps), tps, st.median(tpp), st.median(acc))
        n, g = res["none"], res["ngram"]
        print(f"| {s} | {cfg} | {n[0]:.1f} ({', '.join(f'{x:.1f}' for x in n[1])}) | "
              f"{g[0]:.1f} ({', '.join(f'{x:.1f}' for x in g[1])}) | {g[0] / n[0]:.2f}x | {g[2]:.2f} | {100 * g[3]:.0f} % |")
PY
