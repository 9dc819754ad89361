#!/usr/bin/env bash
# Perplexity / KL divergence of SmolLM2-135M-Instruct imported from its Q4_1 GGUF as f32, f16, q80 and
# q40, on tests/data/text/kjv_genesis_1-6.txt (n_ctx 512, llama.cpp's method), plus llama.cpp's own
# llama-perplexity on the same GGUF and text. Usage: scripts/ppl_smollm2.sh OUT_DIR [LLAMA_BIN_DIR]
# (scripts/BENCHMARKS.md, earlier records: "8- and 16-bit weights"). Writes OUT/<variant>.json and OUT/llamacpp.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?out dir}; LCP=${2:-}
mkdir -p "$OUT"
BIN=.venv/bin
GGUF=$($BIN/python -c "from dllama_mpi.convert.smollm2 import find_gguf; print(find_gguf(install=False))")
TEXT=tests/data/text/kjv_genesis_1-6.txt
TOK=$OUT/tokenizer.t
[ -f "$TOK" ] || $BIN/dllama-mpi convert gguf "$GGUF" --out-tokenizer "$TOK" --quiet
for w in f32 f16 q80 q40; do
    [ -f "$OUT/model_$w.m" ] || $BIN/dllama-mpi convert gguf "$GGUF" --out-model "$OUT/model_$w.m" --weights $w --quiet
done
NT=${NTHREADS:-2}
# the f32 import's perplexity, saving its log-probabilities as the KL-divergence reference; the
# --kl-divergence runs evaluate the same tokens, so their PPL(Q) is each variant's perplexity
[ -f "$OUT/f32.kld" ] || $BIN/dllama-mpi perplexity --model "$OUT/model_f32.m" --tokenizer "$TOK" --file $TEXT \
    --ctx 512 --nthreads $NT --kl-divergence-base "$OUT/f32.kld" --json > "$OUT/f32.json"
for w in f16 q80 q40; do
    $BIN/dllama-mpi perplexity --model "$OUT/model_$w.m" --tokenizer "$TOK" --kl-divergence --nthreads $NT \
        --kl-divergence-base "$OUT/f32.kld" --json > "$OUT/$w.kld.json"
done
if [ -n "$LCP" ]; then
    "$LCP/llama-perplexity" -m "$GGUF" -f $TEXT -c 512 -t 2 > "$OUT/llamacpp.txt" 2>&1
    # llama.cpp's Q4_1 model against our f32 import's reference log-probabilities (same vocabulary)
    "$LCP/llama-perplexity" -m "$GGUF" -c 512 -t 2 --kl-divergence --kl-divergence-base "$OUT/f32.kld" \
        > "$OUT/llamacpp.kld.txt" 2>&1
fi
ls -l "$OUT"/model_*.m
