#!/usr/bin/env bash
# q80 decode on the Llama-3.2-1B shape against llama.cpp's Q8_0 on the very same weights:
#   1. a random F16 GGUF of the shape (scripts/make_gguf_q4_0.py --type f16),
#   2. llama-quantize ... Q8_0,
#   3. dllama-mpi convert gguf (--weights auto copies the Q8_0 blocks into the q80 .m unchanged),
#   4. ROUNDS rounds, alternating: llama-bench -n 32 (t = 1, 2) and dllama-mpi benchmark
#      (1 rank x 1 thread, 1 x 2); prints medians of decode tok/s.
# usage: LCP_BIN=/path/to/llama.cpp/bin scripts/bench_q80.sh WORK_DIR   (ROUNDS=3, REPS=2)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:?work dir}; LCP=${LCP_BIN:?set LCP_BIN to a llama.cpp bin folder with llama-quantize and llama-bench}
mkdir -p "$W"
PY=.venv/bin/python
[ -s "$W/f16.gguf" ] || $PY scripts/make_gguf_q4_0.py --type f16 "$W/f16.gguf"
[ -s "$W/q8_0.gguf" ] || "$LCP/llama-quantize" "$W/f16.gguf" "$W/q8_0.gguf" Q8_0 > "$W/quantize.log" 2>&1
[ -s "$W/llama3.2-1b.t" ] || $PY -c "
import sys; sys.path.insert(0, 'scripts')
from make_synthetic import make_tokenizer
from dllama_mpi.formats import write_tokenizer
write_tokenizer('$W/llama3.2-1b.t', make_tokenizer(128256, 'llama3'))"
[ -s "$W/q80.m" ] || .venv/bin/dllama-mpi convert gguf "$W/q8_0.gguf" --out-model "$W/q80.m" --quiet
for r in $(seq 1 "${ROUNDS:-3}"); do
    "$LCP/llama-bench" -m "$W/q8_0.gguf" -t 1,2 -p 0 -n 32 -r "${REPS:-2}" -o json 2>/dev/null \
        | $PY -c "import json,sys; [print('llama.cpp_t%d' % x['n_threads'], x['avg_ts']) for x in json.load(sys.stdin)]"
    for t in 1 2; do
        .venv/bin/dllama-mpi benchmark --model "$W/q80.m" --tokenizer "$W/llama3.2-1b.t" --nthreads $t \
            --synthetic 16 --steps 32 --repeat "${REPS:-2}" --max-seq-len 256 2>/dev/null \
            | $PY -c "import json,sys; print('dllama-mpi_t$t', json.load(sys.stdin)['summary']['decode_tok_s'])"
    done
done | $PY -c "
import sys, statistics, collections
d = collections.defaultdict(list)
for line in sys.stdin:
    k, v = line.split(); d[k].append(float(v))
for k, v in sorted(d.items()):
    print(f'{k}: decode {statistics.median(v):.2f} tok/s (rounds: {\", \".join(f\"{x:.2f}\" for x in v)})')
"
