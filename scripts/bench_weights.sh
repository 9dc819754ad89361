#!/usr/bin/env bash
# Decode / prefill tok/s of the same model in several weight types, alternating the variants
# (ROUNDS rounds) so that a loaded host's drift spreads over all of them; medians per variant.
#   scripts/bench_weights.sh DIR TOKENIZER [variants...]   (DIR/model_<variant>.m, default f32 f16 q80 q40;
#   a variant FILE.gguf runs that GGUF as it is, with its own tokenizer)
# env: ROUNDS (3), NTHREADS (1), STEPS (32), PROMPT (128)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?dir}; TOK=${2:?tokenizer}; shift 2
VARIANTS=${*:-f32 f16 q80 q40}
for r in $(seq 1 "${ROUNDS:-3}"); do
    for w in $VARIANTS; do
        case "$w" in
            *.gguf) model=(--model "$w") ;;
            *) model=(--model "$DIR/model_$w.m" --tokenizer "$TOK") ;;
        esac
        .venv/bin/dllama-mpi benchmark "${model[@]}" --nthreads "${NTHREADS:-1}" \
            --synthetic "${PROMPT:-128}" --steps "${STEPS:-32}" --repeat 2 --max-seq-len 512 2>/dev/null \
            | .venv/bin/python -c "import json,sys; s=json.load(sys.stdin)['summary']; print('$(basename "$w")', s['decode_tok_s'], s['prefill_tok_s'])"
    done
done | .venv/bin/python -c "
import sys, statistics, collections
d = collections.defaultdict(list)
for line in sys.stdin:
    w, dec, pre = line.split(); d[w].append((float(dec), float(pre)))
for w, v in d.items():
    print(f'{w}: decode {statistics.median(x[0] for x in v):.1f} tok/s, prefill {statistics.median(x[1] for x in v):.1f} tok/s ({len(v)} rounds)')
"
