#!/usr/bin/env bash
# Speculative decoding on one host: `benchmark --spec none` next to `--spec ngram` (and `--spec draft`
# with DRAFT), alternating (each round in another order), on input-grounded prompts (grounded: repeat a
# passage, rename a function; grounded2: repeat another passage, fix a paragraph's spelling, summarise a
# passage, add type hints to a function, docstrings to a class, quote three sentences) and open chat
# prompts, rendered with the model's own chat template; greedy, 64 steps, at 1 rank x 2 threads and
# 2 ranks x 1; with LCP_BIN, llama.cpp's llama-lookup (and llama-speculative-simple with DRAFT)
# on the same files and prompt texts at 2 threads, and llama-bench's plain tg64 at the prompts'
# depth (scripts/BENCHMARKS.md "Speculative decoding").
#
#   scripts/bench_spec.sh [OUT_DIR]
#   env: MODEL (default model), DRAFT (a draft model file: adds --spec draft / draft-simple),
#        LCP_BIN (a llama.cpp bin folder with llama-lookup, llama-speculative-simple, llama-bench),
#        DRAFT_ARGS (more options for --spec draft, e.g. "--draft-p-min 0 --draft-max 8"),
#        ROUNDS (3), CONFIGS ("1x2 2x1"), SETS ("grounded grounded2 open"), STEPS (64), TEMPLATE (a
#        built-in chat template for a model file without one, e.g. gemma3)
#
# Prints per set and configuration the median over rounds of decode tok/s (each run's tokens over its
# time), the ratio to --spec none, tokens per pass and acceptance; llama.cpp's rows below.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-/tmp/spec-bench-$(date +%Y%m%d-%H%M%S)}"
bin="$here/.venv/bin"
steps="${STEPS:-64}"
model="${MODEL:-$("$bin/python" -c "from dllama_mpi.convert.smollm2 import find_gguf; print(find_gguf())")}"
specs=(none ngram); [ -n "${DRAFT:-}" ] && specs+=(draft)
lcp="${LCP_BIN:-}"
mkdir -p "$out"
# the prompt sets as chats (benchmark renders them with the model's chat template, or TEMPLATE: a
# built-in one for a GGUF without its own, e.g. gemma3) and, for llama.cpp, the same rendered texts
# without the leading BOS text (llama.cpp adds BOS itself)
"$bin/python" - "$out" "$here" "$model" <<'PY'
import json, os, sys
out, here, model = sys.argv[1:4]
from dllama_mpi.chat import template_for
from dllama_mpi.startup import load_tokenizer
text = open(f"{here}/tests/data/text/kjv_genesis_1-6.txt").read()
passage = text[:900]
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
typos = ("The lighthouse stood on a narow spit of rock at the edge of the bay. Every evening the keeper climed "
         "the spiral stairs, trimmed the wick and wound the clockwork that turned the lens. Ships pasing in the "
         "night saw its beam sweep the water once every ten seconds, and they knew were they were.")
counter = '''def count_words(text):
    counts = {}
    for word in text.split():
        w = word.lower().strip(".,;:!?")
        if w:
            counts[w] = counts.get(w, 0) + 1
    return counts
'''
stack = '''class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

    def is_empty(self):
        return len(self.items) == 0
'''
sets = {"grounded": [f"Repeat the following passage exactly, word for word.\n\n{passage}",
                     f"Rename the function below to rolling_mean and change nothing else. Answer with the whole code.\n\n{code}"],
        # the issue's other kinds of input-grounded prompt: quote, lightly edit, summarise a passage, edit code
        "grounded2": [f"Repeat the following passage exactly, word for word.\n\n{text[6000:6800]}",
                      f"Correct the spelling mistakes in this paragraph and change nothing else.\n\n{typos}",
                      f"Summarise the following passage.\n\n{text[12000:12900]}",
                      f"Add type hints to this function and change nothing else. Answer with the whole code.\n\n{counter}",
                      f"Add a docstring to each method of this class. Answer with the whole code.\n\n{stack}",
                      f"Quote the first three sentences of the following text exactly.\n\n{text[15000:15700]}"],
        "open": ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
                 "What are three good habits for learning a new language? Explain each briefly."]}
tok = load_tokenizer(model, None)
template = template_for(tok, os.environ.get("TEMPLATE") or None)
bos = tok.token_bytes(tok.bos_id).decode() if tok.bos_id >= 0 else None
for name, prompts in sets.items():
    with open(f"{out}/{name}.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            msgs = [{"role": "user", "content": p}]
            f.write(json.dumps({"messages": msgs}) + "\n")
            text = template.render(msgs, add_generation_prompt=True)
            if bos and text.startswith(bos):
                text = text[len(bos):]
            open(f"{out}/{name}_{i}.txt", "w").write(text)
            open(f"{out}/{name}_{i}.ntok", "w").write(str(len(tok.encode(text))))
PY
echo "# $(date -Is) $(uname -n) nproc=$(nproc) load: $(cut -d' ' -f1-3 /proc/loadavg) $(git -C "$here" rev-parse --short HEAD) model=$model draft=${DRAFT:-} ${DRAFT_ARGS:-}" >> "$out/env.txt"
common=(benchmark --model "$model" --steps "$steps" --repeat 2 --warmup 1 ${TEMPLATE:+--chat-template "$TEMPLATE"})
spec_args() { case "$1" in draft) echo "--spec draft --draft-model $DRAFT ${DRAFT_ARGS:-}" ;; *) echo "--spec $1" ;; esac; }
for r in $(seq 1 "${ROUNDS:-3}"); do
    echo "== round $r (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    # each round starts with another setting, so that no setting always runs first (after a pause)
    order=("${specs[@]:$(( (r - 1) % ${#specs[@]} ))}" "${specs[@]:0:$(( (r - 1) % ${#specs[@]} ))}")
    for set in ${SETS:-grounded grounded2 open}; do
        for spec in "${order[@]}"; do
            for cfg in ${CONFIGS:-1x2 2x1}; do
                ranks="${cfg%x*}"; threads="${cfg#*x}"
                launch=(); [ "$ranks" -gt 1 ] && launch=("$bin/mpiexec" -n "$ranks")
                # shellcheck disable=SC2046
                "${launch[@]}" "$bin/dllama-mpi" "${common[@]}" --prompts "$out/$set.jsonl" $(spec_args "$spec") \
                    --nthreads "$threads" > "$out/${set}_${spec}_${cfg}_r$r.json" 2>/dev/null
            done
        done
        [ -n "$lcp" ] || continue
        for i in $(seq 0 $(( $(ls "$out/${set}"_[0-9]*.txt | wc -l) - 1 ))); do
            "$lcp/llama-lookup" -m "$model" -f "$out/${set}_$i.txt" -n "$steps" -t 2 --temp 0 -c 4096 \
                > "$out/${set}_${i}_lookup_r$r.log" 2>&1
            [ -n "${DRAFT:-}" ] && "$lcp/llama-speculative-simple" -m "$model" -md "$DRAFT" --spec-type draft-simple \
                -f "$out/${set}_$i.txt" -n "$steps" -t 2 --temp 0 -c 4096 > "$out/${set}_${i}_specsimple_r$r.log" 2>&1
            "$lcp/llama-bench" -m "$model" -p 0 -n "$steps" -d "$(cat "$out/${set}_$i.ntok")" -t 2 -r 1 -o jsonl \
                > "$out/${set}_${i}_bench_r$r.jsonl" 2>/dev/null
        done
    done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/env.txt"
"$bin/python" - "$out" "${specs[*]}" "${CONFIGS:-1x2 2x1}" "${SETS:-grounded grounded2 open}" <<'PY' | tee "$out/summary.md"
import glob, json, re, statistics as st, sys

out, specs, cfgs, sets = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
med = lambda xs: st.median(xs) if xs else float("nan")
print("| prompts | config | " + " | ".join(f"--spec {s} tok/s (rounds)" for s in specs)
      + " | " + " | ".join(f"{s} / none | {s} tok/pass | {s} accepted" for s in specs[1:]) + " |")
print("|---|---|" + "---|" * (len(specs) + 3 * (len(specs) - 1)))
for s in sets:
    for cfg in cfgs:
        res = {}
        for spec in specs:
            tps, tpp, acc = [], [], []
            for f in sorted(glob.glob(f"{out}/{s}_{spec}_{cfg}_r*.json")):
                runs = json.load(open(f))["runs"]
                tps.append(st.mean(r["decode_tok_s_mean"] for r in runs))
                tpp.append(st.mean(r.get("tokens_per_pass") or 1 for r in runs))
                acc.append(st.mean(r.get("acceptance") or 0 for r in runs))
            res[spec] = (med(tps), tps, med(tpp), med(acc))
        cells = [f"{res[p][0]:.1f} ({', '.join(f'{x:.1f}' for x in res[p][1])})" for p in specs]
        cells += [f"{res[p][0] / res['none'][0]:.2f}x | {res[p][2]:.2f} | {100 * res[p][3]:.0f} %" for p in specs[1:]]
        print(f"| {s} | {cfg} | " + " | ".join(cells) + " |")


def lcp(kind, s):
    """llama.cpp, 2 threads: per round the mean over the set's prompts of decoded tok/s, and the acceptance."""
    tps, acc = [], []
    for r in sorted({m.group(1) for f in glob.glob(f"{out}/{s}_*_{kind}_r*.*") if (m := re.search(r"_r(\d+)\.", f))}):
        vals, a = [], []
        for f in sorted(glob.glob(f"{out}/{s}_*_{kind}_r{r}.*")):
            t = open(f).read()
            if kind == "bench":
                vals += [json.loads(l)["avg_ts"] for l in t.splitlines() if l.startswith("{")]
                continue
            m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", t)
            if m:
                vals.append(int(m.group(1)) / float(m.group(2)))
            m = re.search(r"accept\s+=\s+([\d.]+)%", t)
            if m:
                a.append(float(m.group(1)))
        if vals:
            tps.append(st.mean(vals))
            acc.append(st.mean(a) if a else float("nan"))
    return tps, acc


rows = [(k, n) for k, n in (("bench", "llama-bench tg (plain, at the prompt's depth)"), ("lookup", "llama-lookup"),
                            ("specsimple", "llama-speculative-simple (draft-simple)"))
        if glob.glob(f"{out}/*_{k}_r*.*")]
if rows:
    print("\n| prompts | llama.cpp, 2 threads | tok/s (rounds) | accepted |")
    print("|---|---|---|---|")
    for s in sets:
        for k, name in rows:
            tps, acc = lcp(k, s)
            print(f"| {s} | {name} | {med(tps):.1f} ({', '.join(f'{x:.1f}' for x in tps)}) | "
                  + (f"{med(acc):.0f} %" if k != "bench" and acc == acc and med(acc) == med(acc) else "") + " |")
PY
