#!/usr/bin/env bash
# How far each engine is from exact arithmetic on the same weights: the f16 (or f32) import of a GGUF,
# run with f32 activations, is the reference (`perplexity --kl-divergence-base`); then llama.cpp on
# the GGUF and dllama-mpi on the GGUF (q80 and f32 synchronised activations, 1 and 2 ranks) report
# their KL divergence and same-top-token rate against it (scripts/BENCHMARKS.md "GGUF models").
#
#   LCP_BIN=/path/to/llama.cpp/bin scripts/kld_reference.sh OUT_DIR MODEL.gguf REF.m REF.t
#
# TEXT (tests/data/text/kjv_genesis_1-6.txt), CTX (512), CHUNKS (4: the base file stores vocab x 2
# bytes per scored token, 0.5 GB for Gemma 3's 262 144 tokens at 4 chunks).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?OUT_DIR}"; gguf="${2:?MODEL.gguf}"; ref="${3:?REF.m}"; tok="${4:?REF.t}"
lcp="${LCP_BIN:?LCP_BIN: a folder with llama-perplexity}"
bin="$here/.venv/bin"
text="${TEXT:-$here/tests/data/text/kjv_genesis_1-6.txt}"
ctx="${CTX:-512}"; chunks="${CHUNKS:-4}"
mkdir -p "$out"
echo "# $(date -Is) $(uname -n) $gguf ref=$ref text=$text ctx=$ctx chunks=$chunks" >> "$out/env.txt"
"$bin/dllama-mpi" perplexity --model "$ref" --tokenizer "$tok" --buffer-float-type f32 --file "$text" --ctx "$ctx" \
    --chunks "$chunks" --kl-divergence-base "$out/ref.kld" --json > "$out/ref.json"
"$lcp/llama-perplexity" -m "$gguf" -t 2 --kl-divergence --kl-divergence-base "$out/ref.kld" \
    > "$out/llamacpp.txt" 2>&1
for cfg in "1 q80" "2 q80" "1 f32" "2 f32"; do
    set -- $cfg
    "$bin/mpiexec" -n "$1" "$bin/dllama-mpi" perplexity --model "$gguf" --nthreads $((2 / $1)) --buffer-float-type "$2" \
        --kl-divergence --kl-divergence-base "$out/ref.kld" --json > "$out/ours_n$1_$2.json"
done
rm -f "$out/ref.kld"
"$bin/python" - "$out" <<'PY' | tee "$out/summary.md"
import glob, json, re, sys

out = sys.argv[1]
ref = json.load(open(f"{out}/ref.json"))
print(f"reference: {ref['ppl']:.4f} ± {ref['ppl_unc']:.4f} ({ref['scored']} tokens scored)\n")
print("| engine on the GGUF | PPL | mean KLD to the reference | same top token |")
print("|---|---|---|---|")
t = open(f"{out}/llamacpp.txt").read()
ppl, kld, top = (re.search(p, t).group(1) for p in (r"PPL\(Q\)\s*:\s*([0-9.]+)", r"Mean\s+KLD:\s*([0-9.]+)",
                                                   r"Same top p:\s*([0-9.]+)"))
print(f"| llama.cpp | {ppl} | {kld} | {top} % |")
for f in sorted(glob.glob(f"{out}/ours_n*.json")):
    d = json.load(open(f))
    n, buf = f.rsplit("/", 1)[1][6:-5].split("_")
    print(f"| dllama-mpi, {n} rank(s), {buf} activations | {d['ppl']:.4f} | {d['kld']:.6f} | {100 * d['same_top']:.2f} % |")
PY
